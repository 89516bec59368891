"""The control store in etcd (v3 API, through the maintained ``aetcd`` client): for clusters used
from more than one host.

Keys live under a namespace prefix, so one etcd can serve several clusters. Compare-and-swap
is one etcd transaction comparing the key's ``mod_revision`` (or ``create_revision == 0`` for
"must not exist"); leases are etcd leases, counted in whole seconds; ``wait`` is a watch from
the given revision. Several endpoints are tried in turn when one does not answer.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio

from .._errors import ClientClosedError, ConfigurationError, ControlUnavailableError
from ._backend import ANY, AnyRevision, Entry
from ._grpcloop import on_grpc_loop

__all__ = ["EtcdControl"]

_T = TypeVar("_T")


def _split(endpoint: str) -> tuple[str, int]:
    text = endpoint.split("://", 1)[-1].rstrip("/")
    if "@" in text:
        # Never echoed: it may hold a password. Credentials go in username / password_env.
        raise ConfigurationError(
            "an etcd endpoint must not carry credentials; use username and password_env"
        )
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigurationError(f"etcd endpoint {endpoint!r} must be host:port")
    return host.strip("[]"), int(port)


class EtcdControl:
    """A ``ControlBackend`` on etcd. Needs the ``etcd`` extra (``pip install
    'sharded-chroma[etcd]'``)."""

    name = "etcd"

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        namespace: str = "/sharded-chroma/",
        timeout: float = 5.0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        try:
            import aetcd
        except ImportError as exc:
            raise ConfigurationError(
                "the etcd control store needs the aetcd package: pip install 'sharded-chroma[etcd]'"
            ) from exc
        if not endpoints:
            raise ConfigurationError("the etcd control store needs at least one endpoint")
        self._aetcd: Any = aetcd
        self._addresses = [_split(e) for e in endpoints]
        self.endpoint = ",".join(f"{h}:{p}" for h, p in self._addresses)
        self._ns = namespace
        self._timeout = timeout
        self._credentials = (username, password)
        self._current = 0
        self._client: Any = None
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------------

    def _connect(self) -> Any:
        if self._closed:
            raise ClientClosedError("control store used after aclose()")
        if self._client is None:
            host, port = self._addresses[self._current]
            user, password = self._credentials
            self._client = self._aetcd.Client(
                host=host,
                port=port,
                username=user,
                password=password,
                timeout=max(1, math.ceil(self._timeout)),
            )
        return self._client

    async def _drop(self, client: Any) -> None:
        if self._client is client:
            self._client = None
            self._current = (self._current + 1) % len(self._addresses)
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            await client.close()

    async def _call(self, fn: Callable[[Any], Awaitable[_T]], *, bounded: bool = True) -> _T:
        """``fn(client)`` with failover: each endpoint once, then the last error, wrapped.
        ``bounded``: give up on an endpoint after the timeout (off for watches, which the
        caller bounds). Runs on the process's etcd loop (see ``_grpcloop``)."""
        # Per endpoint: the call, then up to 2 s closing its channel; a little slack on top.
        limit = (self._timeout + 3.0) * len(self._addresses) + 1.0 if bounded else None
        try:
            return await on_grpc_loop(lambda: self._call_here(fn, bounded), limit=limit)
        except TimeoutError as exc:
            raise ControlUnavailableError(
                f"no answer within {limit:.0f} s", backend=self.name, endpoint=self.endpoint
            ) from exc

    async def _call_here(self, fn: Callable[[Any], Awaitable[_T]], bounded: bool) -> _T:
        errors = self._aetcd.exceptions
        unreachable = (
            errors.ConnectionFailedError,
            errors.ConnectionTimeoutError,
            TimeoutError,
            OSError,
        )
        last: BaseException | None = None
        for _ in self._addresses:
            client = self._connect()
            try:
                with anyio.fail_after(self._timeout + 1.0 if bounded else None):
                    return await fn(client)
            except unreachable as exc:
                last = exc
                await self._drop(client)
            except errors.UnauthenticatedError as exc:
                await self._drop(client)
                raise ControlUnavailableError(
                    "authentication refused", backend=self.name, endpoint=self.endpoint
                ) from exc
            except errors.ClientError as exc:
                # A watch that timed out or a stream the server cut can leave the connection
                # unusable: the next call starts on a fresh one.
                await self._drop(client)
                raise ControlUnavailableError(
                    f"{type(exc).__name__}: {exc}", backend=self.name, endpoint=self.endpoint
                ) from exc
        raise ControlUnavailableError(
            f"no endpoint answered ({type(last).__name__}: {last})",
            backend=self.name,
            endpoint=self.endpoint,
        ) from last

    def _key(self, key: str) -> bytes:
        return (self._ns + key).encode()

    def _entry(self, kv: Any) -> Entry:
        return Entry(
            kv.key.decode()[len(self._ns) :],
            bytes(kv.value),
            int(kv.mod_revision),
            int(kv.lease) or None,
        )

    # -- the interface ----------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        kv = await self._call(lambda c: c.get(self._key(key)))
        return None if kv is None else self._entry(kv)

    async def list(self, prefix: str) -> list[Entry]:
        found = await self._call(lambda c: c.get_prefix(self._key(prefix)))
        return sorted((self._entry(kv) for kv in found), key=lambda e: e.key)

    async def put(
        self,
        key: str,
        value: bytes,
        *,
        expect: int | AnyRevision | None = ANY,
        lease: int | None = None,
    ) -> int | None:
        raw = self._key(key)

        async def run(client: Any) -> int | None:
            tx = client.transactions
            compare = []
            if expect is None:
                compare.append(tx.create(raw) == 0)
            elif expect is not ANY:
                compare.append(tx.mod(raw) == expect)
            try:
                ok, responses = await client.transaction(
                    compare=compare, success=[tx.put(raw, value, lease)], failure=[]
                )
            except self._aetcd.exceptions.ClientError as exc:
                if "lease not found" in str(exc):
                    return None
                raise
            if not ok:
                return None
            return int(responses[0].response_put.header.revision)

        return await self._call(run)

    async def delete(self, key: str, *, expect: int | AnyRevision | None = ANY) -> bool:
        if expect is None:
            return False
        raw = self._key(key)

        async def run(client: Any) -> bool:
            tx = client.transactions
            compare = [] if expect is ANY else [tx.mod(raw) == expect]
            ok, responses = await client.transaction(
                compare=compare, success=[tx.delete(raw)], failure=[]
            )
            return bool(ok) and int(responses[0].response_delete_range.deleted) > 0

        return await self._call(run)

    async def grant(self, ttl: float) -> int:
        if not ttl > 0:
            raise ValueError(f"a lease needs a positive ttl, got {ttl}")
        lease = await self._call(lambda c: c.lease(max(1, math.ceil(ttl))))
        return int(lease.id)

    async def refresh(self, lease: int) -> bool:
        reply = await self._call(lambda c: c.refresh_lease(lease))
        return reply is not None and int(reply.TTL) > 0

    async def revoke(self, lease: int) -> None:
        async def run(client: Any) -> None:
            try:
                await client.revoke_lease(lease)
            except self._aetcd.exceptions.ClientError as exc:
                if "lease not found" not in str(exc):
                    raise

        await self._call(run)

    async def revision(self) -> int:
        # A range over one key nobody writes: its answer carries the header.
        probe, end = self._key("\x00"), self._key("\x00\x00")
        found = await self._call(lambda c: c.get_range(probe, end))
        return int(found.header.revision)

    async def wait(self, prefix: str, after: int, within: float) -> int:
        errors = self._aetcd.exceptions

        async def watch(client: Any) -> None:
            watcher = await client.watch_prefix(self._key(prefix), start_revision=after + 1)
            try:
                async for _ in watcher:
                    return
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                    await watcher.cancel()

        with anyio.move_on_after(within):
            try:
                await self._call(watch, bounded=False)
            except ControlUnavailableError as exc:
                if not isinstance(exc.__cause__, errors.RevisionCompactedError):
                    raise
        return await self.revision()

    async def aclose(self) -> None:
        self._closed = True

        async def close() -> None:
            client, self._client = self._client, None
            if client is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                    await client.close()

        with anyio.CancelScope(shield=True):
            await on_grpc_loop(close, limit=3.0)
