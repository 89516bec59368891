"""The control store: where every client, migrator and operator finds the partition maps,
migrations, client leases and acknowledgements (etcd, or one SQLite file on one host)."""

from ._backend import ANY, AnyRevision, ControlBackend, Entry
from ._etcd import EtcdControl
from ._sqlite import SqliteControl

__all__ = ["ANY", "AnyRevision", "ControlBackend", "Entry", "EtcdControl", "SqliteControl"]
