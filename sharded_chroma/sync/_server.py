"""The server contract for chromadb's sync ``Collection``: each call is the async adapter's,
run on the client's portal loop. Nothing here decides anything; it only changes threads."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any

from chromadb.api.types import GetResult

from ..api._server import ShardedServer
from ._portal import Portal

__all__ = ["SyncServer"]


class SyncServer:
    """What chromadb's ``Collection`` calls on its client, plus the sharded additions
    ``SyncShardedCollection`` makes, forwarded to one ``ShardedServer`` through a portal."""

    def __init__(
        self,
        portal: Portal,
        server: ShardedServer,
        max_batch_size: Callable[[], Awaitable[int]],
    ) -> None:
        self._portal = portal
        self._server = server
        self._max_batch_size = max_batch_size

    # -- chromadb's Collection ---------------------------------------------------------------

    def _add(self, *args: Any, **kwargs: Any) -> bool:
        return self._portal.call(self._server._add, *args, **kwargs)

    def _upsert(self, *args: Any, **kwargs: Any) -> bool:
        return self._portal.call(self._server._upsert, *args, **kwargs)

    def _update(self, *args: Any, **kwargs: Any) -> bool:
        return self._portal.call(self._server._update, *args, **kwargs)

    def _delete(self, *args: Any, **kwargs: Any) -> Any:
        return self._portal.call(self._server._delete, *args, **kwargs)

    def _get(self, *args: Any, **kwargs: Any) -> GetResult:
        return self._portal.call(self._server._get, *args, **kwargs)

    def _peek(self, *args: Any, **kwargs: Any) -> GetResult:
        return self._portal.call(self._server._peek, *args, **kwargs)

    def _count(self, *args: Any, **kwargs: Any) -> int:
        return self._portal.call(self._server._count, *args, **kwargs)

    def _query(self, *args: Any, **kwargs: Any) -> Any:
        return self._portal.call(self._server._query, *args, **kwargs)

    def _modify(self, *args: Any, **kwargs: Any) -> None:
        self._portal.call(self._server._modify, *args, **kwargs)

    def _fork(self, *args: Any, **kwargs: Any) -> Any:
        return self._portal.call(self._server._fork, *args, **kwargs)

    def _fork_count(self, *args: Any, **kwargs: Any) -> Any:
        return self._portal.call(self._server._fork_count, *args, **kwargs)

    def _search(self, *args: Any, **kwargs: Any) -> Any:
        return self._portal.call(self._server._search, *args, **kwargs)

    def _get_indexing_status(self, *args: Any, **kwargs: Any) -> Any:
        return self._portal.call(self._server._get_indexing_status, *args, **kwargs)

    def attach_function(self, *args: Any, **kwargs: Any) -> Any:
        return self._server.attach_function(*args, **kwargs)

    def detach_function(self, *args: Any, **kwargs: Any) -> Any:
        return self._server.detach_function(*args, **kwargs)

    def get_attached_function(self, *args: Any, **kwargs: Any) -> Any:
        return self._server.get_attached_function(*args, **kwargs)

    def get_max_batch_size(self) -> int:
        """chromadb's ``create_batches(api=collection._client, ...)`` asks the collection's
        client; LangChain does so."""
        return self._portal.call(self._max_batch_size)

    # -- additions of SyncShardedCollection --------------------------------------------------

    def scan(self, **kwargs: Any) -> Generator[GetResult, None, None]:
        return self._portal.iterate(lambda: self._server.scan(**kwargs))

    def policy(self, *args: Any) -> Any:
        return self._portal.call(self._server.policy, *args)

    def drop_partitions(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return self._portal.call(self._server.drop_partitions, *args, **kwargs)
