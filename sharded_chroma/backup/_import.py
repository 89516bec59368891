"""Import a chain of export files (one full export, then incremental ones in order) into any
topology, idempotently and resumably."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from chromadb.errors import NotFoundError

from .._errors import BackupFileError, ConfigurationError
from .._policies import HashPolicy, PolicyLike, build_policy
from ._files import Export, open_export
from ._format import Record

if TYPE_CHECKING:
    from .._client import ShardedClient
    from .._collection import ShardedCollection

__all__ = ["ImportReport", "import_collection"]


@dataclass(frozen=True)
class ImportReport:
    """What an import did (on a resumed run: what this run did)."""

    collection: str
    files: int
    records: int
    """Records written by this run."""
    deleted: int
    """Records removed because a later export of the chain no longer had them."""
    resumed: bool


def check_chain(files: Sequence[Export]) -> None:
    """One full export first, then each incremental export made ``--since`` the one before."""
    if not files:
        raise ValueError("give at least one export file")
    first = files[0]
    if first.header.get("since") is not None:
        raise BackupFileError(
            "is an incremental export: a chain starts with the full export it follows",
            path=first.name,
        )
    for before, after in itertools.pairwise(files):
        since = after.header.get("since")
        if since is None:
            raise BackupFileError(
                "is a full export; only the first file of a chain may be one", path=after.name
            )
        if since.get("export_id") != before.header.get("export_id"):
            raise BackupFileError(
                f"follows export {since.get('export_id')}, but the file before it "
                f"({before.name}) is export {before.header.get('export_id')}: the chain is out "
                "of order or has a gap",
                path=after.name,
            )
        if after.header.get("cluster_id") != first.header.get("cluster_id"):
            raise BackupFileError("is an export of another collection", path=after.name)


def _space(configuration: Any) -> str | None:
    if not isinstance(configuration, dict):
        return None
    for index in ("hnsw", "spann"):
        part = configuration.get(index)
        if isinstance(part, dict) and part.get("space"):
            return str(part["space"])
    return None


def _create_configuration(configuration: Any) -> dict[str, Any]:
    """The index settings of an exported configuration, as ``create_collection`` takes them
    (the embedding function is not restored: records carry their embeddings)."""
    out: dict[str, Any] = {}
    if isinstance(configuration, dict):
        for index in ("hnsw", "spann"):
            part = configuration.get(index)
            if isinstance(part, dict):
                out[index] = {k: v for k, v in part.items() if v is not None}
    return out


def _policy(head: dict[str, Any], given: PolicyLike | None) -> Any:
    if given is not None:
        return build_policy(given)
    exported = build_policy(head["policy"], source=f"policy of export {head['export_id']}")
    if isinstance(exported, HashPolicy):
        # Its slot table named the old shards; the same hash over the new topology's.
        return HashPolicy(field=exported.field, slots=exported.slots)
    return exported


class _Cursor:
    """Where a killed import stopped: file index and records applied in it."""

    def __init__(self, path: Path, chain: list[str], target: str) -> None:
        self.path = path
        self._key = {"chain": chain, "target": target}
        self.file = 0
        self.records = 0
        self.done = False
        self.found = False
        self.pending: list[str] = []
        """Ids the batch being written creates (absent from the target before it)."""
        self.target_id: str | None = None
        """The target collection's id: a cursor never resumes into another collection."""
        if path.exists():
            data = orjson.loads(path.read_bytes())
            if {k: data.get(k) for k in self._key} != self._key:
                raise BackupFileError(
                    "this import cursor belongs to another import (other files or target); "
                    "remove it to start again",
                    path=str(path),
                )
            self.file, self.records = int(data["file"]), int(data["records"])
            self.done = bool(data.get("done"))
            self.pending = list(data.get("pending") or [])
            self.target_id = data.get("target_id")
            self.found = True

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        state = {
            **self._key,
            "file": self.file,
            "records": self.records,
            "done": self.done,
            "pending": self.pending,
            "target_id": self.target_id,
        }
        tmp.write_bytes(orjson.dumps(state))
        os.replace(tmp, self.path)

    async def asave(self) -> None:
        await anyio.to_thread.run_sync(self.save)


async def _upsert(col: ShardedCollection, batch: list[Record], had: dict[str, Any]) -> None:
    """Upsert ``batch``; ``had`` maps the ids the target holds to (metadata, document, uri)."""
    rows: list[tuple[Record, Any]] = []
    for r in batch:
        meta = dict(r.metadata or {})
        # Upserts merge metadata: a key the exported record no longer has is removed (set
        # to None), so the target holds exactly the exported value.
        for key in (had[r.id][0] if r.id in had else None) or {}:
            meta.setdefault(key, None)
        rows.append((r, meta or None))
    # A column is sent for a whole call or not at all, so records are sent in runs that
    # agree on which columns they have (in file order: the target keeps the export's order).
    for _, run in itertools.groupby(
        rows, key=lambda row: (row[0].document is None, row[0].uri is None, row[1] is None)
    ):
        part = list(run)
        first, meta = part[0]
        await col.upsert(
            ids=[r.id for r, _ in part],
            embeddings=[r.embedding for r, _ in part],
            documents=None if first.document is None else [r.document or "" for r, _ in part],
            metadatas=None if meta is None else [m for _, m in part],
            uris=None if first.uri is None else [r.uri or "" for r, _ in part],
        )


async def _open_target(
    client: ShardedClient,
    name: str,
    head: dict[str, Any],
    policy: PolicyLike | None,
    file: str,
    dim: int | None,
) -> ShardedCollection:
    try:
        col = await client.get_collection(name, embedding_function=None)
    except NotFoundError:
        return await client.create_collection(
            name,
            configuration=_create_configuration(head.get("configuration")),  # type: ignore[arg-type]
            metadata=head.get("metadata") or None,
            embedding_function=None,
            policy=_policy(head, policy),
        )
    if policy is not None:
        raise ConfigurationError(
            f"collection {name!r} exists and keeps its own policy; import without a policy "
            "(or into a new name)"
        )
    theirs, ours = _space(head.get("configuration")), _space(col.configuration_json)
    if theirs and ours and theirs != ours:
        raise BackupFileError(
            f"its distance space is {theirs!r}, the existing collection {name!r} uses {ours!r}",
            path=file,
        )
    sample = await col.get(limit=1, include=["embeddings"])
    target_dim = None
    if sample["ids"] and sample["embeddings"] is not None:
        target_dim = len(sample["embeddings"][0])
    if dim is not None and target_dim is not None and dim != target_dim:
        raise BackupFileError(
            f"its embeddings have {dim} dimensions, the existing collection {name!r} has "
            f"{target_dim}",
            path=file,
        )
    return col


async def import_collection(
    client: ShardedClient,
    paths: Sequence[str | os.PathLike[str]],
    *,
    name: str | None = None,
    policy: PolicyLike | None = None,
    batch_size: int = 500,
    cursor: str | os.PathLike[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Restore a chain of exports; see ``ShardedClient.import_collection``."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    files = await anyio.to_thread.run_sync(lambda: [open_export(p) for p in paths])
    check_chain(files)
    head = files[0].header
    target = name or str(head["collection"])
    chain = [str(f.header["export_id"]) for f in files]
    where = Path(cursor) if cursor is not None else Path(f"{files[0].path}.{target}.cursor")
    state = await anyio.to_thread.run_sync(_Cursor, where, chain, target)
    dims = {f.dimension for f in files if f.dimension is not None}
    if len(dims) > 1:
        raise BackupFileError(
            f"the chain's files hold {sorted(dims)} dimensions", path=files[-1].name
        )
    if state.found:
        col = await _resumed_target(client, target, state)
        if state.done:
            return ImportReport(target, len(files), 0, 0, resumed=True)
    else:
        dim = next(iter(dims), None)
        col = await _open_target(client, target, head, policy, files[0].name, dim)
        state.target_id = str(col.id)
        await state.asave()
    if state.pending:
        # A killed run was writing the batch after the cursor: the records it would have
        # created go first, so the batch is written again in file order.
        await col.delete(ids=state.pending)
        state.pending = []
        await state.asave()
    resumed, written, deleted = state.found, 0, 0
    for index in range(state.file, len(files)):
        skip = state.records if index == state.file else 0
        state.file, state.records = index, skip
        # Ids an incremental export found present: the target keeps only those.
        present: set[str] | None = set() if index > 0 else None
        items = files[index].read(skip)
        while True:
            batch, lists, more = await anyio.to_thread.run_sync(_chunk, items, batch_size)
            if present is not None:
                for ids in lists:
                    present.update(ids)
            written += await _apply(col, batch, state, progress, written)
            if not more:
                break
        if present is not None:
            deleted += await _remove_absent(col, present, batch_size)
        state.file, state.records = index + 1, 0
        await state.asave()
    state.done = True
    await state.asave()
    return ImportReport(target, len(files), written, deleted, resumed)


def _chunk(
    items: Iterator[Record | list[str]], size: int
) -> tuple[list[Record], list[list[str]], bool]:
    """Up to ``size`` records from ``items`` (read in a worker thread, off the event loop),
    the id lists met on the way, and whether more may follow."""
    batch: list[Record] = []
    lists: list[list[str]] = []
    for item in items:
        if isinstance(item, list):
            lists.append(item)
            continue
        batch.append(item)
        if len(batch) >= size:
            return batch, lists, True
    return batch, lists, False


async def _resumed_target(client: ShardedClient, name: str, state: _Cursor) -> ShardedCollection:
    """The collection a cursor was left for, or an error: never resume into another one."""
    try:
        col = await client.get_collection(name, embedding_function=None)
    except NotFoundError:
        col = None
    if col is None or str(col.id) != state.target_id:
        now = "is gone" if col is None else f"is another collection (id {col.id})"
        raise BackupFileError(
            f"was left by an import into {name!r} (id {state.target_id}), which {now}; "
            "remove the cursor to import from the start",
            path=str(state.path),
        )
    return col


async def _apply(
    col: ShardedCollection,
    batch: list[Record],
    state: _Cursor,
    progress: Callable[[int], None] | None,
    before: int,
) -> int:
    """Write ``batch`` (emptied), then move the cursor past it; returns how many."""
    if not batch:
        return 0
    n = len(batch)
    current = await col.get(ids=[r.id for r in batch], include=["metadatas", "documents", "uris"])
    none: list[Any] = [None] * len(current["ids"])
    had = {
        rid: (meta, doc, uri)
        for rid, meta, doc, uri in zip(
            current["ids"],
            current["metadatas"] or none,
            current["documents"] or none,
            current["uris"] or none,
            strict=True,
        )
    }
    # An upsert cannot take a document or uri away: a record the export holds without one
    # that the target has is written anew (it counts as created below).
    stale = [
        r.id
        for r in batch
        if r.id in had
        and ((r.document is None and had[r.id][1] is not None) or (r.uri is None and had[r.id][2]))
    ]
    state.pending = [r.id for r in batch if r.id not in had or r.id in stale]
    await state.asave()
    if stale:
        await col.delete(ids=stale)
        for rid in stale:
            del had[rid]
    await _upsert(col, batch, had)
    batch.clear()
    state.records += n
    state.pending = []
    await state.asave()
    if progress is not None:
        progress(before + n)
    return n


async def _remove_absent(col: ShardedCollection, present: set[str], batch_size: int) -> int:
    """Delete what the target holds that the incremental export's collection no longer had."""
    gone: list[str] = []
    async for page in col.scan(batch_size=max(batch_size, 1000), include=[]):
        gone.extend(rid for rid in page["ids"] if rid not in present)
    for start in range(0, len(gone), batch_size):
        with contextlib.suppress(NotFoundError):
            await col.delete(ids=gone[start : start + batch_size])
    return len(gone)
