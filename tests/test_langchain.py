"""LangChain's ``Chroma`` vector store (the real ``langchain-chroma`` package) over a 3-shard
cluster through ``sharded_chroma.HttpClient``, against the same store over one plain Chroma
server with chromadb's own ``HttpClient`` (the oracle): every answer must be the same.

The scenario calls what the package calls on its client and collection: ``upsert`` (texts
with and without metadata), ``query`` with ``where`` and ``where_document``, ``get`` with
``limit``/``offset``, ``update`` through chromadb's ``create_batches``, ``delete`` by ids and by
filter, MMR (which asks for embeddings), ``from_texts`` (batches sized by the collection's
client) and ``delete_collection``; then LangChain's async methods, which run the sync ones in an
executor: many threads on one client at once.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import chromadb
import langchain_chroma
import pytest
from chromadb.config import Settings
from langchain_core.documents import Document

import sharded_chroma
from tests._embeddings import WordEmbeddings, corpus
from tests._nodes import port_of

SCORE_TOL = 1e-4


@pytest.fixture
def clients(oracle_url: str, shard_urls: list[str]) -> Iterator[tuple[Any, Any]]:
    oracle = chromadb.HttpClient(
        host="127.0.0.1",
        port=port_of(oracle_url),
        settings=Settings(anonymized_telemetry=False),
    )
    with sharded_chroma.HttpClient(shards=shard_urls) as sharded:
        yield oracle, sharded


def _docs(docs: list[Document]) -> list[tuple[Any, str, dict[str, Any]]]:
    return [(d.id, d.page_content, d.metadata) for d in docs]


def _scored(pairs: list[tuple[Document, float]]) -> list[tuple[Any, str, dict[str, Any], float]]:
    return [(d.id, d.page_content, d.metadata, s) for d, s in pairs]


def assert_same(expected: Any, actual: Any, where: str) -> None:
    """Equal, except floats, which may differ in their last bits between two servers."""
    if isinstance(expected, float):
        assert isinstance(actual, float), f"{where}: {actual!r} is not a float"
        assert math.isclose(expected, actual, rel_tol=SCORE_TOL, abs_tol=SCORE_TOL), where
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)), f"{where}: {actual!r}"
        assert len(expected) == len(actual), f"{where}: {len(actual)} != {len(expected)} items"
        for n, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{where}[{n}]")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys(), where
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}.{key}")
    else:
        assert expected == actual, f"{where}: {actual!r} != {expected!r}"


def scenario(client: Any) -> dict[str, Any]:
    """Everything LangChain does with a client, and what it answered."""
    emb = WordEmbeddings()
    texts, metas = corpus(60)
    store = langchain_chroma.Chroma(
        client=client,
        collection_name="langchain",
        embedding_function=emb,
        collection_metadata={"hnsw:space": "cosine"},
    )
    out: dict[str, Any] = {}
    ids = [f"d{i:03d}" for i in range(len(texts))]
    # Every fifth text without metadata: the store splits them into a second upsert.
    store.add_texts(texts, [m if i % 5 else {} for i, m in enumerate(metas)], ids=ids)
    out["search"] = _docs(store.similarity_search("alpha river stone", k=5))
    out["scored"] = _scored(store.similarity_search_with_score("beta cloud", k=7))
    out["filtered"] = _scored(
        store.similarity_search_with_score("gamma", k=6, filter={"topic": "rivers"})
    )
    out["both_filters"] = _docs(
        store.similarity_search(
            "delta", k=4, filter={"n": {"$gte": 10}}, where_document={"$contains": "stone"}
        )
    )
    out["relevance"] = _scored(store.similarity_search_with_relevance_scores("alpha", k=3))
    out["mmr"] = _docs(store.max_marginal_relevance_search("river cloud", k=4, fetch_k=12))
    out["page"] = store.get(limit=7, offset=5, include=["documents", "metadatas"])
    out["where"] = store.get(where={"topic": "clouds"}, include=["metadatas"])
    # (a record without metadata fails in get_by_ids on any server: a LangChain limitation)
    out["by_ids"] = _docs(store.get_by_ids(["d003", "d011", "missing"]))
    store.update_documents(
        ["d001", "d002"],
        [
            Document(page_content="alpha alpha rewritten", metadata={"topic": "new", "n": 1}),
            Document(page_content="beta rewritten", metadata={"topic": "new", "n": 2}),
        ],
    )
    out["after_update"] = _docs(store.similarity_search("alpha rewritten", k=2))
    store.delete(ids=["d004", "d005", "d006"])
    store.delete(where={"topic": "stones"})
    out["after_delete"] = store.get(include=["documents", "metadatas"])
    out["count"] = store._collection.count()

    made = langchain_chroma.Chroma.from_texts(
        texts[:25],
        emb,
        metadatas=metas[:25],
        ids=[f"f{i}" for i in range(25)],
        client=client,
        collection_name="lc_from_texts",
    )
    out["from_texts"] = _scored(made.similarity_search_with_score("stone cloud", k=5))
    made.delete_collection()
    out["collections"] = sorted(c.name for c in client.list_collections())
    return out


def test_langchain_store_answers_as_over_one_server(clients: tuple[Any, Any]) -> None:
    oracle, sharded = clients
    expected = scenario(oracle)
    actual = scenario(sharded)
    assert expected["count"] > 20 and len(expected["filtered"]) == 6  # the scenario has data
    for key in expected:
        assert_same(expected[key], actual[key], key)
    # The records really are spread: every shard holds part of the collection.
    layout = sharded.layout("langchain")
    assert all(n > 0 for n in layout.shards.values()), layout


def test_langchain_async_methods_share_one_client_from_threads(shard_urls: list[str]) -> None:
    """LangChain's async methods run the sync ones in the loop's executor: many threads call
    one client at once, each with its own ids, then search concurrently."""
    emb = WordEmbeddings()
    texts, metas = corpus(80)
    with sharded_chroma.HttpClient(shards=shard_urls) as client:
        store = langchain_chroma.Chroma(
            client=client, collection_name="lc_async", embedding_function=emb
        )

        async def run() -> list[list[Document]]:
            await asyncio.gather(
                *(
                    store.aadd_texts(
                        texts[i : i + 8], metas[i : i + 8], ids=[f"a{j}" for j in range(i, i + 8)]
                    )
                    for i in range(0, 80, 8)
                )
            )
            return await asyncio.gather(
                *(store.asimilarity_search(texts[i], k=1) for i in range(0, 80, 4))
            )

        found = asyncio.run(run())
        assert store._collection.count() == 80
        got = store.get(include=[])
        assert sorted(got["ids"]) == sorted(f"a{j}" for j in range(80))
        # Each text's own record is its nearest neighbour (the embedding is deterministic).
        assert [docs[0].page_content for docs in found] == [texts[i] for i in range(0, 80, 4)]
