"""The sync client: chromadb's ``HttpClient`` shape over the async core, run on a portal loop."""

from ._client import HttpClient, SyncShardedClient
from ._collection import SyncShardedCollection

__all__ = ["HttpClient", "SyncShardedClient", "SyncShardedCollection"]
