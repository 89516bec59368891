"""Client-level argument checks, each run through chromadb's official client on a plain server
(the oracle) and through the sharded client: both must refuse the same inputs with the same
exception class and, where the official message is deterministic, the same message, and
neither may leave a collection behind.

Collection-level methods (add, get, query...) run chromadb's own AsyncCollection code in both
clients, so they are covered by test_compat.py's differential tables, not here.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import chromadb
import orjson
import pytest
from chromadb.config import Settings
from chromadb.errors import ChromaError, InvalidArgumentError, NotFoundError

import sharded_chroma
from tests._nodes import official, port_of

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("official_pools")]

NO_EF: dict[str, Any] = {"embedding_function": None}
EXISTING = "existing"
MISSING_ID = uuid.UUID("9d0c3c3e-1b7a-4a53-8a39-1f1f1f1f1f1f")

Call = Callable[[Any], Awaitable[Any]]
# "exact": same message. "lines": the server joins the lines of a validation error in an order
# that varies per request, so the same set of lines. "class": the official message quotes a
# byte offset in its own request body, which differs from ours.
Match = Literal["exact", "lines", "class"]


@dataclass(frozen=True)
class Bad:
    call: Call
    match: Match = "exact"


BAD_CALLS: dict[str, Bad] = {
    # Empty metadata: the server refuses it, but the sharded client adds its reserved keys to
    # the metadata, so it used to reach the servers as a valid one and create the collection.
    "create-empty-metadata": Bad(lambda c: c.create_collection("abc", metadata={}, **NO_EF)),
    "goc-empty-metadata": Bad(lambda c: c.get_or_create_collection("abc", metadata={}, **NO_EF)),
    "create-empty-metadata-default-ef": Bad(lambda c: c.create_collection("abc", metadata={})),
    "goc-existing-empty-metadata": Bad(
        lambda c: c.get_or_create_collection(EXISTING, metadata={}, **NO_EF)
    ),
    "create-empty-metadata-short-name": Bad(
        lambda c: c.create_collection("x", metadata={}, **NO_EF), "lines"
    ),
    "create-empty-metadata-double-period": Bad(
        lambda c: c.create_collection("a..b", metadata={}, **NO_EF), "lines"
    ),
    "create-empty-metadata-ip-name": Bad(
        lambda c: c.create_collection("10.0.0.1", metadata={}, **NO_EF), "lines"
    ),
    # The official client's own steps fail before its request is sent, so they win.
    "create-empty-metadata-hnsw-and-spann": Bad(
        lambda c: c.create_collection(
            "abc", metadata={}, configuration={"hnsw": {}, "spann": {}}, **NO_EF
        )
    ),
    "create-empty-metadata-unserialisable-configuration": Bad(
        lambda c: c.create_collection("abc", metadata={}, configuration={"hnsw": {1}}, **NO_EF)
    ),
    # Metadata that is not a map: the falsy ones used to be read as "no metadata".
    "create-metadata-empty-string": Bad(
        lambda c: c.create_collection("abc", metadata="", **NO_EF), "class"
    ),
    "create-metadata-empty-list": Bad(
        lambda c: c.create_collection("abc", metadata=[], **NO_EF), "class"
    ),
    "create-metadata-zero": Bad(lambda c: c.create_collection("abc", metadata=0, **NO_EF), "class"),
    "create-metadata-list": Bad(
        lambda c: c.create_collection("abc", metadata=[1], **NO_EF), "class"
    ),
    "create-metadata-set": Bad(lambda c: c.create_collection("abc", metadata={1}, **NO_EF)),
    "create-metadata-reserved-key": Bad(
        lambda c: c.create_collection("abc", metadata={"#a": 1}, **NO_EF)
    ),
    "create-metadata-int-key": Bad(lambda c: c.create_collection("abc", metadata={1: 1}, **NO_EF)),
    # A configuration that is not a mapping: the empty ones used to be read as "none".
    "create-configuration-empty-list": Bad(
        lambda c: c.create_collection("abc", configuration=[], **NO_EF)
    ),
    "create-configuration-empty-string": Bad(
        lambda c: c.create_collection("abc", configuration="", **NO_EF)
    ),
    "create-configuration-string": Bad(
        lambda c: c.create_collection("abc", configuration="abc", **NO_EF)
    ),
    "create-hnsw-and-spann": Bad(
        lambda c: c.create_collection("abc", configuration={"hnsw": {}, "spann": {}}, **NO_EF)
    ),
    "create-bad-hnsw-space": Bad(
        lambda c: c.create_collection("abc", configuration={"hnsw": {"space": "bogus"}}, **NO_EF),
        "class",
    ),
    "create-schema-not-a-schema": Bad(
        lambda c: c.create_collection("abc", schema={"a": 1}, **NO_EF)
    ),
    "get-ef-not-an-ef": Bad(lambda c: c.get_collection(EXISTING, embedding_function="x")),
    "create-short-name": Bad(lambda c: c.create_collection("x", **NO_EF)),
    "create-empty-name": Bad(lambda c: c.create_collection("", **NO_EF)),
    "create-name-none": Bad(lambda c: c.create_collection(None, **NO_EF)),
    "create-name-with-slash": Bad(lambda c: c.create_collection("ab/cd", **NO_EF)),
    "create-existing": Bad(lambda c: c.create_collection(EXISTING, **NO_EF)),
    "get-missing": Bad(lambda c: c.get_collection("nope", **NO_EF)),
    "get-name-none": Bad(lambda c: c.get_collection(None, **NO_EF)),
    "delete-missing": Bad(lambda c: c.delete_collection("nope")),
    "get-by-id-missing": Bad(lambda c: c.get_collection_by_id(MISSING_ID, **NO_EF)),
    "get-by-id-not-a-uuid": Bad(lambda c: c.get_collection_by_id("not-a-uuid", **NO_EF)),
    "get-by-id-none": Bad(lambda c: c.get_collection_by_id(None, **NO_EF)),
    # Query values the server refuses; True used to fail in the HTTP library (TypeError).
    "list-limit-true": Bad(lambda c: c.list_collections(limit=True)),
    "list-offset-false": Bad(lambda c: c.list_collections(offset=False)),
    "list-limit-negative": Bad(lambda c: c.list_collections(limit=-1)),
    "list-offset-negative": Bad(lambda c: c.list_collections(offset=-1)),
    "list-limit-fraction": Bad(lambda c: c.list_collections(limit=1.5)),
    "list-limit-text": Bad(lambda c: c.list_collections(limit="ten")),
    "list-limit-too-large": Bad(lambda c: c.list_collections(limit=2**64)),
}


async def _raised(call: Callable[[], Awaitable[Any]]) -> BaseException | None:
    try:
        await call()
    except Exception as exc:
        return exc
    return None


def _validation_lines(message: str) -> set[str]:
    prefix = "Validation error: "
    assert message.startswith(prefix), message
    return set(message.removeprefix(prefix).split("\n"))


async def _collection_counts(urls: list[str]) -> list[int]:
    return [await (await official(url)).count_collections() for url in urls]


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
async def test_bad_client_arguments_raise_like_official_and_create_nothing(
    oracle_url: str, shard_urls: list[str], sharded: Any, case: str
) -> None:
    bad = BAD_CALLS[case]
    oracle = await official(oracle_url)
    for client in (oracle, sharded):
        await client.create_collection(EXISTING, **NO_EF)
    urls = [oracle_url, *shard_urls]
    before = await _collection_counts(urls)

    expected = await _raised(lambda: bad.call(oracle))
    got = await _raised(lambda: bad.call(sharded))

    assert expected is not None, f"the official client accepted {case}"
    assert got is not None, f"the sharded client accepted {case}"
    assert type(got) is type(expected), f"{case}: {got!r} vs official {expected!r}"
    if bad.match == "exact":
        assert str(got) == str(expected)
    elif bad.match == "lines":
        assert _validation_lines(str(got)) == _validation_lines(str(expected))
    assert await _collection_counts(urls) == before, f"{case} left a collection behind"
    assert [c.name for c in await sharded.list_collections()] == [EXISTING]


async def test_valid_arguments_still_accepted(
    oracle_url: str, sharded: sharded_chroma.ShardedClient
) -> None:
    """The checks above refuse nothing the official client accepts at their edges."""
    oracle = await official(oracle_url)
    for client in (oracle, sharded):
        made = await client.create_collection("a.b-c_d", metadata={"k": 1}, **NO_EF)
        assert made.metadata == {"k": 1}
        await client.create_collection("01.2.3.4", configuration={}, **NO_EF)  # not an IP
        await client.get_or_create_collection("a.b-c_d", metadata=None, **NO_EF)
        assert [c.name for c in await client.list_collections(limit=1, offset=5)] == []
        assert len(await client.list_collections(limit="1")) == 1
        assert await client.count_collections() == 2
        await client.delete_collection("01.2.3.4")


UNADDRESSABLE = ["", ".", "..", "a/b", f"{EXISTING}/count", f"by-id/{MISSING_ID}"]


@pytest.mark.parametrize("name", UNADDRESSABLE)
@pytest.mark.parametrize("method", ["get_collection", "delete_collection"])
async def test_names_that_are_not_a_path_segment_are_not_found_and_send_nothing(
    sharded: sharded_chroma.ShardedClient, shard_urls: list[str], name: str, method: str
) -> None:
    """A documented difference: the official client puts such a name in the request path as
    is, so its answer depends on which other route the path reaches (a bare Exception for an
    empty body, a KeyError, an invalid-UUID error, and ``delete_collection("..")`` deletes the
    whole database). The sharded client used to retry the route's 404 three times and report
    the node unavailable. No collection can have such a name, so it is simply not found."""
    await sharded.create_collection(EXISTING, **NO_EF)
    sent = {url: stats.requests for url, stats in sharded.node_stats().items()}
    call: Callable[[], Awaitable[Any]] = (
        (lambda: sharded.get_collection(name, **NO_EF))
        if method == "get_collection"
        else (lambda: sharded.delete_collection(name))
    )
    with pytest.raises(NotFoundError) as raised:
        await call()
    assert str(raised.value) == f"Collection [{name}] does not exist"
    assert {url: stats.requests for url, stats in sharded.node_stats().items()} == sent
    assert all(stats.failures == 0 for stats in sharded.node_stats().values())
    assert await _collection_counts(shard_urls) == [1] * len(shard_urls)


async def test_empty_name_premise_official_client_does_not_answer_not_found(
    oracle_url: str,
) -> None:
    """Guards the premise of the difference above: the official client does not raise
    NotFoundError for such a name (if it ever does, match it exactly instead)."""
    oracle = await official(oracle_url)
    for name in ("", "a/b"):
        exc = await _raised(lambda name=name: oracle.get_collection(name, **NO_EF))
        assert exc is not None and not isinstance(exc, NotFoundError), repr(exc)


async def _official_at(url: str, **kwargs: Any) -> Any:
    return await chromadb.AsyncHttpClient(
        host=urlsplit(url).hostname or "127.0.0.1",
        port=port_of(url),
        settings=Settings(anonymized_telemetry=False),
        **kwargs,
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"tenant": "nope"}, {"database": "nope"}, {"tenant": "nope", "database": "nope"}],
    ids=["tenant", "database", "both"],
)
async def test_unknown_tenant_or_database_raises_like_official(
    oracle_url: str, shard_urls: list[str], kwargs: dict[str, str]
) -> None:
    """Regression: the sharded client asked for the database only, so a wrong tenant was
    reported as a missing database."""
    expected = await _raised(lambda: _official_at(oracle_url, **kwargs))
    got = await _raised(lambda: sharded_chroma.AsyncHttpClient(shards=shard_urls, **kwargs))
    assert isinstance(expected, NotFoundError)
    assert type(got) is type(expected)
    assert str(got) == str(expected)


async def test_not_a_map_metadata_error_names_the_type(sharded: Any) -> None:
    """The official message quotes a byte offset of its own request body; ours names the
    field and the type instead (the class, ChromaError, is the same: see BAD_CALLS)."""
    with pytest.raises(ChromaError) as raised:
        await sharded.create_collection("abc", metadata=[1], **NO_EF)
    assert type(raised.value) is ChromaError
    assert "metadata" in str(raised.value) and "list" in str(raised.value)
    with pytest.raises(orjson.JSONEncodeError):
        await sharded.create_collection("abc", metadata={1}, **NO_EF)
    assert await sharded.count_collections() == 0


async def test_empty_metadata_refusal_is_the_servers_wording(sharded: Any) -> None:
    """Pins the message for a valid name, so a change in the mirrored wording shows up even
    if the oracle comparison above were skipped."""
    with pytest.raises(InvalidArgumentError) as raised:
        await sharded.get_or_create_collection("abc", metadata={}, **NO_EF)
    assert str(raised.value) == "Validation error: metadata: Metadata cannot be empty"
