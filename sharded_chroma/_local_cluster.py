"""Run throwaway Chroma servers on this machine for tests, demos and benchmarks.

Every server is a ``chroma run CONFIG`` child process listening on loopback with its own data
directory. This module only ever signals processes it started itself.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from types import TracebackType

__all__ = ["LocalChromaServer", "LocalCluster", "find_free_port"]

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

# A plain urllib opener honours http_proxy/HTTP_PROXY, which would send loopback probes to a
# proxy (or out of the machine) on hosts that set one without a matching no_proxy.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Ports handed out in this process. Two servers created back to back can be given the same
# ephemeral port by the kernel because each probe socket is closed before the server binds.
_claimed_ports: set[int] = set()
_claimed_lock = threading.Lock()

# Servers are started in their own session so a terminal's Ctrl-C does not reach them before the
# owner can shut them down in order; the flip side is that nothing else stops them if the owner
# exits without calling stop(), so the owner's exit does it.
_live_processes: dict[int, subprocess.Popen[bytes]] = {}
_live_lock = threading.Lock()


def _kill_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live_processes.values())
        _live_processes.clear()
    for proc in leftovers:
        if proc.poll() is None:
            logger.warning("killing chroma server pid %d left running at exit", proc.pid)
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)


atexit.register(_kill_leftovers)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing is bound to right now.

    The port is only free at the moment of the call; another process may take it before the
    caller binds it, which is why :class:`LocalChromaServer` retries on a clash.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _claim_port(host: str) -> int:
    with _claimed_lock:
        for _ in range(100):
            port = find_free_port(host)
            if port not in _claimed_ports:
                _claimed_ports.add(port)
                return port
    raise RuntimeError(f"could not find an unclaimed free TCP port on {host}")


def _port_is_bindable(host: str, port: int) -> bool:
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR so that TIME_WAIT leftovers of a previous run on this port (which the
        # server itself tolerates) do not count as "taken"; an active listener still does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _pid_listens_on(pid: int, port: int) -> bool | None:
    """Whether ``pid`` owns a socket listening on ``port``; ``None`` when this can't be told.

    A server that lost the race for its port still starts up for a second or so before it
    panics, and meanwhile whoever owns the port may answer the heartbeat. On Linux the socket
    tables in /proc tell the two apart; elsewhere the caller falls back to "process alive".
    """
    listening: set[str] = set()
    saw_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        saw_table = True
        for row in rows:
            fields = row.split()
            # Columns: sl local_address rem_address st ... inode (10th); 0A is LISTEN.
            if len(fields) < 10 or fields[3] != "0A":
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                listening.add(fields[9])
    if not saw_table or not listening:
        # A heartbeat answered but /proc shows no listener: /proc is not telling the truth here
        # (some sandboxes), so it cannot be used to decide.
        return None
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in listening:
            return True
    return False


def _http(method: str, url: str, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with _NO_PROXY_OPENER.open(request, timeout=timeout) as response:
            status: int = response.status
            return status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _find_chroma_executable(explicit: str | None) -> str:
    if explicit is not None:
        if Path(explicit).is_file() and os.access(explicit, os.X_OK):
            return explicit
        found = shutil.which(explicit)
        if found is None:
            raise RuntimeError(f"chroma executable {explicit!r} not found or not executable")
        return found
    # The venv running this code is the one whose chromadb version the SDK was tested against;
    # a `chroma` earlier on PATH may belong to another install.
    beside = Path(sys.executable).parent / "chroma"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("chroma")
    if found is not None:
        return found
    raise RuntimeError(
        "cannot find the `chroma` server executable (looked next to "
        f"{sys.executable} and on PATH); install chromadb in this environment, "
        "e.g. `pip install chromadb`, or pass chroma_executable="
    )


class _PortInUseError(Exception):
    pass


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
        self._executable = _find_chroma_executable(chroma_executable)
        self._port_fixed = port is not None
        self._port = port if port is not None else _claim_port(host)
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
        self._port_retries_left = _MAX_PORT_RETRIES
        self._launch()
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
            status, _ = _http("GET", f"{self.url}/api/v2/heartbeat", timeout)
        except (OSError, HTTPException):
            return False
        return status == 200

    def reset(self, timeout: float = 30.0) -> None:
        """Wipe every tenant, database and collection (``POST /api/v2/reset``)."""
        if not self._allow_reset:
            raise RuntimeError(f"server {self.url} was started with allow_reset=False")
        status, body = _http("POST", f"{self.url}/api/v2/reset", timeout)
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
        self._port = _claim_port(self._host)
        with _claimed_lock:
            _claimed_ports.discard(old)
        logger.warning("port %d was taken by another process; retrying on %d", old, self._port)

    def _launch(self) -> None:
        # Checking first turns the common case of a taken port into an immediate, clear error
        # instead of a server that boots for a second and then panics.
        while not _port_is_bindable(self._host, self._port):
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
        with _live_lock:
            _live_processes[proc.pid] = proc
        logger.debug("launched chroma server pid %d on port %d", proc.pid, self._port)

    def _await_ready(self, deadline: float) -> None:
        try:
            while True:
                try:
                    self._wait_for_heartbeat(deadline)
                except _PortInUseError:
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
                    raise _PortInUseError()
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
                if _pid_listens_on(proc.pid, self._port) is not False:
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
        try:
            proc.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            logger.warning("chroma server pid %d ignored SIGTERM; sending SIGKILL", proc.pid)
            proc.kill()
            proc.wait()
        self._forget(proc)

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        with _live_lock:
            _live_processes.pop(proc.pid, None)
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


class LocalCluster:
    """``n`` local Chroma servers, each in ``base_dir/shard-<i>``, started and stopped together."""

    def __init__(self, n: int, base_dir: Path, *, host: str = "127.0.0.1") -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one server, got n={n}")
        base = Path(base_dir)
        self._servers = [LocalChromaServer(base / f"shard-{i}", host=host) for i in range(n)]

    @property
    def servers(self) -> list[LocalChromaServer]:
        return list(self._servers)

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self._servers]

    def start(self, timeout: float = 60.0) -> None:
        """Start every server that is not running; if any fails, stop them all and re-raise."""
        deadline = time.monotonic() + timeout
        try:
            pending = [server for server in self._servers if not server.running]
            for server in pending:
                server._port_retries_left = _MAX_PORT_RETRIES
                server._launch()
            for server in pending:
                server._await_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every server; SIGTERM goes to all first so their shutdowns overlap."""
        deadline = time.monotonic() + timeout
        for server in self._servers:
            server._send_term()
        for server in self._servers:
            server._finish_stop(deadline)

    def __enter__(self) -> LocalCluster:
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
        return f"LocalCluster({self.urls})"
