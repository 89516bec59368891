"""Logical backups: export a collection to a portable file, import it into any topology."""

from ._export import ExportReport, export_collection
from ._import import ImportReport, import_collection

__all__ = ["ExportReport", "ImportReport", "export_collection", "import_collection"]
