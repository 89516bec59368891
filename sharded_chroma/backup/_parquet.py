"""The export file as Parquet (``pyarrow``, the ``parquet`` extra): the same header, records
and present-id lists as the JSON-lines file, in row groups of ``ROW_GROUP`` rows.

Columns: ``id``, ``embedding`` (float32 little-endian bytes), ``document``, ``metadata`` (JSON
text, so int, float, bool and str values keep their types), ``uri``, ``seq``, ``ver`` and
``present`` (a list of ids, on rows without an ``id``). The header is the schema's metadata;
the end (record count and a SHA-256 over every record) is written into the footer when the
file is complete, and pages carry checksums, so a file cut short, changed or damaged is found
by ``ParquetExportFile.open`` before an import writes anything.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .._errors import BackupFileError, ConfigurationError
from ._format import FORMAT, FORMAT_VERSION, Record, check_header

__all__ = ["MAGIC", "ParquetExportFile", "ParquetExportWriter"]

MAGIC = b"PAR1"
ROW_GROUP = 1000
_HEADER_KEY = b"sharded-chroma-export"
_END_KEY = "sharded-chroma-end"


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigurationError(
            "Parquet exports need pyarrow: pip install 'sharded-chroma[parquet]' (or export "
            "to a .jsonl file)"
        ) from None
    return pa, pq


def _digest_record(digest: Any, row: Mapping[str, Any]) -> None:
    digest.update(
        orjson.dumps(
            [row["id"], row["document"], row["metadata"], row["uri"], row["seq"], row["ver"]]
        )
    )
    digest.update(row["embedding"] or b"")


class ParquetExportWriter:
    """Writes one Parquet export; ``finish`` writes the end and moves the file into place."""

    def __init__(self, path: str | os.PathLike[str], header: Mapping[str, Any]) -> None:
        pa, pq = _pyarrow()
        self._pa = pa
        self.path = Path(path)
        self._partial = self.path.with_name(self.path.name + ".partial")
        full = {"format": FORMAT, "version": FORMAT_VERSION, **header}
        self._schema = pa.schema(
            [
                ("id", pa.string()),
                ("embedding", pa.binary()),
                ("document", pa.string()),
                ("metadata", pa.string()),
                ("uri", pa.string()),
                ("seq", pa.int64()),
                ("ver", pa.int64()),
                ("present", pa.list_(pa.string())),
            ],
            metadata={_HEADER_KEY: orjson.dumps(full)},
        )
        self._writer = pq.ParquetWriter(
            self._partial, self._schema, compression="zstd", write_page_checksum=True
        )
        self._rows: list[dict[str, Any]] = []
        self._digest = hashlib.sha256()
        self.records = 0

    def record(self, rec: Record) -> None:
        row = {
            "id": rec.id,
            "embedding": None
            if rec.embedding is None
            else np.asarray(rec.embedding, dtype="<f4").tobytes(),
            "document": rec.document,
            "metadata": None if rec.metadata is None else orjson.dumps(rec.metadata).decode(),
            "uri": rec.uri,
            "seq": rec.seq,
            "ver": rec.ver,
            "present": None,
        }
        _digest_record(self._digest, row)
        self._rows.append(row)
        self.records += 1
        if len(self._rows) >= ROW_GROUP:
            self._flush()

    def present(self, ids: Sequence[str]) -> None:
        self._digest.update(orjson.dumps(["present", list(ids)]))
        self._rows.append(
            {k: None for k in ("id", "embedding", "document", "metadata", "uri", "seq", "ver")}
            | {"present": list(ids)}
        )

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(self._pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def finish(self) -> None:
        self._flush()
        end = {"records": self.records, "sha256": self._digest.hexdigest()}
        self._writer.add_key_value_metadata({_END_KEY: orjson.dumps(end).decode()})
        self._writer.close()
        with open(self._partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        self._writer.close()
        self._partial.unlink(missing_ok=True)


def _record(row: Mapping[str, Any], name: str, n: int) -> Record:
    rid = row["id"]
    emb = row["embedding"]
    if emb is None or len(emb) % 4:
        raise BackupFileError(f"row {n}: record {rid!r} has a damaged embedding", path=name)
    try:
        meta = None if row["metadata"] is None else orjson.loads(row["metadata"])
    except orjson.JSONDecodeError:
        raise BackupFileError(f"row {n}: record {rid!r} has damaged metadata", path=name) from None
    return Record(
        rid,
        np.frombuffer(emb, dtype="<f4"),
        row["document"],
        meta,
        row["uri"],
        row["seq"],
        row["ver"],
    )


def _json(raw: bytes, path: str, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise BackupFileError(f"its {what} is damaged", path=path)
    return value


class ParquetExportFile:
    """A checked Parquet export, with the interface of ``ExportFile``."""

    def __init__(
        self, path: Path, header: dict[str, Any], records: int, dimension: int | None
    ) -> None:
        self.path = path
        self.header = header
        self.records = records
        self.dimension = dimension

    @property
    def name(self) -> str:
        return str(self.path)

    @staticmethod
    def _file(path: Path) -> Any:
        pa, pq = _pyarrow()
        try:
            return pq.ParquetFile(path, page_checksum_verification=True)
        except (pa.ArrowException, OSError) as exc:
            raise BackupFileError(
                f"cut short or not a Parquet file ({exc})", path=str(path)
            ) from None

    def _rows(self, pf: Any) -> Iterator[dict[str, Any]]:
        pa, _ = _pyarrow()
        try:
            for batch in pf.iter_batches(batch_size=ROW_GROUP):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise BackupFileError(f"damaged ({exc})", path=self.name) from None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ParquetExportFile:
        p = Path(path)
        pf = cls._file(p)
        raw = (pf.schema_arrow.metadata or {}).get(_HEADER_KEY)
        if raw is None:
            raise BackupFileError("not a sharded-chroma export", path=str(p))
        header = _json(raw, str(p), "header")
        check_header(header, str(p))
        end_raw = (pf.metadata.metadata or {}).get(_END_KEY.encode())
        if end_raw is None:
            raise BackupFileError("cut short: the export never finished", path=str(p))
        end = _json(end_raw, str(p), "end")
        self = cls(p, header, 0, None)
        digest = hashlib.sha256()
        for n, row in enumerate(self._rows(pf), start=1):
            if row["id"] is None:
                digest.update(orjson.dumps(["present", list(row["present"] or [])]))
                continue
            rec = _record(row, self.name, n)
            _digest_record(digest, row)
            if self.dimension is None:
                self.dimension = len(rec.embedding)
            elif len(rec.embedding) != self.dimension:
                raise BackupFileError(
                    f"row {n}: record {rec.id!r} has {len(rec.embedding)} dimensions, the "
                    f"records before it {self.dimension}",
                    path=self.name,
                )
            self.records += 1
        if end.get("records") != self.records or end.get("sha256") != digest.hexdigest():
            raise BackupFileError(
                "changed since it was written: its records or digest differ from its end",
                path=self.name,
            )
        return self

    def read(self, skip: int = 0) -> Iterator[Record | list[str]]:
        seen = 0
        for n, row in enumerate(self._rows(self._file(self.path)), start=1):
            if row["id"] is None:
                yield list(row["present"] or [])
                continue
            seen += 1
            if seen > skip:
                yield _record(row, self.name, n)
