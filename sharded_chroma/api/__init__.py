"""What chromadb's collection classes call: the narrow server contract and its one adapter."""
