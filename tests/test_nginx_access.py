"""Auth and TLS against a real nginx in front of real Chroma servers (docs/nginx samples).

Right credentials work for every kind; each wrong setup fails at once (one request reaches
nginx, none is retried) with an error of its own class naming the node and the cause, and no
secret appears in any exception text or log line, even when nginx's error page echoes the
request's headers back.
"""

from __future__ import annotations

import base64
import logging
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import anyio
import bcrypt
import pytest

import sharded_chroma
from sharded_chroma import (
    AuthenticationError,
    NodeAccessError,
    PartialWriteError,
    ShardedClient,
    TLSError,
    Topology,
    WriteConcernError,
)
from tests._nginx import Certs, LocalNginx, make_certs, nginx_executable
from tests._nodes import clean, node_records, official

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("official_pools")]

TOKEN = "tok-7f3a9c1e5b2d8f40a6c4e2b9d1f3a5c7"
WRONG_TOKEN = "tok-wrong-0e1d2c3b4a5968778695a4b3c2d1e0f"
PASSWORD = "pw-correct-horse-battery-staple-41"
WRONG_PASSWORD = "pw-wrong-horse-battery-staple-99"


def _basic(password: str) -> str:
    return base64.b64encode(f"reader:{password}".encode()).decode()


SECRETS = (TOKEN, WRONG_TOKEN, PASSWORD, WRONG_PASSWORD, _basic(PASSWORD), _basic(WRONG_PASSWORD))

TOKEN_SNIPPETS: dict[str, str | None] = {"http-token.conf": None, "location-token.conf": None}
# The misconfiguration seen in the wild: an error page that writes the request's credentials
# back into the answer body.
ECHO_SNIPPETS: dict[str, str | None] = {
    **TOKEN_SNIPPETS,
    "location-echo.conf": "error_page 401 = @echo;\n",
    "server-echo.conf": (
        "location @echo {\n"
        '    return 401 "<html><body>denied: Authorization: $http_authorization '
        'X-Chroma-Token: $http_x_chroma_token raw $http_authorization</body></html>";\n'
        "}\n"
    ),
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    nginx_executable()
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A second CA, which no proxy trusts and no client knows."""
    return make_certs(tmp_path_factory.mktemp("other-certs"))


@pytest.fixture
def proxies(tmp_path: Path, certs: Certs, shard_urls: list[str]) -> Iterator[Any]:
    """Start one nginx per shard (or per URL of ``upstreams``):
    ``proxies(snippets, server_certs=..., values=...)``."""
    with ExitStack() as stack:

        def start(
            snippets: Mapping[str, str | None],
            *,
            server_certs: Certs | None = None,
            values: Mapping[str, str] | None = None,
            upstreams: Sequence[str] | None = None,
        ) -> list[LocalNginx]:
            out = []
            for url in upstreams or shard_urls:
                run = tmp_path / f"nginx-{len(list(tmp_path.glob('nginx-*')))}"
                node = LocalNginx(
                    run,
                    upstream=url.removeprefix("http://"),
                    certs=server_certs or certs,
                    snippets=snippets,
                    values={"TOKEN": TOKEN, **(values or {})},
                )
                stack.enter_context(node)
                out.append(node)
            return out

        yield start


def topology(urls: Sequence[str], **node: Any) -> Topology:
    return Topology.build(
        {
            "defaults": node,
            "shards": [{"name": f"s{i}", "primary": u} for i, u in enumerate(urls)],
        }
    )


@pytest.fixture
def leak_check(caplog: pytest.LogCaptureFixture) -> Iterator[list[BaseException]]:
    """Collects errors a test saw; afterwards, no secret may be in them (their whole chain and
    traceback) or in any log line written meanwhile."""
    caplog.set_level(logging.DEBUG)
    seen: list[BaseException] = []
    yield seen
    texts = [r.getMessage() for r in caplog.records]
    texts += ["".join(traceback.format_exception(e)) for e in seen]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"secret leaked in: {text[:300]}"


def requests_seen(nodes: Sequence[LocalNginx]) -> int:
    total = 0
    for node in nodes:
        log = node.run_dir / "access.log"
        total += len(log.read_text().splitlines()) if log.exists() else 0
    return total


async def requests_since(nodes: Sequence[LocalNginx], before: int, expected: int) -> int:
    """Requests the proxies logged since ``before``, once their logs settled: nginx writes a
    request's line after it sent the answer, so a client can act on a refusal before the line
    is there. Waits for ``expected`` lines (at most 5 s), then a little longer for any more."""
    deadline = time.monotonic() + 5.0
    while requests_seen(nodes) - before < expected and time.monotonic() < deadline:  # noqa: ASYNC110 - a file
        await anyio.sleep(0.05)
    await anyio.sleep(0.3)
    return requests_seen(nodes) - before


async def round_trip(client: ShardedClient, oracle_url: str) -> None:
    """Writes and reads through the proxies give what one plain server gives."""
    ids = [f"id{i}" for i in range(60)]
    # Distinct distances, so top-k has one right answer.
    emb = [[float(i), float(i * i % 17) + i / 100, 1.0] for i in range(60)]
    meta = [{"n": i, "even": i % 2 == 0} for i in range(60)]
    docs = [f"doc {i}" for i in range(60)]
    oracle = await official(oracle_url)
    answers = []
    for c in (client, oracle):
        col = await c.create_collection("auth", embedding_function=None)
        await col.add(ids=ids, embeddings=emb, metadatas=meta, documents=docs)
        await col.delete(ids=["id3", "id4"])
        await col.update(ids=["id5"], documents=["changed"], embeddings=[[9.0, 9.0, 9.0]])
        got = await col.get(where={"even": True}, include=["documents", "metadatas"])
        order = sorted(range(len(got["ids"])), key=lambda k: got["ids"][k])
        q = await col.query(query_embeddings=[[1.0, 2.0, 1.0]], n_results=7)
        answers.append(
            (
                await col.count(),
                [got["ids"][k] for k in order],
                [got["documents"][k] for k in order],  # type: ignore[index]
                q["ids"],
                q["distances"],
            )
        )
    assert answers[0] == answers[1]


async def test_bearer_token_through_tls(
    proxies: Any,
    certs: Certs,
    oracle_url: str,
    monkeypatch: pytest.MonkeyPatch,
    leak_check: list[BaseException],
) -> None:
    nodes = proxies(TOKEN_SNIPPETS)
    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)
    topo = topology([n.url for n in nodes], token_env="SC_TEST_TOKEN", ca_file=str(certs.ca))
    client = await sharded_chroma.AsyncHttpClient(topology=topo)
    try:
        await round_trip(client, oracle_url)
    finally:
        await client.aclose()
    assert requests_seen(nodes) > 0


async def test_chroma_token_header_from_a_file(
    proxies: Any, certs: Certs, tmp_path: Path, oracle_url: str
) -> None:
    nodes = proxies(TOKEN_SNIPPETS)
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    topo = topology(
        [n.url for n in nodes],
        token_file=str(secret),
        token_header="X-Chroma-Token",
        ca_file=str(certs.ca),
    )
    client = await sharded_chroma.AsyncHttpClient(topology=topo)
    try:
        await round_trip(client, oracle_url)
    finally:
        await client.aclose()


def htpasswd(folder: Path, user: str, password: str) -> Path:
    path = folder / "htpasswd"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    assert hashed.startswith("$2b$")
    path.write_text(f"{user}:{hashed}\n")
    return path


async def test_basic_auth_with_bcrypt_htpasswd(
    proxies: Any,
    certs: Certs,
    tmp_path: Path,
    oracle_url: str,
    monkeypatch: pytest.MonkeyPatch,
    leak_check: list[BaseException],
) -> None:
    users = htpasswd(tmp_path, "reader", PASSWORD)
    nodes = proxies({"location-basic.conf": None}, values={"HTPASSWD": str(users)})
    urls = [n.url for n in nodes]
    monkeypatch.setenv("SC_TEST_PASSWORD", PASSWORD)
    good = topology(urls, username="reader", password_env="SC_TEST_PASSWORD", ca_file=str(certs.ca))
    client = await sharded_chroma.AsyncHttpClient(topology=good)
    try:
        await round_trip(client, oracle_url)
    finally:
        await client.aclose()

    monkeypatch.setenv("SC_TEST_PASSWORD", WRONG_PASSWORD)
    before = requests_seen(nodes)
    with pytest.raises(AuthenticationError) as raised:
        await sharded_chroma.AsyncHttpClient(topology=good)
    leak_check.append(raised.value)
    assert raised.value.status == 401
    assert "user 'reader' with the password from $SC_TEST_PASSWORD was refused" in str(raised.value)
    assert raised.value.node in urls
    # One request per shard: the client asks each primary once, and nobody retries a refusal.
    assert await requests_since(nodes, before, len(urls)) == len(urls)


async def test_wrong_token_fails_at_once_without_leaking_an_echoed_header(
    proxies: Any,
    certs: Certs,
    monkeypatch: pytest.MonkeyPatch,
    leak_check: list[BaseException],
) -> None:
    nodes = proxies(ECHO_SNIPPETS)
    urls = [n.url for n in nodes]
    monkeypatch.setenv("SC_TEST_TOKEN", WRONG_TOKEN)
    for header in ("Authorization", "X-Chroma-Token"):
        topo = topology(urls, token_env="SC_TEST_TOKEN", token_header=header, ca_file=str(certs.ca))
        before = requests_seen(nodes)
        with pytest.raises(AuthenticationError) as raised:
            await sharded_chroma.AsyncHttpClient(topology=topo)
        leak_check.append(raised.value)
        text = str(raised.value)
        assert raised.value.node in urls and raised.value.node in text
        assert "the token from $SC_TEST_TOKEN was refused" in text
        # The echoed page is shown, with the credential masked.
        assert "denied" in text and "***" in text
        assert await requests_since(nodes, before, len(urls)) == len(urls)


async def test_missing_credentials_say_so(proxies: Any, certs: Certs) -> None:
    nodes = proxies(TOKEN_SNIPPETS)
    with pytest.raises(AuthenticationError, match="no credentials are configured"):
        await sharded_chroma.AsyncHttpClient(
            topology=topology([n.url for n in nodes], ca_file=str(certs.ca))
        )


async def test_unknown_ca_fails_at_once(
    proxies: Any, other_certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = proxies(TOKEN_SNIPPETS)
    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)
    for ca in (None, str(other_certs.ca)):  # the system's CAs, then another CA
        topo = topology([n.url for n in nodes], token_env="SC_TEST_TOKEN", ca_file=ca)
        with pytest.raises(TLSError) as raised:
            await sharded_chroma.AsyncHttpClient(topology=topo)
        assert "did not verify" in str(raised.value) and "set ca_file" in str(raised.value)
        assert raised.value.node in str(raised.value)
    # A TLS failure happens before any request: nginx logged none.
    assert requests_seen(nodes) == 0


async def test_expired_server_certificate(
    proxies: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expired = make_certs(tmp_path / "expired", expired=True)
    nodes = proxies(TOKEN_SNIPPETS, server_certs=expired)
    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)
    topo = topology([n.url for n in nodes], token_env="SC_TEST_TOKEN", ca_file=str(expired.ca))
    with pytest.raises(TLSError, match="expired"):
        await sharded_chroma.AsyncHttpClient(topology=topo)


async def test_plain_http_to_the_tls_port(proxies: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = proxies(TOKEN_SNIPPETS)
    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)
    urls = [n.url.replace("https://", "http://") for n in nodes]
    with pytest.raises(TLSError, match="plain HTTP was sent to a TLS port") as raised:
        await sharded_chroma.AsyncHttpClient(topology=topology(urls, token_env="SC_TEST_TOKEN"))
    assert raised.value.status == 400


async def test_client_certificates(
    proxies: Any,
    certs: Certs,
    other_certs: Certs,
    oracle_url: str,
    monkeypatch: pytest.MonkeyPatch,
    leak_check: list[BaseException],
) -> None:
    nodes = proxies({**TOKEN_SNIPPETS, "server-client-cert.conf": None})
    urls = [n.url for n in nodes]
    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)
    common = {"token_env": "SC_TEST_TOKEN", "ca_file": str(certs.ca)}
    with pytest.raises(TLSError, match="requires a client certificate") as raised:
        await sharded_chroma.AsyncHttpClient(topology=topology(urls, **common))
    leak_check.append(raised.value)
    stranger = topology(
        urls, **common, cert_file=str(other_certs.client_cert), key_file=str(other_certs.client_key)
    )
    with pytest.raises(TLSError, match="refused the client certificate"):
        await sharded_chroma.AsyncHttpClient(topology=stranger)
    mutual = topology(
        urls, **common, cert_file=str(certs.client_cert), key_file=str(certs.client_key)
    )
    client = await sharded_chroma.AsyncHttpClient(topology=mutual)
    try:
        await round_trip(client, oracle_url)
    finally:
        await client.aclose()


async def test_a_replica_that_refuses_the_token_is_owed_the_write(
    proxies: Any,
    certs: Certs,
    shard_urls: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    leak_check: list[BaseException],
) -> None:
    """A write that a replica refuses for credentials is an error to its caller at once (its
    write concern, all copies, is not met; the error names the refusal), and the replica is
    still owed it: a client configured right replays it, and the copies converge. Nothing
    the primary stored is lost to the misconfiguration."""
    (replica_proxy,) = proxies(TOKEN_SNIPPETS, upstreams=shard_urls[:1])
    primary = shard_urls[1]
    replica = replica_proxy.url
    hints = str(tmp_path / "hints")

    def topo() -> Topology:
        node = {"token_env": "SC_TEST_TOKEN", "ca_file": str(certs.ca)}
        return Topology.build(
            {
                "shards": [
                    {"name": "s0", "primary": primary, "replicas": [{"url": replica, **node}]}
                ],
                # Reads stay on the primary (a read from the replica would fail at once too);
                # what is tested is the write that reaches both.
                "replication": {
                    "hints_dir": hints,
                    "replay_in_background": False,
                    "read_selection": "primary_only",
                },
            }
        )

    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)
    client = await sharded_chroma.AsyncHttpClient(topology=topo())
    try:
        await client.create_collection("owed", embedding_function=None)
    finally:
        await client.aclose()

    monkeypatch.setenv("SC_TEST_TOKEN", WRONG_TOKEN)
    async with AsyncExitStack() as stack:
        client = await sharded_chroma.AsyncHttpClient(topology=topo())
        stack.push_async_callback(client.aclose)
        col = await client.get_collection("owed", embedding_function=None)
        with pytest.raises(PartialWriteError) as raised:
            await col.add(ids=["a", "b"], embeddings=[[1.0, 0.0], [0.0, 1.0]], documents=["x", "y"])
        leak_check.append(raised.value)
        concern = raised.value.failures["s0"]
        assert isinstance(concern, WriteConcernError) and concern.acknowledged == (primary,)
        refusal = concern.failures[replica]
        assert isinstance(refusal, AuthenticationError) and refusal.node == replica
        assert "the token from $SC_TEST_TOKEN was refused" in str(raised.value)
        # The primary stored it; reads are served by the copy that is caught up.
        assert sorted((await col.get())["ids"]) == ["a", "b"]

    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)
    client = await sharded_chroma.AsyncHttpClient(topology=topo())
    try:
        assert await client.replay_hints() >= 1
    finally:
        await client.aclose()
    # The replica, read behind its proxy's back, now holds what the primary holds.
    want = clean(await node_records(primary, "owed"))
    got = clean(await node_records(shard_urls[0], "owed"))
    assert sorted(want) == ["a", "b"]
    assert got == want


async def test_refusal_classes_are_node_access_errors() -> None:
    assert issubclass(AuthenticationError, NodeAccessError)
    assert issubclass(TLSError, NodeAccessError)
    assert not issubclass(NodeAccessError, sharded_chroma.NodeUnavailableError)


async def test_a_write_every_copy_refuses_is_owed_to_nobody(
    proxies: Any,
    certs: Certs,
    shard_urls: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    leak_check: list[BaseException],
) -> None:
    """A read-only credential (the proxies answer 403 to writes): the write raises the
    refusal at once, and since no copy stored it, no copy is owed it: nothing waits in the
    hint log to be applied later by a client with other credentials, and reads go on."""
    read_only = {
        **TOKEN_SNIPPETS,
        "location-read-only.conf": (
            'if ($request_uri ~ "/(add|upsert|update|delete)$") {\n    return 403;\n}\n'
        ),
    }
    nodes = proxies(read_only, upstreams=shard_urls[:2])
    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)
    node = {"token_env": "SC_TEST_TOKEN", "ca_file": str(certs.ca)}
    topo = Topology.build(
        {
            "shards": [
                {
                    "name": "s0",
                    "primary": {"url": nodes[0].url, **node},
                    "replicas": [{"url": nodes[1].url, **node}],
                }
            ],
            "replication": {"hints_dir": str(tmp_path / "hints"), "replay_in_background": False},
        }
    )
    client = await sharded_chroma.AsyncHttpClient(topology=topo)
    try:
        col = await client.create_collection("read-only", embedding_function=None)
        with pytest.raises(AuthenticationError) as raised:
            await col.add(ids=["a"], embeddings=[[1.0]])
        leak_check.append(raised.value)
        assert raised.value.status == 403
        assert "was accepted but is not allowed this request" in str(raised.value)
        assert all(s.pending_hints == 0 and not s.stale for s in await client.status())
        assert await client.count_collections() == 1
        assert (await col.get())["ids"] == []
        assert await client.replay_hints() == 0
    finally:
        await client.aclose()


async def test_concurrent_writers_beside_a_refusing_replica_lose_nothing(
    proxies: Any,
    certs: Certs,
    shard_urls: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six tasks add, upsert, update, delete and read the same twelve ids while the replica's
    proxy refuses this client's token (write concern one: the primary acknowledges). The
    history checker passes on the primary; then a client with the right token replays what
    the replica is owed, and the replica equals the primary record for record."""
    from tests._history import check
    from tests.test_concurrent_writes import pool_of, seen, writers

    (replica_proxy,) = proxies(TOKEN_SNIPPETS, upstreams=shard_urls[:1])
    primary = shard_urls[1]
    hints = str(tmp_path / "hints")

    def topo() -> Topology:
        node = {"token_env": "SC_TEST_TOKEN", "ca_file": str(certs.ca)}
        return Topology.build(
            {
                "shards": [
                    {
                        "name": "s0",
                        "primary": primary,
                        "replicas": [{"url": replica_proxy.url, **node}],
                    }
                ],
                "replication": {
                    "hints_dir": hints,
                    "replay_in_background": False,
                    "read_selection": "primary_only",
                    "write_concern": "one",
                },
            }
        )

    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)
    async with await sharded_chroma.AsyncHttpClient(topology=topo()) as client:
        await client.create_collection("race", embedding_function=None)
    monkeypatch.setenv("SC_TEST_TOKEN", WRONG_TOKEN)
    async with await sharded_chroma.AsyncHttpClient(topology=topo()) as client:
        col = await client.get_collection("race", embedding_function=None)
        log = await writers(col, "w", 6, pool_of(12), 3.0)
        final = seen(await col.get(include=["metadatas", "documents"]))
    acked = [op for op in log.ops if op.kind != "get" and op.outcome == "ok"]
    assert len(acked) > 50, log.errors[:3]
    assert not any("AuthenticationError" in e for e in log.errors), log.errors[:3]
    found = check(log.ops, final)
    assert not found, found[:10]

    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)
    async with await sharded_chroma.AsyncHttpClient(topology=topo()) as client:
        assert await client.replay_hints() > 0
        assert all(s.pending_hints == 0 for s in await client.status())
    want = clean(await node_records(primary, "race"))
    got = clean(await node_records(shard_urls[0], "race"))
    assert got == want
    assert {rid for rid, _ in final} == set(want)
