"""Telling a refusal (wrong credentials, TLS set up wrong) from a node that is down, and
keeping secrets out of what any error says.

Pure functions: the transport calls them with what it got and raises what they return.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence

import aiohttp

from ._errors import AuthenticationError, NodeAccessError, TLSError

__all__ = ["Scrubber", "refusal_of_answer", "refusal_of_failure"]

# How much of an answer body an error text keeps: enough to recognise a proxy's page.
BODY_LIMIT = 200
_MASK = "***"
# Credentials as they appear in echoed request headers (``Name: value``), whatever the value.
_CREDENTIAL = re.compile(
    r"(?i)\b(authorization|proxy-authorization|x-chroma-token|cookie|x-api-key)"
    r"(\s*[:=]\s*)"
    r"(\"[^\"]*\"|'[^']*'|(?:bearer|basic|digest)\s+\S+|\S+)"
)
_SCHEME_VALUE = re.compile(r"(?i)\b(bearer|basic|digest)\s+[A-Za-z0-9._~+/=-]{6,}")
# No "<" inside a tag: an unclosed "<" cannot make the match rescan the rest of the text.
_TAGS = re.compile(r"<[^<>]*>")
# Of a long answer only its start is read: an error shows BODY_LIMIT characters at most, and a
# 50 MB error page must not cost the event loop more than this.
_READ_LIMIT = 16 * BODY_LIMIT
_SPACE = re.compile(r"\s+")

# Pages nginx writes for TLS problems (its ngx_http_special_response texts).
_NGINX_TLS_PAGES = (
    (
        "plain HTTP request was sent to HTTPS port",
        "plain HTTP was sent to a TLS port: use an https:// URL for this node",
    ),
    (
        "No required SSL certificate was sent",
        "the server requires a client certificate: set cert_file (and key_file)",
    ),
    (
        "SSL certificate error",
        "the server refused the client certificate (not signed by a CA it trusts, or expired)",
    ),
)


class Scrubber:
    """Removes a node's secrets, and anything shaped like a credential, from a text."""

    def __init__(self, secrets: Sequence[str]) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def secrets(self, text: str) -> str:
        """The text with this node's secret values masked, and nothing else changed (for a
        Chroma error's message, which must read as the server wrote it)."""
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return text

    def __call__(self, text: str) -> str:
        text = self.secrets(text)
        text = _CREDENTIAL.sub(lambda m: f"{m.group(1)}{m.group(2)}{_MASK}", text)
        return _SCHEME_VALUE.sub(lambda m: f"{m.group(1)} {_MASK}", text)

    def body(self, payload: bytes) -> str:
        """An answer body as an error may show it: tags and runs of space dropped, scrubbed
        before it is cut (a secret cut in half would no longer match), then cut."""
        longest = len(self._secrets[0]) if self._secrets else 0
        cut = len(payload) > _READ_LIMIT + longest
        text = payload[: _READ_LIMIT + longest].decode("utf-8", "replace")
        if cut:
            # The slice may end inside a secret; what could be its start is dropped.
            text = text[: len(text) - longest] if longest else text
        text = _SPACE.sub(" ", _TAGS.sub(" ", text)).strip()
        text = self(text)
        return text if len(text) <= BODY_LIMIT and not cut else text[:BODY_LIMIT] + "..."


def refusal_of_answer(
    status: int,
    body: str,
    *,
    shard: str,
    node: str,
    credentials: str | None,
) -> NodeAccessError | None:
    """The error for a non-Chroma answer that refuses this client's configuration, or None
    (the answer is a failure of the node, left to the retry policy). ``body`` is scrubbed."""
    shown = f" ({body})" if body else ""
    if status in (401, 403, 407):
        if credentials is None:
            cause = "no credentials are configured for this node (token_env or token_file, or "
            cause += "username with password_env or password_file)"
        elif status == 403:
            cause = f"the {credentials} was accepted but is not allowed this request"
        else:
            cause = f"the {credentials} was refused"
        return AuthenticationError(
            f"HTTP {status}: {cause}{shown}", shard=shard, node=node, status=status
        )
    if status == 400:
        for marker, cause in _NGINX_TLS_PAGES:
            if marker.lower() in body.lower():
                return TLSError(f"HTTP 400: {cause}{shown}", shard=shard, node=node, status=status)
    return None


def refusal_of_failure(exc: BaseException, *, shard: str, node: str) -> NodeAccessError | None:
    """The error for a connection failure that is a TLS setup problem, or None."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert = exc.certificate_error
        reason = getattr(cert, "verify_message", None) or getattr(cert, "reason", None) or cert
        hint = ""
        if "issuer" in str(reason) or "self-signed" in str(reason) or "self signed" in str(reason):
            hint = "; set ca_file to the bundle of the CA that signed it"
        elif "expired" in str(reason):
            hint = "; the server's certificate must be renewed"
        elif "hostname" in str(reason) or "IP address mismatch" in str(reason):
            hint = "; the certificate was issued for another host name"
        cause = f"the server's certificate did not verify: {reason}{hint}"
        return TLSError(cause, shard=shard, node=node)
    inner = _ssl_error(exc)
    if inner is None:
        return None
    reason = str(inner.reason or inner).upper()
    if "WRONG_VERSION_NUMBER" in reason:
        cause = "the server does not speak TLS on this port (an https:// URL for a plain "
        cause += "HTTP port?)"
        return TLSError(cause, shard=shard, node=node)
    if any(marker in reason for marker in _CONFIG_ALERTS):
        return TLSError(f"the TLS handshake was refused: {inner.reason}", shard=shard, node=node)
    # Anything else (an internal alert, an EOF mid-handshake) may be the node's trouble.
    return None


# OpenSSL reasons that say the two sides' TLS setups do not fit, not that the node is unwell.
_CONFIG_ALERTS = (
    "HANDSHAKE_FAILURE",
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_REQUIRED",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
    "PROTOCOL_VERSION",
    "UNSUPPORTED_PROTOCOL",
    "NO_PROTOCOLS_AVAILABLE",
    "NO_SHARED_CIPHER",
    "INAPPROPRIATE_FALLBACK",
)


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The OpenSSL error behind an aiohttp failure, if any (during or after the handshake)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError) and not isinstance(
            current, ssl.SSLCertVerificationError
        ):
            return current
        os_error = getattr(current, "os_error", None)
        if isinstance(os_error, ssl.SSLError):
            return os_error
        current = current.__cause__ or current.__context__
    return None
