"""Keeping a write for a copy that missed it: the hint log, or, when the log cannot keep it,
a needs-repair mark on the copy."""

from __future__ import annotations

import logging

import anyio.to_thread
import orjson

from ._errors import ControlUnavailableError, NodeUnavailableError
from ._hints import HintLog
from ._node import HintTarget
from ._nodeconfig import redact_url
from ._nodestate import NodeStates
from .catalog._state import VERSION_KEY

__all__ = ["keep_for"]

logger = logging.getLogger("sharded_chroma.replicas")


async def keep_for(
    log: HintLog,
    states: NodeStates,
    shard: str,
    url: str,
    target: HintTarget,
    content: bytes,
    *,
    reason: str,
    path: str | None,
) -> BaseException:
    """Keep ``content`` for the copy at ``url``; returns the failure to report for that copy
    (a ``NodeUnavailableError`` saying the write was kept, or why it could not be)."""
    try:
        await anyio.to_thread.run_sync(
            lambda: log.append(
                url,
                target.tenant,
                target.database,
                target.collection_id,
                target.collection_name,
                target.op,
                content,
                version=_order_version(target.version, content),
                deleted_ids=target.deleted_ids,
                deleted_version=target.deleted_version,
                path=path,
            )
        )
    except Exception as exc:  # full, or the disk failed: the write is lost for this copy
        logger.error(
            "shard %s node %s: missed %s not kept (%s); the node serves no reads until "
            "`sharded-chroma repair`",
            shard,
            url,
            target.op,
            exc,
        )
        try:
            await anyio.to_thread.run_sync(
                states.mark_needs_repair, url, f"missed {target.op} not kept: {exc}"
            )
        except ControlUnavailableError as unshared:
            return _unshared(shard, url, unshared)
        return exc
    states.changed()
    try:
        # Before the write is acknowledged: a host that does not know the copy is behind
        # would read from it and miss this write.
        await anyio.to_thread.run_sync(states.publish, url)
    except ControlUnavailableError as exc:
        return _unshared(shard, url, exc)
    return NodeUnavailableError(
        shard=shard, node=url, attempts=[f"{reason}; write kept in the hint log"]
    )


def _order_version(version: int | None, content: bytes) -> int | None:
    """A delete's own version; for a record write the lowest version it stamps, so hints of
    one node can be replayed in version order across hosts (replay uses it for deletes only;
    the records carry their own)."""
    if version is not None:
        return version
    try:
        metas = orjson.loads(content).get("metadatas")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    stamped = [
        m[VERSION_KEY]
        for m in metas or ()
        if isinstance(m, dict) and isinstance(m.get(VERSION_KEY), int)
    ]
    return min(stamped) if stamped else None


def _unshared(shard: str, url: str, exc: ControlUnavailableError) -> ControlUnavailableError:
    """The failure to report when a copy's miss was kept here but other hosts cannot be told:
    the write must not be acknowledged."""
    logger.error(
        "shard %s node %s: behind, but other hosts cannot be told: %s", shard, redact_url(url), exc
    )
    unshared = ControlUnavailableError(
        f"the write was kept for node {redact_url(url)} of shard {shard} in this host's hint "
        "log, but other hosts cannot be told that node is behind, so the write is not "
        "acknowledged (retrying it is safe)",
        backend=exc.backend,
        endpoint=exc.endpoint,
    )
    unshared.__cause__ = exc
    return unshared
