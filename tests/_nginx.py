"""A real nginx in front of a real Chroma server, run from the sample configuration in
docs/nginx with its placeholders filled in: free loopback port, throwaway certificates made
with trustme, auth snippets chosen per test. Started and stopped by pid."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from sharded_chroma.testing import _ports

SAMPLES = Path(__file__).resolve().parent.parent / "docs" / "nginx"


def nginx_executable() -> str:
    """nginx on PATH (or in /usr/sbin, which a non-root PATH may lack); CI installs it."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (Debian: apt-get install nginx)")
        pytest.skip("nginx is not installed (Debian: apt-get install nginx)")
    return found


@dataclass(frozen=True)
class Certs:
    """PEM files of a throwaway CA, a server certificate for 127.0.0.1 and a client one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def fill(text: str, values: Mapping[str, str]) -> str:
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    leftover = re.findall(r"@[A-Z_]+@", text)
    assert not leftover, f"unfilled placeholders: {leftover}"
    return text


class LocalNginx:
    """nginx from docs/nginx/chroma-node.conf in ``run_dir``, proxying to ``upstream``.

    ``snippets`` maps a sample snippet's file name (or a test's own file name) to its text;
    None takes the sample's text. Placeholders in every file are filled from ``values``.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        upstream: str,
        certs: Certs,
        snippets: Mapping[str, str | None],
        values: Mapping[str, str] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.port = _ports.claim_port("127.0.0.1")
        self._proc: subprocess.Popen[bytes] | None = None
        snippet_dir = run_dir / "snippets"
        snippet_dir.mkdir(parents=True, exist_ok=True)
        self.values = {
            "RUN": str(run_dir),
            "SNIPPETS": str(snippet_dir),
            "UPSTREAM": upstream,
            "LISTEN": f"127.0.0.1:{self.port}",
            "CERT": str(certs.server_cert),
            "KEY": str(certs.server_key),
            "CLIENT_CA": str(certs.ca),
            **(values or {}),
        }
        for name, text in snippets.items():
            source = (SAMPLES / name).read_text() if text is None else text
            (snippet_dir / name).write_text(fill(source, self.values))
        self.conf = run_dir / "nginx.conf"
        self.conf.write_text(fill((SAMPLES / "chroma-node.conf").read_text(), self.values))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout: float = 20.0) -> None:
        # As root, workers would run as "nobody" and could not read the test's files.
        extra = "daemon off; user root;" if os.geteuid() == 0 else "daemon off;"
        args = [
            nginx_executable(),
            "-p",
            str(self.run_dir),
            "-c",
            str(self.conf),
            "-e",
            str(self.run_dir / "error.log"),
            "-g",
            extra,
        ]
        log = (self.run_dir / "stdout.log").open("ab")
        with log:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._proc = proc
        _ports.track(proc)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                self._forget(proc)
                raise RuntimeError(f"nginx exited with {proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx not listening after {timeout}s") from None
                time.sleep(0.05)

    def log_tail(self) -> str:
        parts = []
        for name in ("stdout.log", "error.log"):
            path = self.run_dir / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # nginx's fast shutdown, master and workers
            _ports.wait_or_kill(proc, 10.0, "nginx")
        self._forget(proc)

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        _ports.untrack(proc)
        if self._proc is proc:
            self._proc = None

    def __enter__(self) -> LocalNginx:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_certs(directory: Path, *, expired: bool = False) -> Certs:
    """A fresh CA with a server certificate for 127.0.0.1 (already expired if asked) and a
    client certificate."""
    import datetime

    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    if expired:
        now = datetime.datetime.now(datetime.timezone.utc)
        server = ca.issue_cert(
            "127.0.0.1",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
    else:
        server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("sharded-chroma-test-client")
    certs = Certs(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    ca.cert_pem.write_to_path(str(certs.ca))
    server.cert_chain_pems[0].write_to_path(str(certs.server_cert))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(certs.server_cert), append=True)
    server.private_key_pem.write_to_path(str(certs.server_key))
    client.cert_chain_pems[0].write_to_path(str(certs.client_cert))
    client.private_key_pem.write_to_path(str(certs.client_key))
    return certs
