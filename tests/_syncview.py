"""An awaitable face over the sync client, so suites written against the async client also
run through ``sharded_chroma.HttpClient`` and chromadb's sync ``Collection``.

Each method call runs in a worker thread (``anyio.to_thread``), so concurrent tasks of a test
become concurrent threads calling the sync client, as LangChain's executor does. Collections
and lists of collections come back wrapped; plain attributes (``name``, ``id``, ...) pass
through. Private attributes a test reads on a client (``_runtime``) are the async core's.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio

import sharded_chroma

__all__ = ["SyncView", "sync_client"]


def _wrapped(value: Any) -> Any:
    if isinstance(value, (sharded_chroma.SyncShardedClient, sharded_chroma.SyncShardedCollection)):
        return SyncView(value)
    if (
        isinstance(value, Sequence)
        and value
        and isinstance(value[0], sharded_chroma.SyncShardedCollection)
    ):
        return [SyncView(v) for v in value]
    return value


class SyncView:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @property
    def wrapped(self) -> Any:
        """The sync object behind the view."""
        return self._inner

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__["_inner"]
        if name == "_runtime" and isinstance(inner, sharded_chroma.SyncShardedClient):
            return inner._inner._runtime
        attr = getattr(inner, name)
        if name == "scan":
            return functools.partial(self._scan, attr)
        if not callable(attr) or name in ("node_stats", "metrics"):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = await anyio.to_thread.run_sync(functools.partial(attr, *args, **kwargs))
            return _wrapped(result)

        return call

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self._inner.close)

    async def __aenter__(self) -> SyncView:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @staticmethod
    async def _scan(scan: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        pages = scan(*args, **kwargs)
        done = object()
        try:
            while (page := await anyio.to_thread.run_sync(next, pages, done)) is not done:
                yield page
        finally:
            await anyio.to_thread.run_sync(pages.close)

    def __repr__(self) -> str:
        return f"SyncView({self._inner!r})"


async def sync_client(*args: Any, **kwargs: Any) -> SyncView:
    """``AsyncHttpClient``'s stand-in: the sync client, built in a worker thread."""
    client = await anyio.to_thread.run_sync(
        functools.partial(sharded_chroma.HttpClient, *args, **kwargs)
    )
    return SyncView(client)
