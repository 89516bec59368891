"""Local clusters of real Chroma servers (``chroma run`` from the chromadb wheel), for tests,
the demo and benchmarks: each server on a free loopback port with its own data directory,
stopped by its pid."""

from ._cluster import LocalCluster
from ._ports import find_free_port
from ._server import LocalChromaServer

__all__ = ["LocalChromaServer", "LocalCluster", "find_free_port"]
