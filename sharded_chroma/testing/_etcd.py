"""One throwaway single-member ``etcd`` child process on loopback, for tests and ``dev``.

Its client and peer ports are free loopback ports, its data lives in its own folder (kept
across ``restart()``, so a stopped member comes back with its keys), and it is stopped by the
pid this module started. The ``etcd`` executable comes from the system (Debian's
``etcd-server`` package).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from . import _ports

__all__ = ["LocalEtcd", "find_etcd_executable"]

logger = logging.getLogger("sharded_chroma.local_cluster")
_LOG_NAME = "etcd.log"
_LOG_TAIL_LINES = 30


def find_etcd_executable(explicit: str | None = None) -> str:
    """The etcd server executable: ``explicit`` if given, else ``etcd`` on PATH."""
    found = shutil.which(explicit or "etcd")
    if found is None:
        raise RuntimeError(
            f"cannot find the etcd server executable {explicit or 'etcd'!r} on PATH; install "
            "it (Debian: apt-get install etcd-server)"
        )
    return found


class LocalEtcd:
    """A single-member etcd cluster under ``data_dir``; ``start()`` returns once it is healthy."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        executable: str | None = None,
        ports: tuple[int, int] | None = None,
    ) -> None:
        self._dir = Path(data_dir)
        self._host = host
        self._executable = find_etcd_executable(executable)
        # A member keeps its peer address in its data: one started again on the same folder
        # (``dev`` run twice) must get the same ports.
        self.client_port, self.peer_port = ports or (
            _ports.claim_port(host),
            _ports.claim_port(host),
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client API."""
        return f"{self._host}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self._dir / _LOG_NAME

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        client = f"http://{self._host}:{self.client_port}"
        peer = f"http://{self._host}:{self.peer_port}"
        args = [
            self._executable,
            "--name=member",
            f"--data-dir={self._dir / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=member={peer}",
            "--initial-cluster-state=new",
            "--log-level=warn",
        ]
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
            )
        self._proc = proc
        _ports.track(proc)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"etcd exited with code {proc.returncode} during startup; last lines "
                        f"of {self.log_path}:\n{self._tail()}"
                    )
                if self._healthy():
                    logger.info("etcd pid %d ready at %s", proc.pid, self.endpoint)
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"etcd pid {proc.pid} not healthy after {timeout}s; last lines of "
                        f"{self.log_path}:\n{self._tail()}"
                    )
                time.sleep(0.1)
        except BaseException:
            self.kill()
            raise

    def _healthy(self) -> bool:
        try:
            status, body = _ports.http_request(
                "GET", f"http://{self._host}:{self.client_port}/health", timeout=1.0
            )
        except OSError:
            return False
        return status == 200 and b'"true"' in body

    def stop(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            _ports.wait_or_kill(proc, timeout, "etcd")
        self._forget(proc)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10.0)
        self._forget(proc)

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        # The member's data folder already holds the cluster: start as an existing member.
        self.start(timeout)

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        _ports.untrack(proc)
        if self._proc is proc:
            self._proc = None

    def _tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"<log unreadable: {exc}>"
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def __enter__(self) -> LocalEtcd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
