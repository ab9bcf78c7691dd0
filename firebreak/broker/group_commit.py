"""Group commit: many requests' changes reach the disk in one write, none is answered before its own has.

A request changes the broker's state in memory under the broker's lock, then, with the lock released,
waits for a flush that began after its change. One waiting thread (the leader) flushes everything
changed so far; the others wait for it, and a change made while a flush runs goes with the next one.
Under load a flush carries many requests, and the lock is never held while a file is written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class GroupCommit:
    """``flush()`` writes everything changed so far and returns the highest ticket it covered."""

    def __init__(self, flush: Callable[[], int]) -> None:
        self._flush = flush
        self._cond = threading.Condition()
        self._durable = 0
        self._flushing = False

    @property
    def durable(self) -> int:
        return self._durable

    def wait(self, ticket: int) -> None:
        """Return once every change up to ``ticket`` is on disk; raise what a flush this thread led raised.

        Never call it holding a lock that ``flush`` takes."""
        with self._cond:
            while self._durable < ticket:
                if self._flushing:
                    self._cond.wait()
                    continue
                self._flushing = True
                try:
                    self._cond.release()
                    try:
                        covered = self._flush()
                    finally:
                        self._cond.acquire()
                    self._durable = max(self._durable, covered)
                finally:
                    # On failure too: a waiter takes the lead and tries again (and reports its own failure).
                    self._flushing = False
                    self._cond.notify_all()
