"""The collections catalog: logical collections, their per-node physical ids, DDL on every copy."""
