"""What every kind of move does between its data passes: hold the migrator lease, change the
partition map's phase by compare-and-swap, and wait for every client to serve it."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from .._errors import ControlStoreError
from ..control._store import ControlStore
from ._passes import Progress
from ._support import MigrationReport, again, same_phase

__all__ = ["Steps"]

logger = logging.getLogger("sharded_chroma.rebalance")


class Steps:
    """One migrator's lease and phase changes (a migration's or a rebuild's)."""

    def __init__(
        self, store: ControlStore, *, ack_timeout: float, lease_ttl: float, progress: Progress
    ) -> None:
        self.store = store
        self._ack_timeout = ack_timeout
        self._lease_ttl = lease_ttl
        self._progress = progress
        self._lease: int | None = None
        self._refreshed = 0.0
        self._lease_ok_until = 0.0

    # -- the lease ----------------------------------------------------------------------------

    async def acquire(self, cid: str) -> None:
        """Take the collection's migrator lease (a second migrator is refused)."""
        self._lease = await self.store.acquire_migrator(cid, self._lease_ttl)
        self._refreshed = time.monotonic()
        self._lease_ok_until = self._refreshed + self._lease_ttl * 2 / 3

    async def release(self) -> None:
        with anyio.CancelScope(shield=True):
            assert self._lease is not None
            await self.store.release_migrator(self._lease)

    def lease_left(self) -> float:
        return self._lease_ok_until - time.monotonic()

    async def fence(self) -> None:
        """Before any change (and while waiting): renew the lease when due, and stop once
        this migrator may have lost it. Renewing here rather than from a task of its own
        means a stalled migrator cannot keep a lease it no longer acts under."""
        now = time.monotonic()
        if now >= self._lease_ok_until:
            raise ControlStoreError(
                "the migrator lease expired (the control store was out of reach, or the "
                "process stalled); stopping: run the migration again to resume"
            )
        if now - self._refreshed < self._lease_ttl / 6:
            return
        assert self._lease is not None
        if not await self.store.backend.refresh(self._lease):
            self._lease_ok_until = 0.0
            raise ControlStoreError(
                "the migrator lease expired; stopping: run the migration again to resume"
            )
        self._refreshed = now
        self._lease_ok_until = now + self._lease_ttl * 2 / 3

    # -- verification -------------------------------------------------------------------------

    async def verify(
        self, one_pass: Callable[[], Awaitable[int]], max_passes: int, report: MigrationReport
    ) -> None:
        """Reconcile passes until one finds no difference (each retried on transient
        failures); refused after ``max_passes``, before anything cuts over."""
        for n in range(1, max_passes + 1):
            found = await again("verify pass", one_pass)
            report.passes += 1
            report.fixed += found
            logger.info("verify pass %d: %d difference(s)", n, found)
            if found == 0:
                report.steps.append("verify")
                return
            await anyio.sleep(min(1.0, 0.1 * n))
        raise ControlStoreError(
            f"verification kept finding differences after {max_passes} passes (writes racing "
            "the copy); nothing cut over: run it again to resume"
        )

    # -- phases -------------------------------------------------------------------------------

    async def expect_phase(self, cid: str, phases: tuple[str, ...], tag: str) -> None:
        found = await self.store.load_map(cid)
        if found is None or found[0].phase not in phases or found[0].tag != tag:
            shown = "none" if found is None else f"epoch {found[0].epoch}, {found[0].phase}"
            raise ControlStoreError(
                f"the partition map of collection {cid} ({shown}) is not in {'/'.join(phases)} "
                f"for migration {tag}; nothing was changed"
            )

    async def to_phase(self, cid: str, wanted: dict[str, Any], report: MigrationReport) -> None:
        """Make the map's phase ``wanted`` (if it is not already) and wait for every client.

        ``wanted`` names phase, policy, other and tag, and a rebuild's generations; fields
        it does not name keep their value."""
        found = await self.store.load_map(cid)
        if found is None:
            raise ControlStoreError(f"collection {cid} has no partition map")
        current, revision = found
        phase = wanted["phase"]
        if not same_phase(current, wanted):
            await self.fence()
            new = current.advanced(**wanted)
            await self.store.swap_map(cid, new, revision)
            current = new
            logger.info("collection %s: epoch %d (%s)", cid, new.epoch, phase)
        report.epoch = current.epoch
        self._progress(phase, 0)
        if phase != "stable":
            await self.store.wait_for_acks(cid, current.epoch, self._ack_timeout, tick=self.fence)
        report.steps.append(phase)
