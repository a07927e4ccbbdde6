"""The batch window: how long a node's next pass waits for steps about to arrive.

Steps that come in a convoy (common/wire/convoy.py) wait, up to CONVOY_WAIT, for the rest of
their convoy only. Steps that come in none (a session's first step, client-driven steps) wait up
to `batch_wait` seconds while fewer steps are queued than sessions stepped here within the last
RECENT seconds. One session alone never waits; `batch_wait` 0 turns both off."""

from __future__ import annotations

from collections.abc import Sequence

from common.wire.convoy import CONVOY_WAIT, incomplete

BATCH_WAIT = 0.005  # seconds a pass may wait for the steps of other recently active sessions (--batch-wait-ms)
RECENT = 1.0        # a session that sent a step within this many seconds is expected to send another


class BatchWindow:
    """Per executor, used under its lock: `stepped` when a step is queued, `left` before a pass."""

    def __init__(self, batch_wait: float = BATCH_WAIT):
        self.batch_wait = batch_wait
        self._stepped: dict[str, float] = {}  # session id -> when it last queued a step (monotonic)

    def stepped(self, session_id: str, now: float) -> None:
        self._stepped[session_id] = now

    def forget(self, session_id: str) -> None:
        """A closed session: no pass waits for it any more."""
        self._stepped.pop(session_id, None)

    def _expected(self, now: float) -> int:
        """Sessions that queued a step within RECENT seconds (forgetting older ones)."""
        for session_id, when in list(self._stepped.items()):
            if now - when > RECENT:
                del self._stepped[session_id]
        return len(self._stepped)

    def left(self, pending: Sequence, now: float, started: float) -> float:
        """Seconds the pass over `pending` (queued work: .session, .convoy) should still wait; 0: run now.
        `started`: when the pass began waiting."""
        if not self.batch_wait:
            return 0.0
        left = 0.0
        if incomplete(work.convoy for work in pending):
            left = started + CONVOY_WAIT - now
        if any(work.convoy is None or work.convoy.arrived is None for work in pending):
            if len({work.session.session_id for work in pending}) < self._expected(now):
                left = max(left, started + self.batch_wait - now)
        return max(left, 0.0)
