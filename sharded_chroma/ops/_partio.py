"""The one seam every record request to a part passes through: path resolution, the replica
set's read (selection, failover) or write (concern, hints), and the missing-bucket rule.

Telemetry spans and epoch checks of later changes belong here, once, rather than at each
caller."""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from chromadb.errors import NotFoundError

from .._fanout import fan_out, raise_for_failures
from .._node import HintTarget, Node
from .._options import current_options
from ..catalog._generations import generation_state
from ..catalog._layouts import Target
from ..catalog._physical import PhysicalIds
from ..catalog._reserved import visible_metadata
from ..catalog._state import VERSION_KEY
from ..cluster._cluster import Cluster
from ..control._maps import PartitionMap
from ..control._served import check_write_lease, served_map
from ._clock import HybridClock
from ._genmirror import READ_BACK, generation_split, split_by
from ._migrating import filtered, split_write
from ._seqpages import seq_pages

__all__ = ["GET_PAGE", "PartIO", "Removal", "at_generation"]

T = TypeVar("T")

# Well under the 32,766 records a Chroma 1.5.9 server can return from one get.
GET_PAGE = 10_000


@dataclass(frozen=True)
class Removal:
    """Ids a delete surely removes: every copy of them (``version`` None: up to the delete's
    own version), or only the copy stamped ``version``."""

    ids: tuple[str, ...]
    version: int | None = None


def at_generation(target: Target, generation: int) -> Target:
    """``target``'s part in another generation of physical collections (same shard)."""
    return Target(target.shard, generation_state(target.state, generation), target.ids)


def _served(target: Target) -> Target:
    """The part a served call means by ``target``: the root's at the map's generation. A
    target already naming a generation (the migrator's, unserved) is taken as it is."""
    state = target.state
    if state.generation or state.bucket is not None:
        return target
    served = served_map(state)
    if served is None or not served.generation:
        return target
    return at_generation(target, served.generation)


class PartIO:
    """Reads and writes of one part (a physical collection on one shard).

    Under a map past generation 0 (after a rebuild), a root part is read and written at the
    map's generation; while a rebuild mirrors, writes go to the same shard's part at the other
    generation too."""

    def __init__(self, cluster: Cluster, physical: PhysicalIds, clock: HybridClock) -> None:
        self._cluster = cluster
        self._physical = physical
        self._clock = clock

    async def read(self, target: Target, suffix: str, body: Any, *, raw: bool = False) -> Any:
        """POST a read to one caught-up copy of the part's shard (with failover). While the
        collection migrates, copies the phase hides are filtered out (see ``control._maps``),
        unless ``raw``."""
        target = _served(target)
        state = target.state
        served = served_map(state)
        if served is not None and served.hides_on(target.shard) and not raw:
            body = filtered(body, served)

        async def op(node: Node) -> Any:
            path = await self._physical.node_path(state, node, suffix)
            return await node.transport.request("POST", path, body=body)

        return await self._cluster.shards[target.shard].read(op)

    async def count(self, target: Target) -> int:
        target = _served(target)
        state = target.state
        served = served_map(state)
        if served is not None and served.hides_on(target.shard):
            return await self._count_visible(target, served)

        async def op(node: Node) -> Any:
            path = await self._physical.node_path(state, node, "/count")
            return await node.transport.request("GET", path)

        return int(await self._cluster.shards[target.shard].read(op))

    async def _count_visible(self, target: Target, served: PartitionMap) -> int:
        """A migrating part's count: Chroma counts with no filter, so what the phase hides is
        counted by id and taken off (one id page per 10,000 hidden records)."""
        filt = served.read_filter()
        assert filt is not None
        ((key, cond),) = filt.items()
        hidden = 0
        hidden_body = {"where": {key: cond["$ne"]}, "include": []}
        async for page in self.pages(target, hidden_body, raw=True):
            hidden += len(page["ids"])
        state = target.state

        async def op(node: Node) -> Any:
            path = await self._physical.node_path(state, node, "/count")
            return await node.transport.request("GET", path)

        total = int(await self._cluster.shards[target.shard].read(op))
        return max(0, total - hidden)

    async def page(
        self, target: Target, body: Mapping[str, Any], sticky: dict[str, Node], *, raw: bool = False
    ) -> dict[str, Any]:
        """One page of a get, from the copy in ``sticky[target.key]`` while it answers
        (offsets are positions in one node's stored order); the copy that answered is kept
        there for the next page."""
        target = _served(target)
        state = target.state
        served = served_map(state)
        if served is not None and served.hides_on(target.shard) and not raw:
            body = filtered(body, served)

        async def op(node: Node) -> Any:
            path = await self._physical.node_path(state, node, "/get")
            answer = await node.transport.request("POST", path, body=body)
            sticky[target.key] = node
            return answer

        rs = self._cluster.shards[target.shard]
        page: dict[str, Any] = await rs.read(op, prefer=sticky.get(target.key))
        return page

    async def pages(
        self,
        target: Target,
        body: Mapping[str, Any],
        page_size: int | None = None,
        *,
        raw: bool = False,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """One part's get() as pages of at most ``page_size`` records in (seq, id) order,
        keyed by sequence ranges, so any copy may answer any page and concurrent deletes
        shift nothing (see ``_seqpages``); ``body["limit"]``, if set, bounds the total.

        A Chroma 1.5.9 server refuses a get matching more than 32,766 records ("too many SQL
        variables"), which a whole-collection get() of a large shard would hit. Results that
        fit one page are a single request.
        """
        size = GET_PAGE if page_size is None else page_size

        async def read(b: Mapping[str, Any]) -> Mapping[str, Any]:
            answer: Mapping[str, Any] = await self.read(target, "/get", b, raw=raw)
            return answer

        async def sticky_read(b: Mapping[str, Any], sticky: dict[str, Any]) -> Mapping[str, Any]:
            return await self.page(target, b, sticky, raw=raw)

        async for page in seq_pages(read, sticky_read, body, size):
            yield page

    async def write(
        self, target: Target, op: str, body: Any, *, removes: Removal | None = None
    ) -> Any:
        """Send a write to every copy of the part's shard under the call's write concern.

        A delete that surely removes some ids says so in ``removes``: a copy that misses it
        keeps them as tombstones until it has it.

        While a migration mirrors writes (``dual``, ``cutover``), records the other policy
        places on other shards are sent there too (see ``_migrating.split_write``); the write
        succeeds only when every one of those requests does."""
        check_write_lease(target.state)
        root, target = target, _served(target)
        served = served_map(target.state)
        if served is not None and root.state.bucket is None and not root.state.generation:
            mirrored = served.mirror_generation()
            if mirrored is not None:
                assert served.other is not None
                how, homes = generation_split(op, root.shard, body, served.policy, served.other)
                if how == READ_BACK:
                    answer = await self._write_one(target, op, body, removes)
                    await self._mirror_as_written(target, root, body, mirrored, served.other)
                    return answer
                shares = {
                    s: (at_generation(Target(s, root.state), mirrored), part)
                    for s, part in homes.items()
                }
                return await self._write_both(target, op, body, removes, shares, how)
        if served is None or served.mirror_policy() is None:
            return await self._write_one(target, op, body, removes)
        own, mirrors = split_write(op, target.shard, body, served, target.state.bucket)
        if not mirrors:
            return await self._write_one(target, op, own, removes)

        def removal_of(part: Mapping[str, Any]) -> Removal | None:
            if removes is None or not part.get("ids"):
                return None
            mine = set(part["ids"])
            return Removal(tuple(i for i in removes.ids if i in mine), removes.version)

        async def mirror(shard: str, part: Mapping[str, Any]) -> Any:
            try:
                return await self._write_one(
                    Target(shard, target.state), op, part, removal_of(part)
                )
            except NotFoundError:
                # A time bucket not made at its other place: a delete or an update finds
                # nothing to change there (writes that create records make it first).
                if op not in ("delete", "update") or target.state.bucket is None:
                    raise
                return None

        calls = {target.shard: functools.partial(self._write_one, target, op, own, removes)}
        for shard, part in mirrors.items():
            calls[shard] = functools.partial(mirror, shard, part)
        answers, failures = await fan_out(calls)
        raise_for_failures(op, failures, all_failed=len(failures) == len(calls))
        return answers[target.shard]

    async def _write_both(
        self,
        target: Target,
        op: str,
        body: Any,
        removes: Removal | None,
        mirrors: Mapping[str, tuple[Target, Mapping[str, Any]]],
        mirror_op: str,
    ) -> Any:
        """A write while a move fills a new generation: the request to the part and its
        share to each part of the other generation (``_genmirror``), done only when every
        one is (a delete's count is the served part's)."""
        calls = {}
        for shard, (part, share) in mirrors.items():
            mine = removes
            if removes is not None and share.get("ids") is not body.get("ids"):
                held = set(share.get("ids") or ())
                mine = Removal(tuple(i for i in removes.ids if i in held), removes.version)
            calls[f"{shard}@{part.state.generation}"] = functools.partial(
                self._write_one, part, mirror_op, share, mine
            )
        # Ordered so that another process, which can only act on what the served part shows,
        # acts after the mirror: a write reaches the other generation first, a delete second.
        # (Concurrent, a delete that located the new copy could reach the other generation
        # before the write did, and leave it there.)
        if op != "delete":
            _, failures = await fan_out(calls)
            raise_for_failures(op, failures, all_failed=len(failures) == len(calls))
        answer = await self._write_one(target, op, body, removes)
        if op == "delete":
            _, failures = await fan_out(calls)
            raise_for_failures(op, failures)
        return answer

    async def _mirror_as_written(
        self, target: Target, root: Target, sent: Mapping[str, Any], generation: int, other: Any
    ) -> None:
        """Mirror an update of routing fields from its records as written (this process
        holds their ids' locks): each upserted whole at its place under ``other``, and
        copies older than it deleted from that policy's other shards."""
        ids = list(sent["ids"])
        read = {"ids": ids, "include": ["embeddings", "metadatas", "documents", "uris"]}
        found = await self.read(target, "/get", read, raw=True)
        if not found["ids"]:
            return
        metas = found.get("metadatas") or [None] * len(found["ids"])
        homes = [
            other.place(i, visible_metadata(m)).shard
            for i, m in zip(found["ids"], metas, strict=True)
        ]
        versions = [int((m or {}).get(VERSION_KEY) or 0) for m in metas]
        body = {k: found.get(k) for k in ("ids", "embeddings", "metadatas", "documents", "uris")}
        calls = {}
        for shard, share in split_by(body, homes).items():
            part = at_generation(Target(shard, root.state), generation)
            calls[shard] = functools.partial(self._write_one, part, "upsert", share, None)
        _, failures = await fan_out(calls)
        raise_for_failures("update", failures, all_failed=len(failures) == len(calls))
        # Older than every version written here: never a newer write of another process.
        older = {"$lt": min(versions)} if min(versions) else None
        deletes = {}
        for shard in sorted(other.shards_named()):
            away = [i for i, home in zip(found["ids"], homes, strict=True) if home != shard]
            if away and older is not None:
                part = at_generation(Target(shard, root.state), generation)
                body = {"ids": away, "where": {VERSION_KEY: older}}
                deletes[shard] = functools.partial(self._write_one, part, "delete", body, None)
        _, failures = await fan_out(deletes)
        raise_for_failures("update", failures, all_failed=len(failures) == len(deletes))
        # A delete of another process that took the records from this part after they were
        # read back may have reached the other generation before the copies above: take
        # those copies back (each only while it is the one written).
        still = await self.read(
            target, "/get", {"ids": list(found["ids"]), "include": []}, raw=True
        )
        for rid, home, version in zip(found["ids"], homes, versions, strict=True):
            if rid not in set(still["ids"]) and version:
                part = at_generation(Target(home, root.state), generation)
                body = {"ids": [rid], "where": {VERSION_KEY: version}}
                await self._write_one(part, "delete", body, None)

    async def _write_one(self, target: Target, op: str, body: Any, removes: Removal | None) -> Any:
        state = target.state
        content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        version: int | None = None
        deleted: tuple[str, ...] = ()
        deleted_version: int | None = None
        if op == "delete":
            # A copy that misses this delete gets it replayed later: it must then remove only
            # what is no newer than the delete.
            version = self._clock.reserve()
            if removes is not None:
                deleted = removes.ids
                deleted_version = version if removes.version is None else removes.version
        hint = HintTarget(
            state.tenant,
            state.database,
            str(state.id),
            state.name,
            op,
            version,
            deleted,
            deleted_version,
        )
        concern = current_options().write_concern or self._cluster.replication.write_concern
        return await self._cluster.shards[target.shard].write(
            lambda node: self._physical.node_path(state, node, f"/{op}"),
            content,
            hint,
            concern,
            known_path=lambda node: self._physical.known_path(state, node, f"/{op}"),
        )

    async def guarded(self, target: Target, read: Callable[[], Awaitable[T]]) -> T | None:
        """Run one read of a part. A time bucket that does not exist (never made, or dropped
        since it was listed) reads as None; one dropped and made again has new physical ids,
        learnt again by name, once."""
        known = bool(target.state.physical)
        try:
            return await read()
        except NotFoundError:
            if target.state.bucket is None:
                raise
            if not known:
                return None  # looked up by name just now: the bucket does not exist
        self._physical.forget(target.state)
        try:
            return await read()
        except NotFoundError:
            return None
