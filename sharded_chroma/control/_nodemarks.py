"""The needs-repair marks one process published for its host's hint log (see ``_nodes``):
which local mark (by generation) each shared key stands for, so a repair anywhere that
deleted the key clears the local mark it saw begin, and nothing newer."""

from __future__ import annotations

import json
import logging

from .._nodeconfig import redact_url
from .._nodestate import NodeState, SqliteNodeStore
from ._backend import ANY, ControlBackend
from ._nodekeys import PREFIX, Snapshot

__all__ = ["PublishedMarks"]

logger = logging.getLogger("sharded_chroma.replicas")


class PublishedMarks:
    """Node url -> (local mark generation, shared key revision, newest quarantined id).
    Used on the publishing loop only (callers serialize)."""

    def __init__(self, local: SqliteNodeStore, log_id: str) -> None:
        self._local = local
        self._log_id = log_id
        self._marks: dict[str, tuple[int, int, int]] = {}

    def revisions(self, url: str, seen: NodeState) -> set[int]:
        """The shared key revisions a repair that began at ``seen`` may delete."""
        out = {seen.shared_mark} - {0}
        published = self._marks.get(url)
        if published is not None and published[0] == seen.mark_gen:
            out.add(published[1])
        return out

    async def reconcile(
        self, backend: ControlBackend, nk: str, url: str, state: NodeState, snap: Snapshot
    ) -> None:
        """Put this host's mark up, or clear it here once a repair took the key down."""
        if not state.needs_repair:
            self._marks.pop(url, None)
            return
        published = self._marks.get(url)
        if published is None or published[0] != state.mark_gen:
            value = json.dumps({"reason": state.reason or "needs repair", "by": self._log_id})
            revision = await backend.put(f"{PREFIX}node/{nk}/repair", value.encode(), expect=ANY)
            assert revision is not None
            self._marks[url] = (state.mark_gen, revision, state.last_quarantined)
            return
        gen, revision, quarantined = published
        mark = snap.repair.get(nk)
        if mark is None and snap.revision >= revision:
            # A repair (any host's) saw this mark begin and cleared it: clear it here too.
            self._local.clear_repair(
                url, NodeState(needs_repair=True, mark_gen=gen, last_quarantined=quarantined)
            )
            self._marks.pop(url, None)
            logger.info("node %s repaired on another host: mark cleared", redact_url(url))
        elif mark is not None and mark[1] > revision:
            # Marked again elsewhere: the repair that clears that one covers this one too.
            self._marks[url] = (gen, mark[1], quarantined)
