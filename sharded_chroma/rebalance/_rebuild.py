"""Rebuild: copy a collection into a fresh generation of physical collections on the same
shards (new index parameters, or a defragmented index) and swap it in while clients keep
reading and writing.

The same steps as a migration (``_engine``), through the same phases of the partition map,
with generations instead of policies (``control._maps``): ``dual`` (reads from generation
``g``, writes to ``g`` and ``g + 1``), copy and verify each shard's part into ``g + 1``,
``cutover`` (reads from ``g + 1``, writes mirrored back), ``cleanup`` (``g + 1`` alone; once
every client serves it and this host's hints for ``g`` have landed, ``g`` is dropped, or
emptied when it is the root collection), then ``stable`` at ``g + 1``, which the root's
metadata records too. Nothing is marked: the two generations never share a collection.

The same steps move a collection placed by metadata (field, composite, hash of a field) to
a goal routing by the same fields (other shards, partitions or weights): every record is
copied into the next generation at the goal's place for it, and writes are mirrored there
record by record (``ops._genmirror``). Marks could not do it: a record that changes its
routing value mid-move can need its own copy and another's incoming copy in one collection.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from .._errors import ConfigurationError, ControlStoreError
from .._policies import TimePolicy, policy_to_json
from ..catalog._generations import Generations, generation_state
from ..catalog._layouts import Target
from ..catalog._state import CollectionState
from ..control._store import ControlStore
from ..ops._genmirror import placeable
from ..ops._partio import PartIO
from ._cleanup import delete_everywhere
from ._hintbarrier import HintBarrier
from ._passes import Passes, Progress
from ._rebuildconfig import rebuilt_configuration
from ._steps import Steps
from ._support import MigrationReport, again, policy_of_record
from ._targets import TargetCollections
from ._units import generation_units

__all__ = ["Rebuilder"]

logger = logging.getLogger("sharded_chroma.rebalance")


class Rebuilder:
    """One collection's rebuild. Built by ``Rebalancing``; ``run`` and ``abort``."""

    def __init__(
        self,
        store: ControlStore,
        io: PartIO,
        generations: Generations,
        targets: TargetCollections,
        shard_names: tuple[str, ...],
        barrier: HintBarrier,
        *,
        batch: int = 500,
        rate: float | None = None,
        ack_timeout: float = 120.0,
        lease_ttl: float = 15.0,
        max_passes: int = 20,
        progress: Progress | None = None,
    ) -> None:
        self._store = store
        self._io = io
        self._generations = generations
        self._targets = targets
        self._shard_names = shard_names
        self._barrier = barrier
        self._batch = batch
        self._rate = rate
        self._max_passes = max_passes
        self._progress: Progress = progress or (lambda step, n: None)
        self._steps = Steps(
            store, ack_timeout=ack_timeout, lease_ttl=lease_ttl, progress=self._progress
        )

    async def run(
        self, state: CollectionState, changes: Mapping[str, Any] | None, goal: Any | None = None
    ) -> MigrationReport:
        """Rebuild ``state``'s collection with ``changes`` to its index parameters (``{"hnsw":
        {...}}``; ``{}``: the same ones, a fresh index), under ``goal`` if given (else its
        policy); ``changes`` None resumes the move recorded."""
        started = time.monotonic()
        await self._steps.acquire(str(state.id))
        try:
            report = await self._run(state, changes, goal)
        finally:
            await self._steps.release()
        report.seconds = time.monotonic() - started
        return report

    async def _begin(
        self, state: CollectionState, changes: Mapping[str, Any] | None, goal: Any | None
    ) -> tuple[dict[str, Any], int, bool]:
        cid = str(state.id)
        found = await self._store.load_migration(cid)
        if found is not None:
            record, revision = found
            if record.get("kind") != "rebuild":
                raise ConfigurationError(
                    f"collection {state.name!r} is being migrated to another policy; finish "
                    "or abort that migration before rebuilding it"
                )
            asked = None if goal is None else policy_to_json(goal)
            if (changes is not None and dict(changes) != record["changes"]) or (
                asked is not None and asked != record.get("to", record["policy"])
            ):
                raise ConfigurationError(
                    f"collection {state.name!r} is being moved into a new generation with "
                    f"other parameters or another goal ({record['changes']}, "
                    f"{record.get('to', record['policy'])}); resume it or abort it"
                )
            return record, revision, True
        if changes is None:
            raise ConfigurationError(f"collection {state.name!r} has no rebuild to resume")
        current, _ = await self._store.ensure_map(cid, state.policy, state.stored_generation)
        if current.migrating:
            raise ConfigurationError(
                f"collection {state.name!r} is at epoch {current.epoch} in phase "
                f"{current.phase}; finish or abort that migration first"
            )
        policy = current.policy
        if isinstance(policy, TimePolicy):
            raise ConfigurationError(
                f"collection {state.name!r} is placed in time buckets; rebuilding those is "
                "not supported yet (nothing was changed)"
            )
        goal = policy if goal is None else goal
        if why := placeable(policy, goal):
            raise ConfigurationError(f"{why} (nothing was changed)")
        if unknown := sorted(goal.shards_named() - set(self._shard_names)):
            raise ConfigurationError(f"the goal names shard(s) {unknown} this topology lacks")
        old, new = current.generation, current.generation + 1
        # Changes add to the serving generation's parameters (an earlier rebuild's).
        configuration = rebuilt_configuration(
            await self._targets.configuration(state, old), changes
        )
        # Every shard must hold the collection (one never written to may not, a new one not).
        await self._targets.ensure(state, sorted(policy.shards_named() | goal.shards_named()))
        # From now on a client without the control store is refused.
        await self._targets.store_policy(state, policy)
        record = {
            "kind": "rebuild",
            "tag": uuid.uuid4().hex[:12],
            "name": state.name,
            "policy": policy_to_json(policy),
            "to": policy_to_json(goal),
            "changes": dict(changes),
            "configuration": configuration,
            "from_generation": old,
            "to_generation": new,
            "step": "dual",
            "cursors": {},
            "copied": 0,
            "started": time.time(),
        }
        revision = await self._store.save_migration(cid, record, None)
        logger.info("rebuild %s of %s: generation %d to %d", record["tag"], state.name, old, new)
        return record, revision, False

    async def _run(
        self, state: CollectionState, changes: Mapping[str, Any] | None, goal: Any | None
    ) -> MigrationReport:
        cid = str(state.id)
        record, revision, resumed = await self._begin(state, changes, goal)
        policy = policy_of_record(record["policy"])
        goal = policy_of_record(record.get("to", record["policy"]))
        old, new = int(record["from_generation"]), int(record["to_generation"])
        tag = record["tag"]
        report = MigrationReport(state.name, tag, copied=int(record.get("copied", 0)))
        if resumed:
            report.resumed_at = record["step"]
            logger.info("rebuild %s of %s: resuming at %s", tag, state.name, record["step"])
        units = generation_units(state, policy, goal, old, new)
        sources, targets = list(units.sources), list(units.targets)
        passes = Passes(
            self._io,
            generation_state(state, new),
            units.homes,
            tag,
            batch=self._batch,
            rate=self._rate,
            progress=self._progress,
            fence=self._steps.fence,
            lease_left=self._steps.lease_left,
            marks=False,
        )

        def wanted(phase: str) -> dict[str, Any]:
            after = phase not in ("dual", "aborting")
            moving = phase != "stable"
            return {
                "phase": phase,
                "policy": goal if after else policy,
                "other": (policy if after else goal) if moving else None,
                "tag": tag if moving else None,
                "generation": new if after else old,
                "other_generation": (old if after else new) if moving else None,
            }

        async def advance(step: str) -> None:
            nonlocal revision
            await self._steps.fence()
            record["step"] = step
            revision = await self._store.save_migration(cid, record, revision)

        step = record["step"]
        if step == "aborting":
            raise ConfigurationError(
                f"an abort of the rebuild of {state.name!r} is under way; run abort again to "
                "finish it"
            )
        if step in ("copy", "verify"):
            await self._steps.expect_phase(cid, ("dual",), tag)
        if step == "dual":
            # Made once the record exists, so an abort finds and drops them.
            made = sorted(goal.shards_named())
            await self._generations.ensure(state, new, made, record["configuration"])
            await self._steps.to_phase(cid, wanted("dual"), report)
            await advance("copy")
            step = "copy"
        if step == "copy":
            for source in sources:
                if record["cursors"].get(source.key) == "done":
                    continue

                async def save(seq: int, key: str = source.key) -> None:
                    nonlocal revision
                    await self._steps.fence()
                    record["cursors"][key] = seq
                    record["copied"] = report.copied
                    revision = await self._store.save_migration(cid, record, revision)

                def copy_rest(part: Target = source) -> Any:
                    return passes.copy(part, record["cursors"].get(part.key), save)

                report.copied += await again(f"copy of {source.key}", copy_rest)
                record["cursors"][source.key] = "done"
                record["copied"] = report.copied
                revision = await self._store.save_migration(cid, record, revision)
            await advance("verify")
            step = "verify"
        if step == "verify":
            await self._steps.verify(
                lambda: passes.reconcile(sources, targets), self._max_passes, report
            )
            await advance("cutover")
            step = "cutover"
        if step == "cutover":
            await self._steps.expect_phase(cid, ("dual", "cutover"), tag)
            await self._steps.to_phase(cid, wanted("cutover"), report)
            await advance("cleanup")
            step = "cleanup"
        if step == "cleanup":
            found = await self._store.load_map(cid)
            done = found is not None and not found[0].migrating and found[0].generation == new
            if not done:
                await self._steps.to_phase(cid, wanted("cleanup"), report)
                shards = [p.shard for p in sources]
                await self._barrier.settle(f"cleanup of {state.name!r}", shards, self._steps.fence)
                await self._leave(state, old, sources)
                await self._steps.to_phase(cid, wanted("stable"), report)
            # The root's metadata follows, so a collection whose map is lost still opens at
            # the generation holding its records, under the policy they are placed by.
            await self._targets.store_policy(state, goal, new)
            await self._store.drop_migration(cid, revision)
            report.steps.append("done")
            logger.info("rebuild %s of %s: done at generation %d", tag, state.name, new)
        return report

    async def _leave(self, state: CollectionState, generation: int, parts: list[Target]) -> None:
        """Give up a generation: a later one is dropped; the root collection (generation 0)
        holds the collection's name and metadata, so its records are deleted instead, by id,
        on every copy."""
        shards = [p.shard for p in parts]
        if generation:
            await self._steps.fence()
            drop = functools.partial(self._generations.drop, state, generation, shards)
            await again(f"dropping generation {generation}", drop)
            return
        for part in parts:
            listing = functools.partial(
                self._io.read, part, "/get", {"limit": self._batch, "include": []}, raw=True
            )
            while True:
                await self._steps.fence()
                page = await again(f"listing {part.key}", listing)
                if not page["ids"]:
                    break
                body = {"ids": list(page["ids"])}
                await again(f"emptying {part.key}", delete_everywhere(self._io, part, body))

    # -- abort ----------------------------------------------------------------------------

    async def abort(self, state: CollectionState) -> MigrationReport:
        """Roll back a rebuild that has not cut over: the map stays at (or returns to) the
        old generation, and the new one is dropped. Resumable like the rebuild itself."""
        cid = str(state.id)
        await self._steps.acquire(cid)
        try:
            found = await self._store.load_migration(cid)
            if found is None or found[0].get("kind") != "rebuild":
                raise ConfigurationError(f"collection {state.name!r} has no rebuild to abort")
            record, revision = found
            policy = policy_of_record(record["policy"])
            goal = policy_of_record(record.get("to", record["policy"]))
            old, new = int(record["from_generation"]), int(record["to_generation"])
            tag = record["tag"]
            report = MigrationReport(state.name, tag)
            current = await self._store.load_map(cid)
            if current is None:
                raise ControlStoreError(f"collection {state.name!r} has no partition map")
            now = current[0]
            before_cutover = now.phase in ("dual", "aborting") and now.tag == tag
            untouched = not now.migrating and now.generation == old
            if record["step"] != "aborting" and not (before_cutover or untouched):
                raise ConfigurationError(
                    f"the rebuild of {state.name!r} has cut over (epoch {now.epoch}, phase "
                    f"{now.phase}); it can only be resumed to its end"
                )
            record["step"] = "aborting"
            revision = await self._store.save_migration(cid, record, revision)
            shards = sorted(goal.shards_named())
            if not untouched:
                aborting = {
                    "phase": "aborting",
                    "policy": policy,
                    "other": goal,
                    "tag": tag,
                    "generation": old,
                    "other_generation": new,
                }
                await self._steps.to_phase(cid, aborting, report)
                await self._barrier.settle(f"abort of {state.name!r}", shards, self._steps.fence)
            drop = functools.partial(self._generations.drop, state, new, shards)
            await again(f"dropping generation {new}", drop)
            if not untouched:
                stable = {
                    "phase": "stable",
                    "policy": policy,
                    "other": None,
                    "tag": None,
                    "generation": old,
                    "other_generation": None,
                }
                await self._steps.to_phase(cid, stable, report)
            await self._store.drop_migration(cid, revision)
            report.steps.append("aborted")
            return report
        finally:
            await self._steps.release()
