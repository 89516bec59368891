"""What a client knows about a logical collection, and the reserved metadata namespace.

A logical collection is one physical collection of the same name on every node (every copy of
every shard). The cluster's id for it is the id of its physical collection on the first shard's
primary (the catalog node): stable across processes and unique per creation, like one server's
id. The other nodes carry it in reserved metadata (``_sc_id``) so the catalog can be read from a
replica when the catalog node is down. Each node has its own physical id for the collection;
requests are addressed per node (see ``PhysicalIds``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

__all__ = [
    "BUCKET_META",
    "CONTROL_META",
    "GENERATION_META",
    "ID_META",
    "PARENT_META",
    "RESERVED_PREFIX",
    "ROUTING_META",
    "SEQ_KEY",
    "SLOTS_META",
    "VERSION_KEY",
    "CollectionState",
    "StateCache",
    "parts_database",
]

RESERVED_PREFIX = "_sc_"
SEQ_KEY = "_sc_seq"
"""Hidden per-record sequence (a hybrid clock value): the cluster's insertion order."""
VERSION_KEY = "_sc_ver"
"""Hidden per-record version: the hybrid clock value of the record's last write. When one id is
met in two parts (a move caught half-way, or two processes racing), the higher version wins."""
ROUTING_META = "_sc_routing"
"""The collection's placement policy as JSON (a bare field name in collections made before
policies existed)."""
SLOTS_META = "_sc_slots"
ID_META = "_sc_id"
PARENT_META = "_sc_parent"
"""On a time bucket's physical collection: the cluster id of the collection it belongs to."""
BUCKET_META = "_sc_bucket"
CONTROL_META = "_sc_ctl"
"""On a collection a migration has touched: its placement is the control store's partition map,
so a client without the control store must not open it (it would route by the stored policy)."""
GENERATION_META = "_sc_gen"
"""On a collection's root: the generation of physical collections holding its records, once a
rebuild made one (see ``catalog._generations``); on a generation's collection: its number."""


def parts_database(database: str) -> str:
    """The companion database holding a database's time buckets and generations."""
    return f"{database}.sc-parts"


@dataclass
class CollectionState:
    """What one client knows about a logical collection (or one of its time buckets).

    ``physical`` is written only by ``PhysicalIds`` and by the catalog when it (re)loads a
    collection; the other fields are the cluster's facts, set by the catalog."""

    id: UUID
    name: str
    tenant: str
    database: str
    physical: dict[str, UUID]
    """Physical collection id per node URL, filled as nodes are first addressed."""
    policy: Any
    """The placement policy (a ``_policies.Policy``), the same for every client."""
    dimension: int | None = None
    configuration: dict[str, Any] | None = None
    """The physical collections' configuration, given to time buckets as they are created."""
    bucket: str | None = None
    """Set on the state of one time bucket's physical collection (see ``PartLayouts``)."""
    buckets: dict[str, CollectionState] = field(default_factory=dict)
    """States of this collection's time buckets by label, as this client has met them."""
    tombstones: CollectionState | None = None
    """State of the collection's delete marks, once addressed (see ``PartLayouts``)."""
    parent: UUID | None = None
    """On a time bucket's state: the cluster id of the collection it is a part of (the delete
    marks' state has none: they are not records of the collection)."""
    generation: int = 0
    """The generation of physical collections this state addresses (0: the root's own)."""
    generations: dict[int, CollectionState] = field(default_factory=dict)
    """On a root state: the states of its later generations, as this client met them."""
    stored_generation: int = 0
    """On a root state: the generation its stored metadata names (what a collection without a
    partition map opens at)."""

    @property
    def base(self) -> str:
        return f"/tenants/{self.tenant}/databases/{self.database}/collections"


class StateCache:
    """The collections this client has opened, by cluster id; shared by threads."""

    def __init__(self) -> None:
        self._states: dict[UUID, CollectionState] = {}
        self._lock = threading.Lock()

    def get(self, cluster_id: UUID) -> CollectionState | None:
        return self._states.get(cluster_id)

    def put(self, state: CollectionState) -> None:
        with self._lock:
            self._states[state.id] = state

    def forget_named(self, name: str, tenant: str, database: str) -> None:
        with self._lock:
            for key, state in list(self._states.items()):
                if (state.name, state.tenant, state.database) == (name, tenant, database):
                    del self._states[key]

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
