"""Topology: building, TOML loading, validation, secrets hygiene; client construction options."""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import pydantic
import pytest

import sharded_chroma
from sharded_chroma import ConfigurationError, NodeConfig, ShardConfig, Topology
from sharded_chroma._routing import SlotTable

SECRET = "s3cret-value"
TOKEN = "t0ken-do-not-print"


def _write(tmp_path: Path, text: str, name: str = "cluster.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- from_urls --------------------------------------------------------------------------------


def test_from_urls_names_shards_in_order() -> None:
    topo = Topology.from_urls(["http://10.0.0.1:8000", "https://db.example:8443/"])
    assert [s.name for s in topo.shards] == ["s0", "s1"]
    assert [s.primary.url for s in topo.shards] == [
        "http://10.0.0.1:8000",
        "https://db.example:8443",  # trailing slash removed
    ]
    assert all(s.replicas == () for s in topo.shards)
    assert topo.tenant == "default_tenant"
    assert topo.database == "default_database"
    assert topo.slots == 4096
    assert topo.routing_key is None
    assert topo.slot_table() == SlotTable.uniform(2, 4096)


def test_from_urls_passes_options() -> None:
    topo = Topology.from_urls(
        ["http://h:1", "http://h:2", "http://h:3"],
        tenant="t1",
        database="d1",
        slots=16,
        routing_key="tenant",
    )
    assert (topo.tenant, topo.database, topo.slots, topo.routing_key) == ("t1", "d1", 16, "tenant")
    assert topo.slot_table().slots == 16
    assert topo.slot_table().n_shards == 3


def test_from_urls_rejects_a_single_string() -> None:
    with pytest.raises(ConfigurationError, match="list of URLs"):
        Topology.from_urls("http://h:1")  # type: ignore[arg-type]


# -- from_toml --------------------------------------------------------------------------------


def test_from_toml_full_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHROMA_TOKEN", TOKEN)
    monkeypatch.setenv("OTHER_TOKEN", "other")
    path = _write(
        tmp_path,
        """
tenant = "acme"
database = "prod"
slots = 1024
routing_key = "tenant"

[defaults]
timeout = 12.5
token_env = "CHROMA_TOKEN"

[[shards]]
name = "eu-1"
primary = "http://10.0.0.1:8000"
replicas = ["http://10.0.0.2:8000", { url = "http://10.0.0.3:8000", timeout = 3.0 }]

[[shards]]
name = "us-1"
replicas = []

[shards.primary]
url = "https://10.0.1.1:8443"
ca_file = "ca.pem"
token_env = "OTHER_TOKEN"
token_header = "X-Chroma-Token"
""",
    )
    topo = Topology.from_toml(path)
    assert (topo.tenant, topo.database, topo.slots, topo.routing_key) == (
        "acme",
        "prod",
        1024,
        "tenant",
    )
    eu, us = topo.shards
    assert eu.name == "eu-1"
    assert eu.primary.url == "http://10.0.0.1:8000"
    assert [n.url for n in eu.replicas] == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"]
    assert [n.url for n in eu.nodes] == [
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
        "http://10.0.0.3:8000",
    ]
    # [defaults] apply to every node, string or table, unless the node overrides them.
    assert eu.primary.timeout == 12.5
    assert eu.replicas[0].timeout == 12.5
    assert eu.replicas[1].timeout == 3.0
    assert all(n.token_env == "CHROMA_TOKEN" for n in eu.nodes)
    assert us.primary.timeout == 12.5
    assert us.primary.ca_file == "ca.pem"
    assert us.primary.token_env == "OTHER_TOKEN"
    assert us.replicas == ()
    # The token is read from the environment, never stored in the config.
    assert eu.primary.resolved_headers() == {"Authorization": f"Bearer {TOKEN}"}
    assert us.primary.resolved_headers() == {"X-Chroma-Token": "other"}
    assert TOKEN not in repr(topo)
    assert TOKEN not in topo.model_dump_json()


def test_from_toml_minimal_file_takes_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, '[[shards]]\nname = "a"\nprimary = "http://127.0.0.1:9000"\n')
    topo = Topology.from_toml(str(path))  # str paths work too
    assert topo == Topology(
        shards=(ShardConfig(name="a", primary=NodeConfig(url="http://127.0.0.1:9000")),)
    )
    node = topo.shards[0].primary
    assert node.headers == {}
    assert node.token_env is None
    assert node.verify is True
    assert node.resolved_headers() == {}


def test_from_toml_headers_table(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"""
[[shards]]
name = "a"
primary = {{ url = "http://h:1", headers = {{ "X-Api-Key" = "{SECRET}" }} }}
""",
    )
    topo = Topology.from_toml(path)
    assert topo.shards[0].primary.resolved_headers() == {"X-Api-Key": SECRET}
    assert SECRET not in repr(topo)
    assert SECRET not in str(topo)


def test_from_toml_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"missing\.toml"):
        Topology.from_toml(tmp_path / "missing.toml")
    bad = _write(tmp_path, "[[shards]\nname = ", name="broken.toml")
    with pytest.raises(ConfigurationError, match=r"broken\.toml"):
        Topology.from_toml(bad)


def test_from_toml_unknown_key_in_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[defaults]\ntimeuot = 3\n\n[[shards]]\nname = "a"\nprimary = "http://h:1"\n',
    )
    with pytest.raises(ConfigurationError, match="timeuot") as info:
        Topology.from_toml(path)
    assert "cluster.toml" in str(info.value)


# -- validation -------------------------------------------------------------------------------


def _one(node: object, **top: object) -> dict[str, object]:
    return {"shards": [{"name": "a", "primary": node}], **top}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_one("ftp://h:1"), r"http\(s\)://host:port"),
        (_one("h:1"), r"http\(s\)://host:port"),
        (_one("http://"), r"http\(s\)://host:port"),
        (_one("http://user:pw@h:1"), "credentials"),
        (_one("http://h:1/?x=1"), "query"),
        (_one("http://h:port"), "invalid port"),
        (
            {
                "shards": [
                    {"name": "a", "primary": "http://h:1"},
                    {"name": "a", "primary": "http://h:2"},
                ]
            },
            r"shard names must be unique.*'a'",
        ),
        (
            {
                "shards": [
                    {"name": "a", "primary": "http://h:1"},
                    {"name": "b", "primary": "http://h:1/"},
                ]
            },
            r"repeated: \['http://h:1'\]",
        ),
        (
            {"shards": [{"name": "a", "primary": "http://h:1", "replicas": ["http://h:1"]}]},
            r"repeated: \['http://h:1'\]",
        ),
        ({"shards": []}, "shards"),
        ({}, "shards"),
        (
            {
                "shards": [
                    {"name": "a", "primary": "http://h:1"},
                    {"name": "b", "primary": "http://h:2"},
                ],
                "slots": 1,
            },
            r"slots \(1\) must be at least the shard count",
        ),
        (_one("http://h:1", slots=0), "slots"),
        (_one("http://h:1", slots=65537), "slots"),
        (_one("http://h:1", bogus=1), "bogus: Extra inputs"),
        (_one({"url": "http://h:1", "tiemout": 1}), "tiemout"),
        ({"shards": [{"name": "a", "primary": "http://h:1", "zone": "x"}]}, "zone"),
        (_one({"url": "http://h:1", "timeout": 0}), "timeout"),
        (_one({"url": "http://h:1", "token_header": "Cookie"}), "token_header"),
        (_one("http://h:1", routing_key=""), "routing_key"),
        ({"shards": [{"name": "bad name!", "primary": "http://h:1"}]}, "name"),
        ({"shards": [{"name": "a"}]}, "primary"),
    ],
)
def test_invalid_topologies_raise_configuration_error(data: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        Topology.build(data)
    assert str(info.value).startswith("invalid topology: ")
    assert isinstance(info.value, sharded_chroma.ShardedChromaError)


def test_from_urls_rejects_zero_shards_and_bad_urls() -> None:
    with pytest.raises(ConfigurationError, match="shards"):
        Topology.from_urls([])
    with pytest.raises(ConfigurationError, match="credentials"):
        Topology.from_urls(["http://user:pw@host:1"])
    with pytest.raises(ConfigurationError, match="repeated"):
        Topology.from_urls(["http://h:1", "http://h:1"])


def test_models_are_frozen() -> None:
    topo = Topology.from_urls(["http://h:1", "http://h:2"])
    with pytest.raises(pydantic.ValidationError):
        topo.tenant = "other"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        topo.shards[0].name = "x"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        topo.shards[0].primary.url = "http://evil:1"  # type: ignore[misc]
    with pytest.raises((TypeError, AttributeError)):
        topo.shards[0] = topo.shards[1]  # type: ignore[index]
    assert topo.tenant == "default_tenant"


def test_node_headers_are_immutable() -> None:
    node = NodeConfig(url="http://h:1", headers={"X-Api-Key": SECRET})
    with pytest.raises(TypeError):
        node.headers["X-Api-Key"] = "changed"  # type: ignore[index]


def test_frozen_topology_is_hashable() -> None:
    topo = Topology.from_urls(["http://h:1"])
    assert hash(topo) == hash(Topology.from_urls(["http://h:1"]))


# -- tokens and secrets -----------------------------------------------------------------------


def test_resolved_headers_reads_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    node = NodeConfig(url="http://h:1", headers={"X-Trace": "1"}, token_env="SC_TEST_TOKEN")
    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)
    assert node.resolved_headers() == {"X-Trace": "1", "Authorization": f"Bearer {TOKEN}"}
    # Read at call time, not at load time.
    monkeypatch.setenv("SC_TEST_TOKEN", "rotated")
    assert node.resolved_headers()["Authorization"] == "Bearer rotated"
    raw = NodeConfig(url="http://h:1", token_env="SC_TEST_TOKEN", token_header="X-Chroma-Token")
    assert raw.resolved_headers() == {"X-Chroma-Token": "rotated"}
    # The config never holds the token.
    assert "rotated" not in repr(node)
    assert "rotated" not in node.model_dump_json()


def test_resolved_headers_unset_env_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SC_TEST_TOKEN_UNSET", raising=False)
    node = NodeConfig(url="http://h:1", token_env="SC_TEST_TOKEN_UNSET")
    with pytest.raises(ConfigurationError, match="SC_TEST_TOKEN_UNSET") as info:
        node.resolved_headers()
    assert "http://h:1" in str(info.value)


def test_secrets_never_appear_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)
    topo = Topology.build(
        {
            "shards": [
                {
                    "name": "a",
                    "primary": {"url": "http://h:1", "headers": {"X-Api-Key": SECRET}},
                    "replicas": [{"url": "http://h:2", "token_env": "SC_TEST_TOKEN"}],
                }
            ]
        }
    )
    node = topo.shards[0].primary
    assert node.resolved_headers() == {"X-Api-Key": SECRET}
    assert topo.shards[0].replicas[0].resolved_headers()["Authorization"] == f"Bearer {TOKEN}"
    for obj in (topo, topo.shards[0], node, topo.shards[0].replicas[0], topo.shards):
        for text in (repr(obj), str(obj), f"{obj}", f"{obj!r}"):
            assert SECRET not in text
            assert TOKEN not in text
    assert "X-Api-Key" not in repr(topo)  # header names are not shown either
    assert "SC_TEST_TOKEN" in repr(topo)  # the variable's name is fine to show


@pytest.mark.parametrize(
    "bad",
    [
        {"url": "nope"},
        {"url": "http://user:pw@host:1"},
        {"url": "http://h:1", "unknown": SECRET},
        {"url": "http://h:1", "timeout": "slow"},
        {"url": "http://h:1", "token": SECRET},
    ],
)
def test_secrets_never_appear_in_configuration_errors(bad: dict[str, object]) -> None:
    data = {
        "shards": [
            {
                "name": "a",
                "primary": {**bad, "headers": {"X-Api-Key": SECRET}},
                "replicas": [{"url": "http://h:9", "headers": {"Authorization": SECRET}}],
            },
            {"name": "b", "primary": {"url": "http://h:2", "headers": {"X-Api-Key": SECRET}}},
        ]
    }
    with pytest.raises(ConfigurationError) as info:
        Topology.build(data)
    err = info.value
    assert SECRET not in str(err)
    assert SECRET not in repr(err)
    assert all(SECRET not in str(arg) for arg in err.args)
    # Not in a printed traceback either (the pydantic error, which echoes inputs, is suppressed).
    printed = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    assert SECRET not in printed
    assert err.__cause__ is None


def test_secret_header_not_in_toml_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"""
[defaults]
headers = {{ "X-Api-Key" = "{SECRET}" }}

[[shards]]
name = "a"
primary = "gopher://h:1"
""",
    )
    with pytest.raises(ConfigurationError, match="gopher") as info:
        Topology.from_toml(path)
    assert SECRET not in str(info.value)


def test_url_password_not_echoed_for_bad_scheme() -> None:
    with pytest.raises(ConfigurationError) as info:
        Topology.from_urls([f"ftp://user:{SECRET}@host:1"])
    assert SECRET not in str(info.value)


def test_one_bad_node_reports_one_problem() -> None:
    with pytest.raises(ConfigurationError) as info:
        Topology.from_urls(["http://h:1/?q=1"])
    assert "at least 1 item" not in str(info.value)


# -- client construction ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_client_needs_exactly_one_of_shards_or_topology(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="exactly one"):
        await sharded_chroma.AsyncHttpClient()
    topo = Topology.from_urls(["http://127.0.0.1:1"])
    with pytest.raises(ConfigurationError, match="exactly one"):
        await sharded_chroma.AsyncHttpClient(shards=["http://127.0.0.1:1"], topology=topo)
    with pytest.raises(ConfigurationError, match="list of URLs"):
        await sharded_chroma.AsyncHttpClient(shards="http://127.0.0.1:1")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="credentials"):
        await sharded_chroma.AsyncHttpClient(shards=["http://u:p@127.0.0.1:1"])
    with pytest.raises(ConfigurationError, match=r"nope\.toml"):
        await sharded_chroma.AsyncHttpClient(topology=tmp_path / "nope.toml")


@pytest.mark.anyio
async def test_client_unset_token_env_fails_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SC_TEST_TOKEN_UNSET", raising=False)
    # Port 1 on loopback: if a request were sent, it would fail with a connection error instead.
    path = _write(
        tmp_path,
        '[defaults]\ntoken_env = "SC_TEST_TOKEN_UNSET"\n\n'
        '[[shards]]\nname = "a"\nprimary = "http://127.0.0.1:1"\n',
    )
    with pytest.raises(ConfigurationError, match="SC_TEST_TOKEN_UNSET"):
        await sharded_chroma.AsyncHttpClient(topology=path)


@pytest.mark.anyio
async def test_client_from_topology_file_against_real_servers(
    tmp_path: Path, shard_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SC_TEST_TOKEN", TOKEN)  # sent as a header; the servers ignore auth
    names = ["alpha", "beta", "gamma"]
    shards = "".join(
        f'\n[[shards]]\nname = "{name}"\nprimary = {{ url = "{url}", timeout = 20.0 }}\n'
        for name, url in zip(names, shard_urls, strict=True)
    )
    path = _write(
        tmp_path,
        "slots = 64\n\n[defaults]\n"
        'token_env = "SC_TEST_TOKEN"\n'
        f'headers = {{ "X-Api-Key" = "{SECRET}" }}\n' + shards,
    )
    client = await sharded_chroma.AsyncHttpClient(topology=path)
    try:
        assert [s.name for s in client.topology.shards] == names
        assert client.topology.slots == 64
        assert SECRET not in repr(client)
        assert TOKEN not in repr(client)
        assert await client.heartbeat() > 0
        col = await client.create_collection("topo-file", embedding_function=None)
        rng = np.random.default_rng(7)
        ids = [f"r{i}" for i in range(40)]
        emb = rng.random((40, 8), dtype=np.float32)
        await col.add(ids=ids, embeddings=emb)
        assert await col.count() == 40
        hits = await col.query(query_embeddings=emb[:1], n_results=1)
        assert hits["ids"] == [["r0"]]
        stats = client.node_stats()
        assert set(stats) == set(shard_urls)
        table = SlotTable.uniform(3, 64)
        owners = {table.shard_for_key(i) for i in ids}
        assert owners == {0, 1, 2}  # 40 ids reach all three shards
        assert all(stats[u].requests > 0 for u in shard_urls)
    finally:
        await client.aclose()
    # A Topology object works too, with overrides applied on top of it.
    topo = Topology.from_toml(path)
    client = await sharded_chroma.AsyncHttpClient(topology=topo, routing_key="tenant")
    try:
        assert client.topology.routing_key == "tenant"
        assert client.topology.shards == topo.shards
        assert await client.count_collections() == 1
    finally:
        await client.aclose()
