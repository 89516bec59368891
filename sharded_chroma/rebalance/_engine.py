"""The migration engine: moves a collection from its current policy to a goal while clients
keep reading and writing, resumable at every step, one migrator at a time.

Steps, each recorded in the control store before the next begins (see ``control._maps``):

1. ``dual``: the next epoch mirrors writes to the goal's places; wait until every client
   acknowledged it (so no write can still skip the goal's place).
2. ``copy``: every source part's moved records are copied (cursor saved per page); then
   ``verify``: reconcile passes until one finds the copies equal to their sources.
3. ``cutover``: the goal serves reads (writes mirrored back); wait for acknowledgements.
4. ``cleanup``: writes stop being mirrored; once acknowledged and the old copies' hints are
   replayed (``_hintbarrier``), they go; then stable.

A killed migrator is resumed by running it again (the record names the step and cursors);
``abort`` rolls back a migration that has not cut over.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import anyio

from .._errors import ConfigurationError, ControlStoreError
from .._policies import policy_to_json
from ..catalog._generations import generation_state
from ..catalog._layouts import PartLayouts, Target
from ..catalog._state import CollectionState
from ..control._store import ControlStore
from ..ops._partio import PartIO
from ._cleanup import delete_moved
from ._hintbarrier import HintBarrier
from ._passes import Passes, Progress
from ._steps import Steps
from ._support import (
    MigrationReport,
    again,
    check_goal,
    policy_of_record,
    same_phase,
    single_error,
    stable,
)
from ._targets import TargetCollections
from ._units import Units, moving_units

__all__ = ["MigrationReport", "Migrator"]

logger = logging.getLogger("sharded_chroma.rebalance")


class Migrator:
    """One collection's migration. Built by ``Runtime.migrator``; ``run`` and ``abort``."""

    def __init__(
        self,
        store: ControlStore,
        io: PartIO,
        layouts: PartLayouts,
        targets: TargetCollections,
        shard_names: tuple[str, ...],
        barrier: HintBarrier,
        *,
        batch: int = 500,
        rate: float | None = None,
        ack_timeout: float = 120.0,
        lease_ttl: float = 15.0,
        max_passes: int = 20,
        concurrency: int = 1,
        progress: Progress | None = None,
    ) -> None:
        self._store = store
        self._io = io
        self._layouts = layouts
        self._targets = targets
        self._shard_names = shard_names
        self._barrier = barrier
        self._batch = batch
        self._rate = rate
        self._max_passes = max_passes
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
        self._concurrency = concurrency
        self._progress: Progress = progress or (lambda step, n: None)
        self._steps = Steps(
            store, ack_timeout=ack_timeout, lease_ttl=lease_ttl, progress=self._progress
        )
        self._fence = self._steps.fence

    # -- running --------------------------------------------------------------------------

    async def run(self, state: CollectionState, goal: Any | None) -> MigrationReport:
        """Move ``state``'s collection to ``goal`` (None: resume the migration recorded)."""
        started = time.monotonic()
        await self._steps.acquire(str(state.id))
        try:
            report = await self._run(state, goal)
        finally:
            await self._steps.release()
        report.seconds = time.monotonic() - started
        return report

    async def _begin(
        self, state: CollectionState, goal: Any | None
    ) -> tuple[dict[str, Any], int, bool]:
        cid = str(state.id)
        found = await self._store.load_migration(cid)
        if found is not None:
            record, revision = found
            if record.get("kind") == "rebuild":
                raise ConfigurationError(
                    f"collection {state.name!r} is being rebuilt; finish it (resume the "
                    "rebuild, or run rebalance without a goal) or abort it first"
                )
            if goal is not None and policy_to_json(goal) != record["to"]:
                raise ConfigurationError(
                    f"collection {state.name!r} is being migrated to another policy already "
                    f"({record['to']}); finish it (rebalance without a goal) or abort it"
                )
            return record, revision, True
        if goal is None:
            raise ConfigurationError(f"collection {state.name!r} has no migration to resume")
        current, _ = await self._store.ensure_map(cid, state.policy, state.stored_generation)
        if current.migrating:
            raise ControlStoreError(
                f"collection {state.name!r} is at epoch {current.epoch} in phase "
                f"{current.phase} without a migration record; the control store is damaged"
            )
        check_goal(current.policy, goal)
        if policy_to_json(current.policy) == policy_to_json(goal):
            raise ConfigurationError(f"collection {state.name!r} already has that policy")
        if unknown := sorted(goal.shards_named() - set(self._shard_names)):
            raise ConfigurationError(f"the goal names shard(s) {unknown} this topology lacks")
        await self._targets.ensure(state, sorted(goal.shards_named()), current.generation)
        # From now on a client without the control store is refused: it would route by the
        # stored policy and write past the mirroring.
        await self._targets.store_policy(state, current.policy)
        record = {
            "tag": uuid.uuid4().hex[:12],
            "name": state.name,
            "from": policy_to_json(current.policy),
            "to": policy_to_json(goal),
            "step": "dual",
            # The records are in this generation's collections (after a rebuild, not the
            # roots'), and stay there: a migration keeps the map's generation.
            "generation": current.generation,
            "cursors": {},
            "copied": 0,
            "started": time.time(),
        }
        revision = await self._store.save_migration(cid, record, None)
        logger.info("migration %s of %s: started", record["tag"], state.name)
        return record, revision, False

    async def _run(self, state: CollectionState, goal: Any | None) -> MigrationReport:
        cid = str(state.id)
        record, revision, resumed = await self._begin(state, goal)
        # The physical collections the moves read and write (the roots, or a rebuild's).
        parts = generation_state(state, int(record.get("generation", 0)))
        source = policy_of_record(record["from"])
        target = policy_of_record(record["to"])
        tag = record["tag"]
        report = MigrationReport(state.name, tag, copied=int(record.get("copied", 0)))
        if resumed:
            report.resumed_at = record["step"]
            logger.info("migration %s of %s: resuming at %s", tag, state.name, record["step"])

        async def advance(step: str) -> None:
            nonlocal revision
            await self._fence()
            record["step"] = step
            revision = await self._store.save_migration(cid, record, revision)

        def passes_for(units: Units) -> Passes:
            return Passes(
                self._io,
                parts,
                units.homes,
                tag,
                batch=self._batch,
                rate=self._rate,
                progress=self._progress,
                fence=self._fence,
                lease_left=self._steps.lease_left,
            )

        step = record["step"]
        if step == "aborting":
            raise ConfigurationError(
                f"an abort of the migration of {state.name!r} is under way; run abort again "
                "to finish it"
            )
        if step in ("copy", "verify"):
            # Copies are only worth anything while clients mirror: the map must be in dual
            # for this migration (an abort or a damaged store would leave it elsewhere).
            await self._steps.expect_phase(cid, ("dual",), tag)
        if step == "dual":
            await self._phase(cid, "dual", source, target, tag, report)
            await advance("copy")
            step = "copy"
        if step == "copy":
            # Source shards are copied ``concurrency`` at a time; the record (one key, written
            # by compare-and-swap) takes their cursors one save at a time.
            saving = anyio.Lock()
            limit = anyio.CapacityLimiter(self._concurrency)

            async def save_record() -> None:
                nonlocal revision
                async with saving:
                    await self._fence()
                    record["copied"] = report.copied
                    revision = await self._store.save_migration(cid, record, revision)

            units = await moving_units(self._layouts, parts, source, target)
            passes = passes_for(units)

            async def copy_part(part: Target) -> None:
                async def save(seq: int) -> None:
                    record["cursors"][part.key] = seq
                    await save_record()

                def copy_rest() -> Awaitable[int]:
                    return passes.copy(part, record["cursors"].get(part.key), save)

                async with limit:  # not ``+= await``: it reads the count before the await
                    copied = await again(f"copy of {part.key}", copy_rest)
                report.copied += copied
                record["cursors"][part.key] = "done"
                await save_record()

            try:
                async with anyio.create_task_group() as tg:
                    for part in units.sources:
                        if record["cursors"].get(part.key) != "done":
                            tg.start_soon(copy_part, part)
            except Exception as exc:
                inner = single_error(exc)
                if inner is exc:
                    raise
                raise inner from inner.__cause__
            await advance("verify")
            step = "verify"
        if step == "verify":

            async def one_pass() -> int:
                # Listed again each pass: a time bucket made during the move moves too.
                units = await moving_units(self._layouts, parts, source, target)
                return await passes_for(units).reconcile(units.sources, units.targets)

            await self._steps.verify(one_pass, self._max_passes, report)
            await advance("cutover")
            step = "cutover"
        if step == "cutover":
            await self._steps.expect_phase(cid, ("dual", "cutover"), tag)
            await self._phase(cid, "cutover", target, source, tag, report)
            await advance("cleanup")
            step = "cleanup"
        if step == "cleanup":
            found = await self._store.load_map(cid)
            if found is None or not same_phase(found[0], stable(target)):
                # (A run killed after the map became stable has nothing left but the record.)
                await self._phase(cid, "cleanup", target, source, tag, report)
                await delete_moved(
                    self._io, self._layouts, parts, source, target, tag, self._fence, self._barrier
                )
                await self._phase(cid, "stable", target, None, None, report)
            # The stored policy follows, so a client that opens the collection without the
            # map (or after losing the control store) still finds every record.
            await self._targets.store_policy(state, target)
            await self._store.drop_migration(cid, revision)
            report.steps.append("done")
            logger.info("migration %s of %s: done at epoch %d", tag, state.name, report.epoch)
        return report

    async def _phase(
        self,
        cid: str,
        phase: str,
        policy: Any,
        other: Any | None,
        tag: str | None,
        report: MigrationReport,
    ) -> None:
        wanted = {"phase": phase, "policy": policy, "other": other, "tag": tag}
        await self._steps.to_phase(cid, wanted, report)

    # -- abort ----------------------------------------------------------------------------

    async def abort(self, state: CollectionState) -> MigrationReport:
        """Roll back a migration that has not cut over: the map returns to the source policy
        and the copies made so far are deleted. Resumable like the migration itself."""
        cid = str(state.id)
        await self._steps.acquire(cid)
        try:
            found = await self._store.load_migration(cid)
            if found is None:
                raise ConfigurationError(f"collection {state.name!r} has no migration to abort")
            record, revision = found
            source, target = policy_of_record(record["from"]), policy_of_record(record["to"])
            tag = record["tag"]
            report = MigrationReport(state.name, tag)
            current = await self._store.load_map(cid)
            if current is None:
                raise ControlStoreError(f"collection {state.name!r} has no partition map")
            now = current[0]
            before_cutover = now.phase in ("dual", "aborting") and now.tag == tag
            untouched = same_phase(now, stable(source))
            if record["step"] != "aborting" and not (before_cutover or untouched):
                raise ConfigurationError(
                    f"the migration of {state.name!r} has cut over (epoch {now.epoch}, phase "
                    f"{now.phase}); it can only be finished (rebalance without a goal), then "
                    "planned back"
                )
            # Recorded first: a killed abort is resumed as an abort, never as the migration.
            record["step"] = "aborting"
            revision = await self._store.save_migration(cid, record, revision)
            if not untouched:
                # Writes stop being mirrored while the copies stay hidden; then they go.
                await self._phase(cid, "aborting", source, target, tag, report)
                parts = generation_state(state, int(record.get("generation", 0)))
                made = (self._io, self._layouts, parts, source, target, tag)
                await delete_moved(*made, self._fence, self._barrier, abort=True)
                await self._phase(cid, "stable", source, None, None, report)
            await self._store.drop_migration(cid, revision)
            report.steps.append("aborted")
            return report
        finally:
            await self._steps.release()
