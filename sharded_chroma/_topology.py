"""Validated, frozen cluster configuration, built in code or loaded from a TOML file.

Example ``cluster.toml``::

    tenant = "default_tenant"
    database = "default_database"
    slots = 4096

    [defaults]            # applied to every node unless the node overrides it
    timeout = 30.0
    token_env = "CHROMA_TOKEN"

    [[shards]]
    name = "s0"
    primary = "http://10.0.0.1:8000"

    [[shards]]
    name = "s1"
    primary = { url = "https://10.0.0.2:8000", ca_file = "ca.pem" }
    replicas = ["https://10.0.0.3:8000"]

    [policies.events]     # placement of the collection "events" (default: hash of the id)
    kind = "time"
    field = "ts"
    granularity = "day"
    hot = "s1"
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ._errors import ConfigurationError
from ._frozen import FrozenDict
from ._nodeconfig import EXCLUSIVE_OPTIONS, NodeConfig
from ._policies import AnyPolicy, HashPolicy
from ._routing import DEFAULT_SLOTS, MAX_SLOTS, SlotTable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["ControlConfig", "NodeConfig", "ReplicationConfig", "ShardConfig", "Topology"]

DEFAULT_TENANT = "default_tenant"
DEFAULT_DATABASE = "default_database"

_Frozen = ConfigDict(frozen=True, extra="forbid")


class ShardConfig(BaseModel):
    """A shard: one primary node and zero or more replica nodes holding the same records."""

    model_config = _Frozen

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    primary: NodeConfig
    replicas: tuple[NodeConfig, ...] = ()

    @property
    def nodes(self) -> tuple[NodeConfig, ...]:
        return (self.primary, *self.replicas)


class ReplicationConfig(BaseModel):
    """How shards with replicas are read and written. Ignored for shards without replicas,
    except ``retries`` and the backoff, which also govern a lone node."""

    model_config = _Frozen

    write_concern: Literal["all", "quorum", "one"] = "all"
    """How many copies of a shard must store a write before it is acknowledged."""
    read_selection: str = "round_robin"
    """round_robin, least_outstanding, latency or primary_only."""
    hedge_after: float | None = Field(default=None, gt=0)
    """Send a second copy of a read to another node after this many seconds (None: never)."""
    hedge_percentile: float | None = Field(default=93.0, gt=0, lt=100)
    """Or: after this percentile of the node's recent latencies (hedge_after until known)."""
    hedge_budget: float = Field(default=0.10, ge=0, le=1)
    """At most this fraction of reads may be hedged."""
    retries: int = Field(default=2, ge=0, le=10)
    """Extra attempts for a read, on the next copy (or the same node if it is alone)."""
    backoff: float = Field(default=0.05, gt=0)
    """First pause between attempts on the same node; doubles per attempt."""
    node_retry_after: float = Field(default=1.0, gt=0)
    """A failed node is skipped for this long, doubling per failure up to node_retry_cap."""
    node_retry_cap: float = Field(default=30.0, gt=0)
    write_grace: float = Field(default=2.0, ge=0)
    """Once a write met its concern, how long the other copies may still take before they are
    left to the hint log (a hung copy must not hold up an acknowledged write)."""
    replay_inline_deadline: float = Field(default=2.0, gt=0)
    """How long a read waits for a copy to catch up when every copy of its shard is behind
    (each missed writes another has); otherwise replay runs in the background."""
    replay_in_background: bool = True
    """Replay missed writes from a background thread of each client. Off, only
    ``replay_hints()`` (and ``sharded-chroma repair``) replay them."""
    replay_interval: float = Field(default=0.1, gt=0)
    """How often the background replayer looks for copies with missed writes to replay."""
    replay_probe: float = Field(default=1.0, gt=0)
    """How often it tries a copy that has missed writes but does not answer."""
    replay_rate: float | None = Field(default=2000.0, gt=0)
    """At most this many missed writes replayed per second per copy (None: unbounded)."""
    hints_dir: str | None = None
    """Folder of the durable hint log (default: ~/.local/state/sharded-chroma/hints)."""
    hint_max_count: int = Field(default=1_000_000, ge=1)
    hint_max_bytes: int = Field(default=1 << 30, ge=1)
    hint_max_age: float = Field(default=7 * 86400.0, gt=0)

    @field_validator("read_selection")
    @classmethod
    def _known_selection(cls, name: str) -> str:
        from ._selection import SELECTORS

        if name not in SELECTORS:
            raise ValueError(f"unknown read_selection {name!r}; known: {sorted(SELECTORS)}")
        return name


class ControlConfig(BaseModel):
    """Where the partition maps live (the ``[control]`` table). Without it, each collection
    keeps the policy it was created with and cannot be rebalanced."""

    model_config = _Frozen

    backend: Literal["sqlite", "etcd"] = "sqlite"
    path: str | None = None
    """The SQLite file (default: beside the hint log, one per cluster)."""
    endpoints: tuple[str, ...] = ()
    """etcd client endpoints, ``host:port``; tried in turn."""
    namespace: str = "/sharded-chroma/"
    """Key prefix in etcd, so one etcd can serve several clusters."""
    username: str | None = None
    password_env: str | None = None
    """Name of the environment variable holding the etcd password (never the password)."""
    timeout: float = Field(default=5.0, gt=0)
    lease_ttl: float = Field(default=15.0, ge=2)
    """A client that cannot renew its lease this long stops writing; a migrator stops waiting
    for it once the lease has expired."""
    ack_timeout: float = Field(default=120.0, gt=0)
    """How long a migrator waits for every live client to acknowledge a new epoch."""

    @model_validator(mode="after")
    def _check(self) -> ControlConfig:
        if self.backend == "etcd" and not self.endpoints:
            raise ValueError('the etcd control store needs endpoints = ["host:port", ...]')
        if self.backend == "sqlite" and self.endpoints:
            raise ValueError('endpoints are for backend = "etcd"; the SQLite store has a path')
        if not self.namespace.endswith("/"):
            raise ValueError("namespace must end with /")
        return self

    def password(self) -> str | None:
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value is None:
            raise ConfigurationError(
                f"control store: environment variable {self.password_env!r} is not set"
            )
        return value


class Topology(BaseModel):
    """The whole cluster: shards, where the tenant and database live, and the slot space."""

    model_config = _Frozen

    shards: tuple[ShardConfig, ...] = Field(min_length=1)
    tenant: str = DEFAULT_TENANT
    database: str = DEFAULT_DATABASE
    slots: int = Field(default=DEFAULT_SLOTS, ge=1, le=MAX_SLOTS)
    routing_key: str | None = None
    """Metadata field whose value is hashed to place a record; None hashes the record id.
    The default policy of collections created without one."""
    replication: ReplicationConfig = Field(default_factory=ReplicationConfig)
    repair_after: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    """Seconds a newer copy of a record must have existed before a read that meets an older
    copy beside it removes that one. A move under way (written to its new part, not yet
    removed from the old) is left to finish, and can then tell a concurrent delete of its
    source, which it must honour, from a read's clean-up. Keep it above the time a write may
    take (the node timeout)."""
    policies: Annotated[Mapping[str, AnyPolicy], AfterValidator(FrozenDict)] = Field(
        default_factory=FrozenDict
    )
    """Placement policy per collection name, used when that collection is created and checked
    against the stored one when it is opened."""
    control: ControlConfig | None = None
    """The control store (``[control]``); None: no online rebalancing."""

    @model_validator(mode="after")
    def _check(self) -> Topology:
        names = [s.name for s in self.shards]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"shard names must be unique, repeated: {dupes}")
        urls = [n.url for s in self.shards for n in s.nodes]
        dup_urls = sorted({u for u in urls if urls.count(u) > 1})
        if dup_urls:
            raise ValueError(f"a node may belong to one shard once, repeated: {dup_urls}")
        if self.slots < len(self.shards):
            raise ValueError(f"slots ({self.slots}) must be at least the shard count")
        if self.routing_key is not None and not self.routing_key:
            raise ValueError("routing_key must be a non-empty metadata field name or None")
        for collection, policy in self.policies.items():
            unknown = sorted(policy.shards_named() - set(names))
            if unknown:
                raise ValueError(
                    f"policy of collection {collection!r} names unknown shard(s) {unknown}; "
                    f"shards are {names}"
                )
        return self

    def default_policy(self, collection: str) -> Any:
        """The policy a new collection of this name gets, bound to this topology's shards."""
        declared = self.policies.get(collection)
        if declared is None:
            declared = HashPolicy(field=self.routing_key, slots=self.slots)
        return self.bind(declared)

    def bind(self, policy: Any) -> Any:
        """A policy ready to place records: a hash policy without shards gets all of them."""
        names = tuple(s.name for s in self.shards)
        if isinstance(policy, HashPolicy) and not policy.shards:
            policy = policy.model_copy(update={"shards": names})
        unknown = sorted(policy.shards_named() - set(names))
        if unknown:
            raise ConfigurationError(
                f"the policy names unknown shard(s) {unknown}; this topology has {list(names)}"
            )
        return policy

    def slot_table(self) -> SlotTable:
        return SlotTable.uniform(len(self.shards), self.slots)

    @classmethod
    def from_urls(cls, urls: Sequence[str], **options: Any) -> Topology:
        """One shard per URL, named s0, s1, ..."""
        if isinstance(urls, str):
            raise ConfigurationError("shards must be a list of URLs, not one string")
        return cls.build(
            {"shards": [{"name": f"s{i}", "primary": u} for i, u in enumerate(urls)], **options}
        )

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Topology:
        """Load a topology file; node options under ``[defaults]`` apply to every node."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read topology file {p.name}: {exc}") from exc
        return cls.build(data, source=p.name)

    @classmethod
    def build(cls, data: Mapping[str, Any], *, source: str = "topology") -> Topology:
        """Validate a plain mapping (as parsed from TOML), turning errors into
        ``ConfigurationError``. Node entries may be a URL string or a table."""
        data = dict(data)
        defaults = dict(data.pop("defaults", {}) or {})

        def node(raw: Any) -> Any:
            entry = {"url": raw} if isinstance(raw, str) else dict(raw)
            # A node that sets one of a choice (token_env or token_file) overrides the
            # default's choice, not adds to it.
            inherited = {
                k: v
                for k, v in defaults.items()
                if not any(k in group and group & entry.keys() for group in EXCLUSIVE_OPTIONS)
            }
            return {**inherited, **entry}

        shards = []
        for raw_shard in data.get("shards", ()) or ():
            shard = dict(raw_shard)
            if "primary" in shard:
                shard["primary"] = node(shard["primary"])
            shard["replicas"] = [node(r) for r in shard.get("replicas", ()) or ()]
            shards.append(shard)
        data["shards"] = shards
        if "policies" in data:
            # A table without "kind" is a hash policy, as in code.
            data["policies"] = {
                k: {"kind": "hash", **v} if isinstance(v, Mapping) else v
                for k, v in dict(data["policies"] or {}).items()
            }
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors(include_input=False)
        # A failed shard entry also fails the tuple's length check; that second message would
        # only mislead, so it is dropped when the entries themselves have problems.
        if len(errors) > 1:
            errors = [e for e in errors if e["type"] != "too_short"] or errors
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '(root)'}: {e['msg']}" for e in errors
        )
        # Raised outside the except block so neither __cause__ nor __context__ holds pydantic's
        # error, whose text echoes input values (and headers may hold secrets).
        raise ConfigurationError(f"invalid {source}: {problems}")
