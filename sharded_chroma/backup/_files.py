"""Which file format: Parquet for a ``.parquet`` path (or a file that starts with its magic
bytes), JSON lines otherwise."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ._format import ExportFile, ExportWriter, Record
from ._parquet import MAGIC, ParquetExportFile, ParquetExportWriter

__all__ = ["Export", "Writer", "export_writer", "open_export"]


class Writer(Protocol):
    records: int

    def record(self, rec: Record) -> None: ...

    def present(self, ids: Sequence[str]) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


class Export(Protocol):
    path: Path
    header: dict[str, Any]
    records: int
    dimension: int | None

    @property
    def name(self) -> str: ...

    def read(self, skip: int = 0) -> Iterator[Record | list[str]]: ...


def export_writer(path: str | os.PathLike[str], header: Mapping[str, Any]) -> Writer:
    if Path(path).suffix.lower() == ".parquet":
        return ParquetExportWriter(path, header)
    return ExportWriter(path, header)


def open_export(path: str | os.PathLike[str]) -> Export:
    """The checked export at ``path`` (see ``ExportFile.open``)."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(len(MAGIC)) == MAGIC:
                return ParquetExportFile.open(p)
    return ExportFile.open(p)
