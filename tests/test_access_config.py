"""Credentials and TLS settings of a node: validated before anything is sent, read from their
variables and files when a transport is built, and kept out of every text."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import aiohttp
import pytest

from sharded_chroma import ConfigurationError, NodeConfig, TLSError, Topology
from sharded_chroma._refusals import BODY_LIMIT, Scrubber, refusal_of_answer, refusal_of_failure
from sharded_chroma._transport import NodeTransport

SECRET = "s3cr3t-value-8c1f"


def node(**options: object) -> NodeConfig:
    return NodeConfig.model_validate({"url": "https://127.0.0.1:9443", **options})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"token_env": "A", "token_file": "f"}, "token_env or token_file, not both"),
        ({"username": "u"}, "username needs password_env"),
        ({"password_env": "P"}, "needs a username"),
        ({"username": "u", "password_env": "P", "password_file": "f"}, "not both"),
        ({"username": "u", "password_env": "P", "token_env": "T"}, "both use the Authorization"),
        ({"token_env": "T", "headers": {"authorization": "x"}}, "headers also set"),
        ({"key_file": "k.pem"}, "key_file needs cert_file"),
    ],
)
def test_conflicting_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Topology.build({"shards": [{"name": "s0", "primary": {"url": "http://h:1", **options}}]})


def test_basic_auth_beside_a_chroma_token_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW", SECRET)
    monkeypatch.setenv("TOK", "tok-1234")
    cfg = node(username="u", password_env="PW", token_env="TOK", token_header="X-Chroma-Token")
    headers = cfg.resolved_headers()
    assert headers["X-Chroma-Token"] == "tok-1234"
    assert base64.b64decode(headers["Authorization"].removeprefix("Basic ")) == (
        f"u:{SECRET}".encode()
    )
    assert SECRET not in repr(cfg) and "tok-1234" not in repr(cfg)


def test_a_node_choice_overrides_the_defaults_choice(tmp_path: Path) -> None:
    """[defaults] token_env and a node's token_file are one choice, not a conflict."""
    topo = Topology.build(
        {
            "defaults": {"token_env": "TOK"},
            "shards": [
                {"name": "s0", "primary": "http://h:1"},
                {"name": "s1", "primary": {"url": "http://h:2", "token_file": "t"}},
            ],
        }
    )
    assert topo.shards[0].primary.token_env == "TOK"
    assert (topo.shards[1].primary.token_env, topo.shards[1].primary.token_file) == (None, "t")


def test_secret_files(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(f"  {SECRET}\n")
    assert node(token_file=str(token)).resolved_headers()["Authorization"] == f"Bearer {SECRET}"
    missing = tmp_path / "absent"
    with pytest.raises(ConfigurationError, match=r"cannot read the token file .*absent"):
        NodeTransport(node(token_file=str(missing)), "s0")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigurationError, match="is empty"):
        node(token_file=str(empty)).access()


def test_unset_and_empty_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SC_ABSENT", raising=False)
    with pytest.raises(ConfigurationError, match="'SC_ABSENT' is not set"):
        node(token_env="SC_ABSENT").access()
    monkeypatch.setenv("SC_EMPTY", "")
    with pytest.raises(ConfigurationError, match="'SC_EMPTY' is empty"):
        node(token_env="SC_EMPTY").access()


def test_certificate_files_are_loaded_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot load the CA bundle"):
        NodeTransport(node(ca_file=str(tmp_path / "no-ca.pem")), "s0")
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match="cannot load the client certificate"):
        NodeTransport(node(cert_file=str(bogus)), "s0")
    # Plain HTTP has no TLS context at all.
    assert NodeConfig(url="http://127.0.0.1:1").access().ssl is False


def test_scrubber_masks_secrets_and_credential_shapes() -> None:
    scrub = Scrubber([SECRET, f"Bearer {SECRET}"])
    page = (
        f"<html><body><h1>401 Authorization Required</h1>Authorization: Bearer {SECRET}"
        " X-Chroma-Token: other-token-abc Cookie=session9 raw Basic dXNlcjpwYXNz"
        f" again {SECRET}</body></html>"
    ).encode()
    text = scrub.body(page)
    assert SECRET not in text
    for leaked in ("other-token-abc", "session9", "dXNlcjpwYXNz"):
        assert leaked not in text
    assert "401 Authorization Required" in text  # a page's own words stay readable
    assert "<" not in text
    # Scrubbed before it is cut: a secret straddling the limit is not half-shown.
    long = ("x" * (BODY_LIMIT - 5) + SECRET).encode()
    cut = scrub.body(long)
    assert SECRET[:5] not in cut and len(cut) <= BODY_LIMIT + 3


def test_chroma_messages_lose_only_the_secrets() -> None:
    scrub = Scrubber([SECRET])
    message = f"Expected where to be a dict, got authorization: {SECRET}"
    assert scrub.secrets(message) == "Expected where to be a dict, got authorization: ***"


def test_which_answers_are_refusals() -> None:
    def of(status: int, body: str = "", credentials: str | None = "token from $T") -> object:
        return refusal_of_answer(status, body, shard="s0", node="n", credentials=credentials)

    assert type(of(401)).__name__ == "AuthenticationError"
    assert "not allowed" in str(of(403))
    assert "no credentials are configured" in str(of(401, credentials=None))
    assert type(of(400, "The plain HTTP request was sent to HTTPS port")).__name__ == "TLSError"
    # Anything else is the node's failure, for the retry policy.
    assert of(400, "Bad Request") is None
    assert of(404) is None
    assert of(502) is None


def test_a_huge_or_hostile_body_is_read_only_in_part() -> None:
    """Only the start of an answer is read: a megabyte of unclosed tags (quadratic for a
    naive tag pattern) is cut at once, and a secret the cut falls inside is not half shown."""
    scrub = Scrubber([SECRET])
    assert len(scrub.body(b"<" * 1_000_000)) <= BODY_LIMIT + 3
    text = scrub.body(b"x" * (16 * BODY_LIMIT - 3) + SECRET.encode() + b"y" * 100)
    assert SECRET[:3] not in text.replace("x", "")


def _ssl_failure(reason: str) -> BaseException:
    inner = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    inner.reason = reason  # type: ignore[misc]
    outer = aiohttp.ClientOSError(1, "TLS failure")
    outer.__cause__ = inner
    return outer


def test_only_setup_mismatches_are_tls_refusals() -> None:
    def of(reason: str) -> object:
        return refusal_of_failure(_ssl_failure(reason), shard="s0", node="n")

    assert isinstance(of("SSLV3_ALERT_HANDSHAKE_FAILURE"), TLSError)
    assert isinstance(of("TLSV13_ALERT_CERTIFICATE_REQUIRED"), TLSError)
    assert "does not speak TLS" in str(of("WRONG_VERSION_NUMBER"))
    # A node in trouble mid-handshake is an outage, for the retry policy.
    assert of("TLSV1_ALERT_INTERNAL_ERROR") is None
    assert of("UNEXPECTED_EOF_WHILE_READING") is None
    assert refusal_of_failure(ConnectionResetError(), shard="s0", node="n") is None


def test_header_secrets_are_credential_headers_only() -> None:
    cfg = node(headers={"X-Team": "search-docs", "X-Api-Key": "k-123456789", "X-Short": "abc"})
    scrub = Scrubber(cfg.access().secrets)
    assert scrub.secrets("collection search-docs, key k-123456789") == (
        "collection search-docs, key ***"
    )
    bearer = node(headers={"Authorization": "Bearer raw-token-42"})
    assert "raw-token-42" in bearer.access().secrets


def test_validation_errors_do_not_quote_headers() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as raised:
        NodeConfig(url="http://h:1", headers={"X-Api-Key": "k3y-secret-99"}, username="u")
    assert "k3y-secret-99" not in str(raised.value)
    assert "k3y-secret-99" not in repr(node(headers={"X-Api-Key": "k3y-secret-99"}).access())


def test_header_values_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SC_API_KEY", "api-key-from-env-77")
    cfg = node(header_env={"X-Api-Key": "SC_API_KEY"})
    assert cfg.resolved_headers() == {"X-Api-Key": "api-key-from-env-77"}
    assert "api-key-from-env-77" in cfg.access().secrets
    assert "api-key-from-env-77" not in repr(cfg)
    monkeypatch.delenv("SC_API_KEY")
    with pytest.raises(ConfigurationError, match="'SC_API_KEY' is not set"):
        cfg.access()
    with pytest.raises(ConfigurationError, match="both set"):
        Topology.build(
            {
                "shards": [
                    {
                        "name": "s0",
                        "primary": {
                            "url": "http://h:1",
                            "headers": {"x-api-key": "literal"},
                            "header_env": {"X-Api-Key": "SC_API_KEY"},
                        },
                    }
                ]
            }
        )
