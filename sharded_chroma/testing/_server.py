"""One throwaway ``chroma run`` child process on this machine, for tests, demos and benchmarks.
This module only ever signals processes it started itself."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from http.client import HTTPException
from pathlib import Path
from types import TracebackType

from . import _ports
from ._ports import PortInUseError

__all__ = ["LocalChromaServer"]

logger = logging.getLogger("sharded_chroma.local_cluster")
_CONFIG_NAME = "chroma.yaml"
_LOG_NAME = "chroma.log"
_PERSIST_NAME = "data"
_MAX_PORT_RETRIES = 3
_POLL_INTERVAL = 0.1
_LOG_TAIL_LINES = 40
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PORT_IN_USE_MARKERS = ("AddrInUse", "Address already in use")
_WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


class LocalChromaServer:
    """One ``chroma run`` child process with its own config, log and data under ``data_dir``.

    ``start()`` returns once the server answers its heartbeat. When no port is given, a free one
    is picked and, if another process grabs it first, up to three fresh ports are tried; once
    the server has been up, its port never changes (``restart()`` reuses it).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        allow_reset: bool = True,
        chroma_executable: str | None = None,
    ) -> None:
        self._data_dir = Path(data_dir)
        self._host = host
        self._allow_reset = allow_reset
        self._executable = _ports.find_chroma_executable(chroma_executable)
        self._port_fixed = port is not None
        self._port = port if port is not None else _ports.claim_port(host)
        self._port_retries_left = _MAX_PORT_RETRIES
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._launched_at = 0.0

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = self._host
        if host in _WILDCARD_HOSTS:
            host = "::1" if host == "::" else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port}"

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def config_path(self) -> Path:
        return self._data_dir / _CONFIG_NAME

    @property
    def log_path(self) -> Path:
        return self._data_dir / _LOG_NAME

    @property
    def pid(self) -> int | None:
        """The pid of the running server process, or ``None`` when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it answers ``GET /api/v2/heartbeat`` with 200.

        A no-op when it is already running. Raises ``RuntimeError`` (with the tail of the
        server log) if the process exits or ``timeout`` seconds pass first.
        """
        if self.running:
            return
        deadline = time.monotonic() + timeout
        self.launch()
        self.wait_ready(deadline)

    def launch(self) -> None:
        """Start the process without waiting for it (``wait_ready`` waits), so several
        servers boot at once."""
        self._port_retries_left = _MAX_PORT_RETRIES
        self._launch()

    def wait_ready(self, deadline: float) -> None:
        """Wait until a launched server answers its heartbeat (``time.monotonic`` deadline)."""
        self._await_ready(deadline)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server, SIGKILL it after ``timeout`` seconds; safe to call repeatedly."""
        self._send_term()
        self._finish_stop(time.monotonic() + timeout)

    def kill(self) -> None:
        """SIGKILL the server without letting it shut down, as a crash would."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            logger.info("SIGKILL chroma server pid %d (port %d)", proc.pid, self._port)
            proc.kill()
        proc.wait()
        self._forget(proc)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop the server if it runs, then start it again on the same port and data dir."""
        self.stop()
        self._port_fixed = True
        self.start(timeout)

    def heartbeat(self, timeout: float = 2.0) -> bool:
        """Whether something answers ``GET /api/v2/heartbeat`` on this server's port with 200."""
        try:
            status, _ = _ports.http_request("GET", f"{self.url}/api/v2/heartbeat", timeout)
        except (OSError, HTTPException):
            return False
        return status == 200

    def reset(self, timeout: float = 30.0) -> None:
        """Wipe every tenant, database and collection (``POST /api/v2/reset``)."""
        if not self._allow_reset:
            raise RuntimeError(f"server {self.url} was started with allow_reset=False")
        status, body = _ports.http_request("POST", f"{self.url}/api/v2/reset", timeout)
        if status != 200:
            raise RuntimeError(
                f"reset of {self.url} failed: HTTP {status}: {body[:500].decode(errors='replace')}"
            )

    def __enter__(self) -> LocalChromaServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"LocalChromaServer({self.url}, {state}, data_dir={str(self._data_dir)!r})"

    # The pieces below are separate so LocalCluster can launch every process before waiting on
    # any of them: startup is dominated by per-process init, so waiting in series would add up.

    def _write_config(self) -> None:
        persist = self._data_dir / _PERSIST_NAME
        persist.mkdir(parents=True, exist_ok=True)
        # JSON string literals are valid YAML double-quoted scalars, which keeps odd characters
        # in paths from breaking the file.
        lines = [
            f"port: {self._port}",
            f"listen_address: {json.dumps(self._host)}",
            f"persist_path: {json.dumps(str(persist.resolve()))}",
            f"allow_reset: {'true' if self._allow_reset else 'false'}",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _replace_port_or_raise(self) -> None:
        if self._port_fixed:
            raise RuntimeError(
                f"cannot start chroma server: port {self._port} on {self._host} is already in use"
            )
        if self._port_retries_left <= 0:
            raise RuntimeError(
                f"cannot start chroma server: {_MAX_PORT_RETRIES} free ports in a row were taken "
                "by other processes before the server could bind them"
            )
        self._port_retries_left -= 1
        old = self._port
        self._port = _ports.claim_port(self._host)
        with _ports.claimed_lock:
            _ports.claimed_ports.discard(old)
        logger.warning("port %d was taken by another process; retrying on %d", old, self._port)

    def _launch(self) -> None:
        # Checking first turns the common case of a taken port into an immediate, clear error
        # instead of a server that boots for a second and then panics.
        while not _ports.port_is_bindable(self._host, self._port):
            self._replace_port_or_raise()
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        with self.log_path.open("ab") as log_file:
            # Appending keeps the log of earlier runs (a crash before a restart, say); the offset
            # lets error messages show only this run's output.
            self._log_offset = log_file.tell()
            self._launched_at = time.monotonic()
            proc = subprocess.Popen(
                [self._executable, "run", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self._data_dir,
                start_new_session=True,
            )
        self._proc = proc
        _ports.track(proc)
        logger.debug("launched chroma server pid %d on port %d", proc.pid, self._port)

    def _await_ready(self, deadline: float) -> None:
        try:
            while True:
                try:
                    self._wait_for_heartbeat(deadline)
                except PortInUseError:
                    self._replace_port_or_raise()
                    self._launch()
                else:
                    return
        except BaseException:
            # Never leave a half-started server behind, whatever interrupted the wait.
            self.kill()
            raise

    def _wait_for_heartbeat(self, deadline: float) -> None:
        proc = self._proc
        assert proc is not None
        foreign_answer = False
        while True:
            code = proc.poll()
            if code is not None:
                self._forget(proc)
                tail = self._log_tail()
                if any(marker in tail for marker in _PORT_IN_USE_MARKERS):
                    raise PortInUseError()
                raise RuntimeError(
                    f"chroma server on port {self._port} exited with code {code} during "
                    f"startup; last lines of {self.log_path}:\n{tail}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                hint = " (another process was answering on that port)" if foreign_answer else ""
                tail = self._log_tail()
                raise RuntimeError(
                    f"chroma server pid {proc.pid} on port {self._port} did not answer its "
                    f"heartbeat in time{hint}; last lines of {self.log_path}:\n{tail}"
                )
            if self.heartbeat(timeout=min(1.0, max(remaining, 0.05))):
                if _ports.pid_listens_on(proc.pid, self._port) is not False:
                    logger.info(
                        "chroma server pid %d ready at %s after %.1fs",
                        proc.pid,
                        self.url,
                        time.monotonic() - self._launched_at,
                    )
                    self._port_fixed = True
                    return
                foreign_answer = True
            time.sleep(_POLL_INTERVAL)

    def _send_term(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            logger.info("SIGTERM chroma server pid %d (port %d)", proc.pid, self._port)
            proc.terminate()

    def _finish_stop(self, deadline: float) -> None:
        proc = self._proc
        if proc is None:
            return
        _ports.wait_or_kill(proc, deadline - time.monotonic(), "chroma server")
        self._forget(proc)

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        _ports.untrack(proc)
        if self._proc is proc:
            self._proc = None

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log_file:
                log_file.seek(self._log_offset)
                text = log_file.read().decode(errors="replace")
        except OSError as exc:
            return f"<log unreadable: {exc}>"
        lines = [_ANSI_ESCAPE.sub("", line).rstrip() for line in text.splitlines()]
        return "\n".join([line for line in lines if line][-_LOG_TAIL_LINES:])
