"""LlamaIndex's ``ChromaVectorStore`` (the real ``llama-index-vector-stores-chroma`` package)
over a 3-shard cluster through ``sharded_chroma.HttpClient``, against the same store over one
plain Chroma server with chromadb's own ``HttpClient`` (the oracle).

``from_collection`` checks ``isinstance(collection, chromadb.Collection)``; the scenario then
adds nodes with their own embeddings and queries with LlamaIndex's metadata filters (which it
translates to Chroma's ``where``), MMR, a text filter, a query without embedding (a ``get``),
``get_nodes``, ``delete`` by reference document, ``delete_nodes`` by ids and filters, and
``clear``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import chromadb
import pytest
from chromadb.config import Settings
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)
from llama_index.vector_stores.chroma import ChromaVectorStore

import sharded_chroma
from tests._embeddings import corpus, embed
from tests._nodes import port_of
from tests.test_langchain import assert_same


@pytest.fixture
def clients(oracle_url: str, shard_urls: list[str]) -> Iterator[tuple[Any, Any]]:
    oracle = chromadb.HttpClient(
        host="127.0.0.1",
        port=port_of(oracle_url),
        settings=Settings(anonymized_telemetry=False),
    )
    with sharded_chroma.HttpClient(shards=shard_urls) as sharded:
        yield oracle, sharded


def _nodes(n: int) -> list[TextNode]:
    texts, metas = corpus(n)
    out = []
    for i, (text, meta) in enumerate(zip(texts, metas, strict=True)):
        node = TextNode(id_=f"node{i:03d}", text=text, metadata=dict(meta), embedding=embed(text))
        # Three source documents, so delete(ref_doc_id) removes a third of the nodes.
        node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=f"doc{i % 3}")
        out.append(node)
    return out


def _result(result: Any) -> dict[str, Any]:
    return {
        "ids": result.ids,
        "texts": [n.get_content() for n in result.nodes or []],
        "metadata": [
            {k: v for k, v in n.metadata.items() if k in ("topic", "n")} for n in result.nodes or []
        ],
        "similarities": result.similarities,
    }


def scenario(client: Any) -> dict[str, Any]:
    col = client.get_or_create_collection("llamaindex", embedding_function=None)
    store = ChromaVectorStore.from_collection(col)
    out: dict[str, Any] = {}
    added = store.add(_nodes(60))
    out["added"] = sorted(added)
    q = embed("alpha river")
    out["plain"] = _result(store.query(VectorStoreQuery(query_embedding=q, similarity_top_k=6)))
    topic = MetadataFilters(filters=[MetadataFilter(key="topic", value="clouds")])
    out["topic"] = _result(
        store.query(VectorStoreQuery(query_embedding=q, similarity_top_k=5, filters=topic))
    )
    either = MetadataFilters(
        filters=[
            MetadataFilter(key="n", value=40, operator=FilterOperator.GTE),
            MetadataFilter(key="topic", value=["rivers", "stones"], operator=FilterOperator.IN),
        ],
        condition=FilterCondition.AND,
    )
    out["and_in"] = _result(
        store.query(VectorStoreQuery(query_embedding=q, similarity_top_k=8, filters=either))
    )
    out["mmr"] = _result(
        store.query(
            VectorStoreQuery(
                query_embedding=embed("stone cloud"),
                similarity_top_k=4,
                mode=VectorStoreQueryMode.MMR,
            ),
            mmr_threshold=0.5,
        )
    )
    out["where_document"] = _result(
        store.query(
            VectorStoreQuery(query_embedding=q, similarity_top_k=5),
            where_document={"$contains": "gamma"},
        )
    )
    # No embedding: the store reads with get() and a limit.
    out["no_embedding"] = _result(store.query(VectorStoreQuery(similarity_top_k=4, filters=topic)))
    out["get_nodes"] = sorted(n.node_id for n in store.get_nodes(["node001", "node002", "x"]))
    store.delete("doc1")
    out["after_delete_ref"] = sorted(col.get(include=[])["ids"])
    store.delete_nodes(["node003", "node006"])
    # Ids and a filter: only the listed nodes that match it go. (An empty id list with a
    # filter is refused by chromadb's own validation, on any server.)
    store.delete_nodes(
        [f"node{i:03d}" for i in range(10, 30)],
        filters=MetadataFilters(filters=[MetadataFilter(key="topic", value="stones")]),
    )
    out["after_delete_nodes"] = sorted(col.get(include=[])["ids"])
    out["count"] = col.count()
    store.clear()
    out["after_clear"] = col.count()
    return out


def test_llamaindex_store_answers_as_over_one_server(clients: tuple[Any, Any]) -> None:
    oracle, sharded = clients
    expected = scenario(oracle)
    actual = scenario(sharded)
    assert len(expected["topic"]["ids"]) == 5 and expected["count"] > 10
    for key in expected:
        assert_same(expected[key], actual[key], key)


def test_from_collection_accepts_the_sync_collection(shard_urls: list[str]) -> None:
    with sharded_chroma.HttpClient(shards=shard_urls) as client:
        col = client.create_collection("isinstance", embedding_function=None)
        assert isinstance(col, chromadb.Collection)
        assert ChromaVectorStore.from_collection(col).client is col
