"""`sharded-chroma dev`: a local cluster that keeps running until Ctrl-C, plus its topology."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..testing import LocalCluster
from ..testing._etcd import LocalEtcd

__all__ = ["run_dev", "topology_toml"]


def topology_toml(urls: list[str], control: dict[str, Any] | None = None) -> str:
    out = ["# written by `sharded-chroma dev`", ""]
    if control:
        out.append("[control]")
        # JSON strings and lists of strings are valid TOML values.
        out += [f"{key} = {json.dumps(value)}" for key, value in control.items()]
        out.append("")
    for i, url in enumerate(urls):
        out += ["[[shards]]", f'name = "s{i}"', f'primary = "{url}"', ""]
    return "\n".join(out)


@contextlib.contextmanager
def _control(kind: str, data_dir: Path, out: Any) -> Iterator[dict[str, Any] | None]:
    """The control table of the dev topology; for etcd, a local member for the duration."""
    if kind == "none":
        yield None
    elif kind == "sqlite":
        yield {"backend": "sqlite", "path": str((data_dir / "control.sqlite3").resolve())}
    else:
        saved = data_dir / "etcd-ports.json"
        ports = tuple(json.loads(saved.read_text())) if saved.exists() else None
        with LocalEtcd(data_dir / "etcd", ports=ports) as etcd:
            saved.write_text(json.dumps([etcd.client_port, etcd.peer_port]))
            out(f"  etcd: {etcd.endpoint} (pid {etcd.pid})")
            yield {"backend": "etcd", "endpoints": [etcd.endpoint]}


def run_dev(
    *, shards: int, data_dir: Path, topology_path: Path, out: Any, control: str = "sqlite"
) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    # SIGTERM as well as Ctrl-C, so a supervisor can stop the cluster cleanly too.
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with LocalCluster(shards, data_dir) as cluster, _control(control, data_dir, out) as table:
            topology_path.write_text(topology_toml(cluster.urls, table), encoding="utf-8")
            out(f"{shards} Chroma servers up; data in {data_dir}")
            for i, url in enumerate(cluster.urls):
                out(f"  s{i}: {url}")
            out(f"topology written to {topology_path}")
            out(f"connect: await sharded_chroma.AsyncHttpClient(topology={str(topology_path)!r})")
            out("Ctrl-C stops the cluster (data is kept for the next `dev`).")
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
            out("\nstopping ...")
    finally:
        signal.signal(signal.SIGTERM, previous)
    out("stopped.")
