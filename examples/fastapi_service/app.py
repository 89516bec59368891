"""A FastAPI search service on a sharded Chroma cluster.

The only Chroma-specific line that changes from a single-server service is the client factory:
``chromadb.AsyncHttpClient(host=..., port=...)`` becomes
``sharded_chroma.AsyncHttpClient(topology=...)``. The client is created once in the lifespan,
shared by every request, and closed on shutdown.

Run against a dev cluster (``sharded-chroma dev`` writes cluster.toml):

    SHARDED_CHROMA_TOPOLOGY=cluster.toml uvicorn examples.fastapi_service.app:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from chromadb.errors import NotFoundError
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

import sharded_chroma

COLLECTION = "articles"


class Article(BaseModel):
    id: str = Field(min_length=1)
    text: str
    embedding: list[float] = Field(min_length=1)
    region: str


class SearchRequest(BaseModel):
    embedding: list[float] = Field(min_length=1)
    k: int = Field(default=5, ge=1, le=100)
    region: str | None = None


class Hit(BaseModel):
    id: str
    distance: float
    text: str | None
    region: str | None


def create_app(topology: sharded_chroma.Topology | str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        topo = topology or os.environ["SHARDED_CHROMA_TOPOLOGY"]
        async with await sharded_chroma.AsyncHttpClient(topology=topo) as client:
            app.state.collection = await client.get_or_create_collection(
                COLLECTION, embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
            )
            yield

    app = FastAPI(title="sharded search", lifespan=lifespan)

    def collection(request: Request) -> sharded_chroma.ShardedCollection:
        col: sharded_chroma.ShardedCollection = request.app.state.collection
        return col

    @app.post("/articles", status_code=201)
    async def ingest(articles: list[Article], request: Request) -> dict[str, int]:
        if not articles:
            raise HTTPException(422, "no articles")
        await collection(request).upsert(
            ids=[a.id for a in articles],
            embeddings=[a.embedding for a in articles],
            documents=[a.text for a in articles],
            metadatas=[{"region": a.region} for a in articles],
        )
        return {"upserted": len(articles)}

    @app.post("/search")
    async def search(body: SearchRequest, request: Request) -> list[Hit]:
        where: Any = {"region": body.region} if body.region else None
        res = await collection(request).query(
            query_embeddings=[body.embedding], n_results=body.k, where=where
        )
        docs = (res["documents"] or [[]])[0]
        metas = (res["metadatas"] or [[]])[0]
        return [
            Hit(
                id=rid,
                distance=dist,
                text=docs[i],
                region=str(metas[i]["region"]) if metas[i] else None,
            )
            for i, (rid, dist) in enumerate(
                zip(res["ids"][0], (res["distances"] or [[]])[0], strict=True)
            )
        ]

    @app.get("/articles/{article_id}")
    async def read(article_id: str, request: Request) -> dict[str, Any]:
        got = await collection(request).get(ids=[article_id])
        if not got["ids"]:
            raise HTTPException(404, f"no article {article_id!r}")
        return {"id": got["ids"][0], "text": (got["documents"] or [None])[0]}

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, int]:
        try:
            return {"articles": await collection(request).count()}
        except NotFoundError as exc:
            raise HTTPException(503, "collection is gone") from exc

    return app


app = create_app() if os.environ.get("SHARDED_CHROMA_TOPOLOGY") else None
