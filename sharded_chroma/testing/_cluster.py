"""Several local Chroma servers started and stopped together."""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType

from ._server import LocalChromaServer

__all__ = ["LocalCluster"]


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
                server.launch()
            for server in pending:
                server.wait_ready(deadline)
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
