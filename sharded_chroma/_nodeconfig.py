"""NodeConfig: where one Chroma server is, how to authenticate to it and how to verify it.

Secrets (tokens, passwords) are never part of the configuration: it names the environment
variable or the file that holds each one, and ``NodeConfig.access()`` reads them when a
transport is built, so reprs, logs and validation errors can only ever show those names.
"""

from __future__ import annotations

import base64
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ._errors import ConfigurationError
from ._frozen import FrozenDict

__all__ = ["EXCLUSIVE_OPTIONS", "NodeAccess", "NodeConfig", "redact_url"]

# Options of which a node may set one; a node that sets one drops the others from [defaults].
EXCLUSIVE_OPTIONS: tuple[frozenset[str], ...] = (
    frozenset({"token_env", "token_file"}),
    frozenset({"password_env", "password_file"}),
)


_CREDENTIAL_NAME = re.compile(r"(?i)auth|token|key|secret|password|cookie|session")


def redact_url(url: str) -> str:
    """The URL with any user:password part masked, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<unparseable url>" if "@" in url else url
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return f"{scheme}://{netloc}{slash}{tail}"


@dataclass(frozen=True)
class NodeAccess:
    """What a transport needs to reach a node, secrets included: built once per transport and
    never logged. ``secrets`` are the values an error text must never show."""

    headers: Mapping[str, str] = field(repr=False)
    ssl: ssl.SSLContext | Literal[False]
    secrets: tuple[str, ...] = field(repr=False)
    credentials: str | None
    """Where the credentials came from (``token from $NAME``), for error messages."""


class NodeConfig(BaseModel):
    """One Chroma server: where it is and how to talk to it."""

    # Validation errors must not quote the input: headers may hold credentials.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    url: str
    headers: Annotated[Mapping[str, str], AfterValidator(FrozenDict)] = Field(
        default_factory=FrozenDict, repr=False
    )
    header_env: Annotated[Mapping[str, str], AfterValidator(FrozenDict)] = Field(
        default_factory=FrozenDict
    )
    """Headers whose values come from environment variables (``{"X-Api-Key": "API_KEY"}``):
    a credential header without its value in the topology text; masked in error texts."""
    token_env: str | None = None
    """Name of an environment variable holding the auth token; the token itself is never stored
    in the configuration, so it never appears in reprs, logs or errors."""
    token_file: str | None = None
    """Or: a file holding the token (surrounding whitespace ignored), such as a mounted secret."""
    token_header: Literal["Authorization", "X-Chroma-Token"] = "Authorization"
    username: str | None = None
    """HTTP basic auth user; its password comes from ``password_env`` or ``password_file``."""
    password_env: str | None = None
    password_file: str | None = None
    verify: bool = True
    """Verify the server's TLS certificate (https URLs). Off only for a trusted test setup."""
    ca_file: str | None = None
    """PEM bundle of the CAs that may sign the server's certificate (default: the system's)."""
    cert_file: str | None = None
    """PEM client certificate (chain) for servers that require one (mutual TLS)."""
    key_file: str | None = None
    """PEM private key of ``cert_file``, when the certificate file does not hold it."""
    timeout: float = Field(default=30.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=64, ge=1)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"node url must look like http(s)://host:port, got {redact_url(url)!r}"
            )
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(
                "node url must not carry credentials, a query or a fragment "
                "(use token_env, token_file or username with password_env for auth)"
            )
        try:
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError as exc:
            raise ValueError(f"node url has an invalid port: {redact_url(url)!r}") from exc
        return url.rstrip("/")

    @model_validator(mode="after")
    def _check_auth(self) -> NodeConfig:
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("set token_env or token_file, not both")
        if self.password_env is not None and self.password_file is not None:
            raise ValueError("set password_env or password_file, not both")
        has_password = self.password_env is not None or self.password_file is not None
        if self.username is not None and not has_password:
            raise ValueError("username needs password_env or password_file")
        if has_password and self.username is None:
            raise ValueError("password_env or password_file needs a username")
        has_token = self.token_env is not None or self.token_file is not None
        if self.username is not None and has_token and self.token_header == "Authorization":
            raise ValueError(
                "basic auth and a token both use the Authorization header; "
                'set token_header = "X-Chroma-Token" to send both'
            )
        clash = {h.lower() for h in self.headers} & {h.lower() for h in self.header_env}
        if clash:
            raise ValueError(f"headers and header_env both set {sorted(clash)}")
        taken = {h.lower() for h in (*self.headers, *self.header_env)}
        if has_token and self.token_header.lower() in taken:
            raise ValueError(f"headers also set {self.token_header}, which the token fills")
        if self.username is not None and "authorization" in taken:
            raise ValueError("headers also set Authorization, which basic auth fills")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self

    def resolved_headers(self) -> dict[str, str]:
        """Headers to send, with secrets read from their variables or files now."""
        headers, _, _ = self._resolve()
        return headers

    def access(self) -> NodeAccess:
        """Headers, TLS context and the secrets to scrub from error texts; reads every secret
        and certificate now, so a missing one is a ``ConfigurationError`` before any request."""
        headers, secrets, source = self._resolve()
        return NodeAccess(
            headers=FrozenDict(headers),
            ssl=self._ssl_context(),
            secrets=secrets,
            credentials=source,
        )

    def _resolve(self) -> tuple[dict[str, str], tuple[str, ...], str | None]:
        headers = dict(self.headers)
        # Headers of the table whose name says credential are secrets too (an API key
        # header); the value after an auth scheme word as well, as it may appear alone.
        secrets = []
        for name, value in headers.items():
            if _CREDENTIAL_NAME.search(name):
                # Very short values would mask ordinary words in error texts.
                secrets += [v for v in (value, value.partition(" ")[2]) if len(v) >= 6]
        for name, env in self.header_env.items():
            from_env = self._secret(env, None, f"{name} header")
            assert from_env is not None
            headers[name] = from_env
            secrets += [from_env, from_env.partition(" ")[2]]
        sources = []
        token = self._secret(self.token_env, self.token_file, "token")
        if token is not None:
            value = f"Bearer {token}" if self.token_header == "Authorization" else token
            headers[self.token_header] = value
            secrets += [token, value]
            sources.append(f"token from {self._origin(self.token_env, self.token_file)}")
        password = self._secret(self.password_env, self.password_file, "password")
        if password is not None and self.username is not None:
            pair = base64.b64encode(f"{self.username}:{password}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {pair}"
            secrets += [password, pair]
            where = self._origin(self.password_env, self.password_file)
            sources.append(f"user {self.username!r} with the password from {where}")
        return headers, tuple(s for s in secrets if s), " and ".join(sources) or None

    @staticmethod
    def _origin(env: str | None, file: str | None) -> str:
        return f"${env}" if env is not None else f"file {file}"

    def _secret(self, env: str | None, file: str | None, what: str) -> str | None:
        if env is not None:
            value = os.environ.get(env)
            if value is None:
                raise ConfigurationError(
                    f"node {self.url}: environment variable {env!r} is not set"
                )
            if not value:
                raise ConfigurationError(f"node {self.url}: environment variable {env!r} is empty")
            return value
        if file is not None:
            try:
                value = Path(file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigurationError(
                    f"node {self.url}: cannot read the {what} file {file}: {reason}"
                ) from None
            if not value:
                raise ConfigurationError(f"node {self.url}: the {what} file {file} is empty")
            return value
        return None

    def _ssl_context(self) -> ssl.SSLContext | Literal[False]:
        if not self.url.startswith("https"):
            return False
        if not self.verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            try:
                ctx = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigurationError(
                    f"node {self.url}: cannot load the CA bundle {self.ca_file}: {exc}"
                ) from None
        if self.cert_file is not None:
            try:
                # A key protected by a passphrase would make OpenSSL prompt on the terminal;
                # the callback refuses instead.
                ctx.load_cert_chain(self.cert_file, self.key_file, password=_no_passphrase)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigurationError(
                    f"node {self.url}: cannot load the client certificate {self.cert_file}"
                    f"{'' if self.key_file is None else f' with key {self.key_file}'}: {exc}"
                ) from None
        return ctx


def _no_passphrase() -> str:
    raise ConfigurationError("encrypted client keys are not supported; store the key unencrypted")
