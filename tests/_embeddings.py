"""A deterministic text embedding and a small corpus for the LangChain and LlamaIndex tests.

Each word maps to a fixed pseudo-random vector (from its SHA-256), a text to the normalised
sum of its words' vectors: texts sharing words are near each other, and the same text always
gives the same vector, in any process. It has the shape of LangChain's ``Embeddings``.
"""

from __future__ import annotations

import hashlib
import math

__all__ = ["DIM", "WordEmbeddings", "corpus", "embed"]

DIM = 16
_WORDS = ("alpha", "beta", "gamma", "delta", "river", "cloud", "stone", "light")
_TOPICS = ("rivers", "clouds", "stones")


def _word(word: str) -> list[float]:
    digest = hashlib.sha256(word.encode()).digest()
    return [(b - 127.5) / 127.5 for b in digest[:DIM]]


def embed(text: str) -> list[float]:
    total = [0.0] * DIM
    for word in text.lower().split():
        for n, x in enumerate(_word(word)):
            total[n] += x
    norm = math.sqrt(sum(x * x for x in total)) or 1.0
    return [x / norm for x in total]


class WordEmbeddings:
    """LangChain's ``Embeddings`` interface (duck-typed: the package only calls these)."""

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [embed(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return embed(text)

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embed_documents(texts)

    async def aembed_query(self, text: str) -> list[float]:
        return self.embed_query(text)


def corpus(n: int) -> tuple[list[str], list[dict[str, str | int]]]:
    """``n`` distinct texts (each has a word of its own) with a topic and a number."""
    texts = []
    metas: list[dict[str, str | int]] = []
    for i in range(n):
        words = [_WORDS[(i * 3 + k * 5) % len(_WORDS)] for k in range(1 + i % 3)]
        texts.append(" ".join([*words, f"w{i}"]))
        metas.append({"topic": _TOPICS[i % len(_TOPICS)], "n": i})
    return texts, metas
