"""Export one collection to a file, full or incremental, through the copy-proof scan."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import BackupFileError
from ._files import Writer, export_writer, open_export
from ._format import Record

if TYPE_CHECKING:
    from .._client import ShardedClient

__all__ = ["SINCE_MARGIN", "ExportReport", "export_collection"]

SINCE_MARGIN = 60.0
"""Seconds before the previous export's start that an incremental export still takes: a write
stamps its version when it begins, so one under way while the previous export read its part
can carry a version older than that export's start. Taking it twice is harmless (imports are
idempotent)."""

_INCLUDE: Any = ["embeddings", "documents", "metadatas", "uris"]


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote."""

    path: str
    export_id: str
    records: int
    """Records written (under ``since``: those changed after the previous export)."""
    scanned: int
    """Records read from the cluster."""
    incremental: bool


def _same_path(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _records(page: Any, floor: int | None) -> list[Record]:
    """A scan page's records, without those older than ``floor`` (an incremental export)."""
    stamps: list[tuple[Any, Any]] = page["stamps"]
    embeddings, documents = page["embeddings"], page["documents"]
    metadatas, uris = page["metadatas"], page["uris"]
    out = []
    for i, rid in enumerate(page["ids"]):
        seq, ver = stamps[i]
        # A record without a version was written outside this library: always taken.
        if floor is not None and isinstance(ver, int) and ver < floor:
            continue
        out.append(
            Record(
                rid,
                None if embeddings is None else embeddings[i],
                None if documents is None else documents[i],
                None if metadatas is None else metadatas[i],
                None if uris is None else uris[i],
                seq if isinstance(seq, int) else None,
                ver if isinstance(ver, int) else None,
            )
        )
    return out


def _write_page(writer: Writer, records: list[Record], present: list[str] | None) -> None:
    for rec in records:
        writer.record(rec)
    if present is not None:
        writer.present(present)


async def export_collection(
    client: ShardedClient,
    name: str,
    path: str | os.PathLike[str],
    *,
    since: str | os.PathLike[str] | None = None,
    batch_size: int = 1000,
    progress: Callable[[int], None] | None = None,
    since_margin: float = SINCE_MARGIN,
) -> ExportReport:
    """Write collection ``name`` to ``path``; see ``ShardedClient.export_collection``."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not since_margin >= 0:
        raise ValueError(f"since_margin must be a number of seconds >= 0, got {since_margin!r}")
    if since is not None and _same_path(since, path):
        raise ValueError(
            f"the export would overwrite {since}, the export it follows; write it elsewhere"
        )
    runtime = client._live()
    tenant, database = client.tenant, client.database
    model = await runtime.catalog.get_collection(name, tenant, database)
    state = await runtime.catalog.state(model.id, tenant, database)
    previous = None if since is None else await anyio.to_thread.run_sync(open_export, since)
    if previous is not None and previous.header.get("cluster_id") != str(model.id):
        raise BackupFileError(
            f"is an export of another collection ({previous.header.get('collection')!r}, "
            f"id {previous.header.get('cluster_id')}), not of {name!r}",
            path=previous.name,
        )
    floor = None
    if previous is not None:
        floor = int(previous.header["started_us"]) - int(since_margin * 1_000_000)
    export_id = uuid.uuid4().hex
    header = {
        "export_id": export_id,
        "collection": name,
        "cluster_id": str(model.id),
        "metadata": model.metadata,
        "configuration": model.configuration_json,
        "policy": state.policy.model_dump(mode="json"),
        "started_us": time.time_ns() // 1000,
        "since": None if previous is None else {"export_id": previous.header["export_id"]},
    }
    writer = await anyio.to_thread.run_sync(export_writer, path, header)
    scanned = 0
    try:
        pages = runtime.server.scan(
            model.id,
            batch_size=batch_size,
            where=None,
            where_document=None,
            include=_INCLUDE,
            tenant=tenant,
            database=database,
            stamps=True,
        )
        async for page in pages:
            records = _records(page, floor)
            ids = page["ids"]
            # Encoding and writing run off the event loop (the sync client's loop is shared
            # by every thread using it).
            await anyio.to_thread.run_sync(
                _write_page, writer, records, ids if previous is not None else None
            )
            scanned += len(ids)
            if progress is not None:
                progress(scanned)
        await anyio.to_thread.run_sync(writer.finish)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(writer.abort)
        raise
    return ExportReport(str(path), export_id, writer.records, scanned, previous is not None)
