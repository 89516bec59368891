"""Ports, processes and plain HTTP for local Chroma servers: free loopback ports handed out
once per process, the servers this process started (stopped at exit), and a proxy-free probe."""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

__all__ = [
    "PortInUseError",
    "claim_port",
    "find_chroma_executable",
    "find_free_port",
    "http_request",
    "live_processes",
    "pid_listens_on",
    "port_is_bindable",
    "track",
    "untrack",
    "wait_or_kill",
]

logger = logging.getLogger("sharded_chroma.local_cluster")


# A plain urllib opener honours http_proxy/HTTP_PROXY, which would send loopback probes to a
# proxy (or out of the machine) on hosts that set one without a matching no_proxy.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Ports handed out in this process. Two servers created back to back can be given the same
# ephemeral port by the kernel because each probe socket is closed before the server binds.
claimed_ports: set[int] = set()
claimed_lock = threading.Lock()

# Servers are started in their own session so a terminal's Ctrl-C does not reach them before the
# owner can shut them down in order; the flip side is that nothing else stops them if the owner
# exits without calling stop(), so the owner's exit does it.
live_processes: dict[int, subprocess.Popen[bytes]] = {}
live_lock = threading.Lock()


def kill_leftovers() -> None:
    with live_lock:
        leftovers = list(live_processes.values())
        live_processes.clear()
    for proc in leftovers:
        if proc.poll() is None:
            logger.warning("killing chroma server pid %d left running at exit", proc.pid)
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)


atexit.register(kill_leftovers)


def track(proc: subprocess.Popen[bytes]) -> None:
    """A child this process started: killed at exit if its owner never stopped it."""
    with live_lock:
        live_processes[proc.pid] = proc


def untrack(proc: subprocess.Popen[bytes]) -> None:
    with live_lock:
        live_processes.pop(proc.pid, None)


def wait_or_kill(proc: subprocess.Popen[bytes], seconds: float, what: str) -> None:
    """Wait for a child sent SIGTERM; SIGKILL it if it has not exited within ``seconds``."""
    try:
        proc.wait(max(seconds, 0.0))
    except subprocess.TimeoutExpired:
        logger.warning("%s pid %d ignored SIGTERM; sending SIGKILL", what, proc.pid)
        proc.kill()
        proc.wait()


def address_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing is bound to right now.

    The port is only free at the moment of the call; another process may take it before the
    caller binds it, which is why :class:`LocalChromaServer` retries on a clash.
    """
    with socket.socket(address_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def claim_port(host: str) -> int:
    with claimed_lock:
        for _ in range(100):
            port = find_free_port(host)
            if port not in claimed_ports:
                claimed_ports.add(port)
                return port
    raise RuntimeError(f"could not find an unclaimed free TCP port on {host}")


def port_is_bindable(host: str, port: int) -> bool:
    with socket.socket(address_family(host), socket.SOCK_STREAM) as sock:
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


def pid_listens_on(pid: int, port: int) -> bool | None:
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


def http_request(method: str, url: str, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with _NO_PROXY_OPENER.open(request, timeout=timeout) as response:
            status: int = response.status
            return status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def find_chroma_executable(explicit: str | None) -> str:
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


class PortInUseError(Exception):
    """The server could not bind its port (another process took it first)."""
