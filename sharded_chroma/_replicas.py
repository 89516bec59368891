"""ReplicaSet: the copies of one shard. Reads pick a healthy, caught-up copy (with failover and
optional hedging); writes go to every copy and are acknowledged by the write concern; a copy that
misses a write gets it in the durable hint log and serves no reads until it has replayed it.

This is the one layer that retries: it knows which other copies could answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from chromadb.errors import ChromaError

from ._errors import (
    ControlUnavailableError,
    NodeAccessError,
    NodeUnavailableError,
    WriteConcernError,
)
from ._hedging import Hedger, timed
from ._hints import HintLog
from ._node import HintTarget, Node, node_fault, required_copies
from ._nodestate import NodeState, NodeStates
from ._owed import keep_for
from ._replay import HintReplayer, ReplayTarget
from ._selection import Selector, make_selector
from ._topology import ReplicationConfig, ShardConfig
from ._transport import NodeTransport
from .observe import current_call, noting

__all__ = ["ReplicaSet"]

logger = logging.getLogger("sharded_chroma.replicas")

T = TypeVar("T")


class ReplicaSet:
    """The nodes of one shard, primary first."""

    def __init__(
        self,
        shard: ShardConfig,
        config: ReplicationConfig,
        hints: HintLog | None,
        states: NodeStates,
        *,
        replay_target: ReplayTarget | None = None,
        selector: Selector | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = shard.name
        self.config = config
        self._states = states
        self.writes_in_flight = 0
        self._count_lock = threading.Lock()
        """Writes not finished (their hints not yet kept): closing waits for them."""
        self.nodes = [
            Node(
                NodeTransport(n, shard.name, primary=i == 0),
                primary=(i == 0),
                config=config,
                states=states,
            )
            for i, n in enumerate(shard.nodes)
        ]
        self.selector = selector or make_selector(config.read_selection)
        self._hints = hints
        self._clock = clock
        self._hedger = Hedger(config, self._clock)
        self._replayer = (
            None
            if hints is None or replay_target is None
            else HintReplayer(
                shard.name,
                hints,
                replay_target,
                clock,
                states.replay_bound if states.shared else None,
            )
        )

    @property
    def primary(self) -> Node:
        return self.nodes[0]

    def node(self, url: str) -> Node:
        return next(n for n in self.nodes if n.url == url)

    # -- reads ------------------------------------------------------------------------------

    def _candidates(self, current: bool = True) -> list[Node]:
        now = self._clock()
        fresh = [n for n in self.nodes if not (current and self._states.behind(n.url))]
        healthy = [n for n in fresh if n.healthy(now)]
        ordered: list[Any] = self.selector.order(healthy)
        # Seed nodes are never forgotten: when every fresh copy is in backoff, try them anyway
        # rather than failing without asking.
        if not ordered:
            ordered = self.selector.order(fresh) or fresh
        return list(ordered)

    async def read(
        self,
        op: Callable[[Node], Awaitable[T]],
        *,
        prefer: Node | None = None,
        current: bool = True,
    ) -> T:
        """Run ``op`` on one caught-up copy, failing over to the next on node failures.

        Chroma client errors (a bad filter, a missing collection) are answers: raised at once,
        as is a ``NodeAccessError`` (failing over would hide a misconfiguration).
        A server error (see ``node_fault``) is tried on the other copies and raised only when
        none answers otherwise. Copies behind (missed writes) are never read for records
        (``current``); when every copy is behind (each missed writes the other has), the read
        waits up to ``replay_inline_deadline`` for one to catch up. Facts every copy shares
        (heartbeat, version, limits) pass ``current=False`` and may come from any copy.
        """
        if current:
            # Another host may have made a copy behind just before a write we must see.
            await self._states.fence()
        else:
            self._states.refresh()
        candidates = self._candidates(current)
        if not candidates and current:
            candidates = await self._wait_for_one()
        if prefer is not None and prefer in candidates:
            candidates = [prefer, *(n for n in candidates if n is not prefer)]
        if not candidates:
            raise NodeUnavailableError(
                shard=self.name,
                node=self.primary.url,
                attempts=[
                    "every copy is behind (missed writes wait in the hint log, or need a repair)"
                ],
            )
        attempts: list[str] = []
        last: NodeUnavailableError | None = None
        refused: dict[Node, ChromaError] = {}
        self._hedger.count_read()
        tries = 0
        while tries < 1 + self.config.retries:
            pool = [n for n in candidates if n not in refused]
            if not pool:
                break
            node = pool[tries % len(pool)]
            if tries >= len(pool):
                self.primary.stats.retries += 1
                await anyio.sleep(self.config.backoff * 2 ** (tries - len(pool)))
            others = [n for n in pool if n is not node]
            try:
                with noting(tries + 1):
                    return await self._hedger.run(op, node, others)
            except NodeUnavailableError as exc:
                node.failed(self._clock())
                attempts.extend(exc.attempts)
                last = exc
                tries += 1
            except ChromaError as exc:
                if not node_fault(exc):
                    raise
                refused[node] = exc
                attempts.append(f"{node.url}: {type(exc).__name__}: {exc}")
                logger.warning(
                    "shard %s node %s answered %s; trying another copy",
                    self.name,
                    node.url,
                    type(exc).__name__,
                )
        if refused:
            # What a server answered is what a single server would have raised.
            raise next(iter(refused.values()))
        assert last is not None
        raise NodeUnavailableError(
            shard=self.name, node=last.node, attempts=attempts
        ) from last.__cause__

    async def _wait_for_one(self) -> list[Node]:
        """Replay to the copy with the fewest missed writes until one is caught up, within
        the inline deadline; the copies that may then be read."""
        now = self._clock()
        with anyio.move_on_after(self.config.replay_inline_deadline):
            # Copies that answer first, then the fewest missed writes.
            order = sorted(
                self.nodes, key=lambda n: (not n.healthy(now), self._states.get(n.url).pending)
            )
            for node in order:
                if self._states.get(node.url).needs_repair:
                    continue
                await self.replay(node, wait=True)
                self._states.refresh()
                if not self._states.behind(node.url):
                    break
        return self._candidates()

    # -- writes -----------------------------------------------------------------------------

    async def write(
        self,
        path_for: Callable[[Node], Awaitable[str]],
        content: bytes,
        target: HintTarget,
        concern: str,
        *,
        known_path: Callable[[Node], str | None] | None = None,
    ) -> Any:
        """Send one write to every copy; return the primary's answer (or the first copy's).

        A copy that is behind or fails gets the write in the hint log instead: unreachable,
        timed out, cut off after the concern was met, or refusing with a Chroma error while
        another copy stored the write. Raises ``WriteConcernError`` when fewer copies stored it
        than ``concern`` requires (the misses are hinted all the same), or the Chroma error the
        copies answered with when none stored it (the request's fault, as chromadb raises it).
        A copy that refused this client's credentials or TLS setup is hinted like an unreachable
        one when another copy stored the write (its refusal is in ``WriteConcernError`` when
        the concern is not met); when none stored it, its ``NodeAccessError`` is raised.
        """
        # A copy another host made behind before a write that finished before this one began
        # must get this one after that host's hints: it is hinted here too (see ``one``).
        await self._states.fence()
        with self._count_lock:  # writers may run on several threads' loops
            self.writes_in_flight += 1
        try:
            return await self._write(path_for, content, target, concern, known_path)
        finally:
            with self._count_lock:
                self.writes_in_flight -= 1

    async def _write(
        self,
        path_for: Callable[[Node], Awaitable[str]],
        content: bytes,
        target: HintTarget,
        concern: str,
        known_path: Callable[[Node], str | None] | None,
    ) -> Any:
        answers: dict[str, Any] = {}
        misses: dict[str, BaseException] = {}
        refusals: dict[str, ChromaError] = {}
        denied: list[NodeAccessError] = []
        # Copies that did not store the write, with why and the path it was meant for: hinted
        # once the outcome is known (see _owe).
        owed: dict[str, tuple[str, str | None, BaseException | None]] = {}

        needed = required_copies(concern, len(self.nodes))
        settled = anyio.Event()
        finished = anyio.Event()

        def check() -> None:
            done = len(answers) + len(owed) == len(self.nodes)
            if done:
                finished.set()
            if done or len(answers) >= needed:
                settled.set()

        async def one(node: Node) -> None:
            path = None if known_path is None else known_path(node)
            if self._states.behind(node.url):
                owed[node.url] = ("behind", path, None)
                check()
                return
            try:
                path = await path_for(node)
                answers[node.url] = await timed(
                    lambda n: n.transport.request("POST", path, content=content), node
                )
            except NodeUnavailableError as exc:
                node.failed(self._clock())
                owed[node.url] = ("unreachable", path, exc)
            except NodeAccessError as exc:  # owed like an unreachable copy (see _owe)
                denied.append(exc)
                owed[node.url] = (f"refused access ({type(exc).__name__})", path, exc)
            except ChromaError as exc:
                refusals[node.url] = exc
                owed[node.url] = (f"refused ({type(exc).__name__})", path, exc)
            except anyio.get_cancelled_exc_class():
                # Cut off after the concern was met: the copy may or may not have stored it;
                # replaying a write is idempotent and version-checked.
                owed[node.url] = ("slow", path, None)
                raise
            check()

        try:
            if len(self.nodes) == 1:
                await one(self.primary)
            else:
                async with anyio.create_task_group() as tg:
                    for node in self.nodes:
                        tg.start_soon(one, node)
                    await settled.wait()
                    # The concern is met (or nothing is left to wait for): copies still
                    # writing get a grace period, then are left to the hint log, so a hung
                    # copy does not hold up a write acknowledged by others.
                    with anyio.move_on_after(self.config.write_grace):
                        await finished.wait()
                    tg.cancel_scope.cancel()
        finally:
            # Shielded, and also when the caller is cancelled: a copy that missed a write
            # another copy stored must get it, or it would serve reads without it.
            with anyio.CancelScope(shield=True):
                misses.update(await self._owe(owed, answers, refusals, target, content))
        unshared = [e for e in misses.values() if isinstance(e, ControlUnavailableError)]
        if unshared and answers:
            raise unshared[0]
        if refusals and not answers:
            raise next(iter(refusals.values()))
        if denied and not answers:
            raise denied[0]
        if len(answers) < needed:
            if len(self.nodes) == 1:
                raise next(iter(misses.values()))
            raise WriteConcernError(
                target.op,
                misses,
                shard=self.name,
                concern=concern,
                acknowledged=sorted(answers),
            )
        if self.primary.url in answers:
            return answers[self.primary.url]
        return next(iter(answers.values()))

    async def _owe(
        self,
        owed: dict[str, tuple[str, str | None, BaseException | None]],
        answers: dict[str, Any],
        refusals: dict[str, ChromaError],
        target: HintTarget,
        content: bytes,
    ) -> dict[str, BaseException]:
        """Hint the copies that did not store a write, by who is at fault: when some copy
        stored it, every other copy is owed it; when copies only refused it with client errors
        (4xx), the write itself is wrong and nobody is owed it; otherwise (server errors, no
        answer) the outcome is unknown and the copies that did not refuse it as a client error
        get it. Returns each missing copy's failure, for the caller's error."""
        if not answers and refusals and not any(node_fault(e) for e in refusals.values()):
            return {}
        out: dict[str, BaseException] = {}
        hinted = 0
        for url, (reason, path, cause) in owed.items():
            refusal = refusals.get(url)
            if not answers and refusal is not None and not node_fault(refusal):
                continue
            log = self._hints
            # Refused access with no copy holding the write: surely not applied anywhere.
            unowed = not answers and isinstance(cause, NodeAccessError)
            if log is None or len(self.nodes) == 1 or unowed:
                # A lone node has no other copy to catch up from; the caller sees the failure.
                attempts = [reason]
                out[url] = cause or NodeUnavailableError(
                    shard=self.name, node=url, attempts=attempts
                )
                continue
            kept = await keep_for(
                log, self._states, self.name, url, target, content, reason=reason, path=path
            )
            if isinstance(kept, NodeUnavailableError):
                hinted += 1
                # Kept; a refusal is still what the caller must hear about that copy.
                kept = cause if isinstance(cause, NodeAccessError) else kept
            out[url] = kept
        trace = current_call()
        if hinted and trace is not None:
            trace.hinted(hinted)
        return out

    # -- catch-up ---------------------------------------------------------------------------

    def mark_repaired(self, node: Node, seen: NodeState) -> None:
        """A repair that began when the node's state was ``seen`` made it equal to the other
        copies: clear that mark and those quarantined hints for every process (a newer mark
        stays); it serves reads once no hint is pending."""
        self._states.clear_repair(node.url, seen)

    async def replay(self, node: Node, *, rate: float | None = None, wait: bool = False) -> int:
        """Apply a node's hints in order (see ``HintReplayer.replay``)."""
        if self._replayer is None:
            return 0
        return await self._replayer.replay(node, rate=rate, wait=wait)

    async def catch_up(self) -> int:
        """Replay hints to every copy that has some (whatever process wrote them), after any
        replay of this process already under way."""
        self._states.refresh()
        total = 0
        for node in self.nodes:
            if self._states.get(node.url).pending:
                total += await self.replay(node, wait=True)
        return total

    async def aclose(self) -> None:
        for node in self.nodes:
            await node.transport.aclose()
