"""`sharded-chroma dev`: a local cluster that keeps running until Ctrl-C, plus its topology."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from ..testing import LocalCluster

__all__ = ["run_dev", "topology_toml"]


def topology_toml(urls: list[str]) -> str:
    out = ["# written by `sharded-chroma dev`", ""]
    for i, url in enumerate(urls):
        out += ["[[shards]]", f'name = "s{i}"', f'primary = "{url}"', ""]
    return "\n".join(out)


def run_dev(*, shards: int, data_dir: Path, topology_path: Path, out: Any) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    # SIGTERM as well as Ctrl-C, so a supervisor can stop the cluster cleanly too.
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with LocalCluster(shards, data_dir) as cluster:
            topology_path.write_text(topology_toml(cluster.urls), encoding="utf-8")
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
