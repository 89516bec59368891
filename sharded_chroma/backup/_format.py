"""The export file: JSON lines, one header, records, present-id lists, one trailer.

    {"format": "sharded-chroma-export", "version": 1, "export_id": ..., "collection": ...}
    {"id": ..., "embedding": <base64 float32 LE>, "document": ..., "metadata": ..., "uri": ...,
     "seq": ..., "ver": ...}
    {"present": [ids...]}                      (incremental exports only)
    {"end": true, "records": N, "sha256": <hex of every byte before this line>}

A file without its trailer was cut short; a digest that differs means it was changed. Both are
found by ``ExportFile.open`` (one pass over the file) before an import writes anything.
The writer writes to ``<path>.partial`` and renames it when the trailer is written, so a killed
export never leaves a file that looks whole.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

from .._errors import BackupFileError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ExportFile",
    "ExportWriter",
    "Record",
    "check_header",
]

FORMAT = "sharded-chroma-export"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Record:
    """One record as exported: its columns and its hidden sequence and version."""

    id: str
    embedding: Any
    """float32 values (an array as read from a file; whatever the scan gave when written)."""
    document: str | None
    metadata: Any
    uri: str | None
    seq: int | None
    ver: int | None


def _encode_embedding(vector: Any) -> str | None:
    if vector is None:
        return None
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


class ExportWriter:
    """Writes one export file; ``finish`` writes the trailer and moves it into place."""

    def __init__(self, path: str | os.PathLike[str], header: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._file: BinaryIO = open(self._partial, "wb")  # noqa: SIM115 - closed by finish/abort
        self._digest = hashlib.sha256()
        self.records = 0
        self._line({"format": FORMAT, "version": FORMAT_VERSION, **header})

    def _line(self, obj: Mapping[str, Any]) -> None:
        data = orjson.dumps(obj) + b"\n"
        self._digest.update(data)
        self._file.write(data)

    def record(self, rec: Record) -> None:
        self._line(
            {
                "id": rec.id,
                "embedding": _encode_embedding(rec.embedding),
                "document": rec.document,
                "metadata": rec.metadata,
                "uri": rec.uri,
                "seq": rec.seq,
                "ver": rec.ver,
            }
        )
        self.records += 1

    def present(self, ids: Sequence[str]) -> None:
        self._line({"present": list(ids)})

    def finish(self) -> None:
        trailer = {"end": True, "records": self.records, "sha256": self._digest.hexdigest()}
        self._file.write(orjson.dumps(trailer) + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        self._file.close()
        self._partial.unlink(missing_ok=True)


def check_header(header: Mapping[str, Any], path: str, line: int | None = None) -> None:
    """The header names this format and a version this release reads."""
    if header.get("format") != FORMAT:
        raise BackupFileError("not a sharded-chroma export", path=path, line=line)
    if header.get("version") != FORMAT_VERSION:
        raise BackupFileError(
            f"export format version {header.get('version')!r} is not known to this release "
            f"(it reads version {FORMAT_VERSION})",
            path=path,
            line=line,
        )


def _parse(raw: bytes, path: str, line: int) -> dict[str, Any]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BackupFileError(f"not a JSON line ({exc})", path=path, line=line) from None
    if not isinstance(obj, dict):
        raise BackupFileError("not a JSON object", path=path, line=line)
    return obj


def _record(obj: Mapping[str, Any], path: str, line: int) -> Record:
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise BackupFileError("a record without a string id", path=path, line=line)
    emb = obj.get("embedding")
    vector = None
    if emb is not None:
        try:
            vector = np.frombuffer(base64.b64decode(emb, validate=True), dtype="<f4")
        except (ValueError, TypeError):
            raise BackupFileError(
                f"record {rid!r}: a damaged embedding", path=path, line=line
            ) from None
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise BackupFileError(f"record {rid!r}: metadata is not a map", path=path, line=line)
    return Record(
        rid, vector, obj.get("document"), meta, obj.get("uri"), obj.get("seq"), obj.get("ver")
    )


class ExportFile:
    """A checked export file: its header and trailer, and its records read on demand."""

    def __init__(
        self, path: Path, header: dict[str, Any], records: int, dimension: int | None
    ) -> None:
        self.path = path
        self.header = header
        self.records = records
        self.dimension = dimension
        """Length of the first record's embedding (None: no record)."""

    @property
    def name(self) -> str:
        return str(self.path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ExportFile:
        """Read the whole file once: format and version, every line's shape, the record
        count and the digest. Raises ``BackupFileError`` naming the file and the line."""
        p = Path(path)
        name = str(p)
        if not p.is_file():
            raise BackupFileError("no such export file", path=name)
        digest = hashlib.sha256()
        header: dict[str, Any] | None = None
        count = 0
        trailer: dict[str, Any] | None = None
        dimension: int | None = None
        n = 0
        with open(p, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if trailer is not None:
                    raise BackupFileError("data after the end line", path=name, line=n)
                if not raw.endswith(b"\n"):
                    raise BackupFileError(
                        f"cut short (after {count} records): the last line is incomplete",
                        path=name,
                        line=n,
                    )
                obj = _parse(raw, name, n)
                if header is None:
                    check_header(obj, name, line=1)
                    header = obj
                elif obj.get("end") is True:
                    trailer = obj
                    continue
                elif "present" in obj:
                    if not isinstance(obj["present"], list):
                        raise BackupFileError("a damaged id list", path=name, line=n)
                else:
                    rec = _record(obj, name, n)
                    if rec.embedding is None:
                        raise BackupFileError(
                            f"record {rec.id!r} has no embedding", path=name, line=n
                        )
                    if dimension is None:
                        dimension = len(rec.embedding)
                    elif len(rec.embedding) != dimension:
                        raise BackupFileError(
                            f"record {rec.id!r} has {len(rec.embedding)} dimensions, the "
                            f"records before it {dimension}",
                            path=name,
                            line=n,
                        )
                    count += 1
                digest.update(raw)
        if header is None:
            raise BackupFileError("empty file", path=name)
        if trailer is None:
            raise BackupFileError(
                f"cut short: no end line after {count} records", path=name, line=n + 1
            )
        if trailer.get("records") != count or trailer.get("sha256") != digest.hexdigest():
            raise BackupFileError(
                "changed since it was written: its records or digest differ from its end line",
                path=name,
                line=n,
            )
        return cls(p, header, count, dimension)

    def read(self, skip: int = 0) -> Iterator[Record | list[str]]:
        """Records (and, in incremental files, lists of present ids) after the first ``skip``
        records, in file order."""
        seen = 0
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if n == 1:
                    continue
                obj = _parse(raw, self.name, n)
                if obj.get("end") is True:
                    return
                if "present" in obj:
                    yield list(obj["present"])
                    continue
                seen += 1
                if seen > skip:
                    yield _record(obj, self.name, n)
