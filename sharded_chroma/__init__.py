"""sharded_chroma: several self-hosted Chroma servers behind one drop-in async client.

    client = await sharded_chroma.AsyncHttpClient(shards=["http://127.0.0.1:8000", ...])
    client = sharded_chroma.HttpClient(shards=[...])  # the same, for sync code

The async client has chromadb's ``AsyncClientAPI`` data-plane methods and returns collections
with ``AsyncCollection``'s methods, result shapes and error classes; the sync one has
``ClientAPI``'s and returns chromadb's own sync ``Collection`` class.
"""

from ._client import ShardedClient
from ._collection import ShardedCollection
from ._errors import (
    AuthenticationError,
    BackupFileError,
    ClientClosedError,
    ConfigurationError,
    ControlStoreError,
    ControlUnavailableError,
    HintLogFullError,
    NodeAccessError,
    NodeUnavailableError,
    PartialWriteError,
    RoutingError,
    ShardedChromaError,
    ShardFailureError,
    ShardMismatchError,
    TLSError,
    WriteConcernError,
)
from ._factory import AsyncHttpClient
from ._fanout import Coverage
from ._layout import CollectionLayout, PartitionCount
from ._options import options
from ._policies import CompositePolicy, FieldPolicy, HashPolicy, TimePolicy, TimeRange
from ._status import CollectionStatus, ShardStatus
from ._topology import NodeConfig, ReplicationConfig, ShardConfig, Topology
from ._transport import NodeStats
from ._version import VERSION
from .backup import ExportReport, ImportReport
from .observe import prometheus_collector
from .observe._metrics import CallMetrics, ClientMetrics, LatencySnapshot, NodeMetrics
from .sync import HttpClient, SyncShardedClient, SyncShardedCollection

__all__ = [
    "AsyncHttpClient",
    "AuthenticationError",
    "BackupFileError",
    "CallMetrics",
    "ClientClosedError",
    "ClientMetrics",
    "CollectionLayout",
    "CollectionStatus",
    "CompositePolicy",
    "ConfigurationError",
    "ControlStoreError",
    "ControlUnavailableError",
    "Coverage",
    "ExportReport",
    "FieldPolicy",
    "HashPolicy",
    "HintLogFullError",
    "HttpClient",
    "ImportReport",
    "LatencySnapshot",
    "NodeAccessError",
    "NodeConfig",
    "NodeMetrics",
    "NodeStats",
    "NodeUnavailableError",
    "PartialWriteError",
    "PartitionCount",
    "ReplicationConfig",
    "RoutingError",
    "ShardConfig",
    "ShardFailureError",
    "ShardMismatchError",
    "ShardStatus",
    "ShardedChromaError",
    "ShardedClient",
    "ShardedCollection",
    "SyncShardedClient",
    "SyncShardedCollection",
    "TLSError",
    "TimePolicy",
    "TimeRange",
    "Topology",
    "WriteConcernError",
    "options",
    "prometheus_collector",
]

__version__ = VERSION
