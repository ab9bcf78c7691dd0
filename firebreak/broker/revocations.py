"""Revocations that could not be delivered when an activity ended, retried until they land.

An activity revokes its credential on the way out. If the broker is down at that moment, the
token would otherwise stay valid until it expires (up to the activity's timeout, at most 15
minutes): long enough for a leaked token to be used. So a failed revocation goes into this
queue, one per worker process, and is retried in the background with capped backoff until the
broker takes it, says it no longer knows the grant, or the token has expired anyway (past that
point no target accepts it, so there is nothing left to revoke).

Bounded: at most ``capacity`` grants wait; when full, the one closest to expiring on its own
makes room. Kept in memory: a worker that dies with revocations pending leaves those tokens to
their expiry, which the broker's audit log shows as grants never revoked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# A target accepts a token for its leeway past ``exp`` (at most 30 s, see TargetVerifier): keep trying that long.
EXPIRY_MARGIN_S = 30.0


@dataclass
class _Pending:
    grant_id: str
    expires_at: float  # seconds since the epoch
    attempts: int = 0
    due: float = 0.0  # monotonic


class RevocationRetries:
    """Retries ``revoke(grant_id)`` in the background; ``revoke`` returns True (revoked) or False
    (unknown to the broker: expired or never minted) and raises when the broker could not be asked."""

    def __init__(
        self,
        revoke: Callable[[str], Awaitable[bool]],
        *,
        capacity: int = 1000,
        initial_delay_s: float = 0.5,
        max_delay_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._revoke = revoke
        self._capacity = capacity
        self._initial = initial_delay_s
        self._max = max_delay_s
        self._clock = clock
        self._pending: dict[str, _Pending] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.landed: list[str] = []  # grant ids revoked by a retry, oldest first (bounded like the queue)

    @property
    def pending(self) -> list[str]:
        return list(self._pending)

    def submit(self, grant_id: str, expires_at: float) -> None:
        """Retry this revocation in the background, from the running event loop."""
        if grant_id in self._pending:
            return
        if len(self._pending) >= self._capacity:
            dropped = min(self._pending.values(), key=lambda p: p.expires_at)
            del self._pending[dropped.grant_id]
            log.warning("revocation queue full (%d): gave up on grant %s, which expires on its own at %s",
                        self._capacity, dropped.grant_id, _utc(dropped.expires_at))
        self._pending[grant_id] = _Pending(grant_id, expires_at, due=time.monotonic() + self._initial)
        self._ensure_running()
        self._wake.set()

    async def drain(self, timeout_s: float) -> list[str]:
        """Wait up to ``timeout_s`` for the queue to empty (e.g. at worker shutdown); the grants left."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            self._ensure_running()
            await asyncio.sleep(0.05)
        return self.pending

    async def aclose(self) -> None:
        task, self._task = self._task, None
        # A task of another loop (already closed, as between tests) cannot be cancelled from here.
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for item in self._pending.values():
            log.warning("grant %s was never revoked: it expires on its own at %s", item.grant_id, _utc(item.expires_at))

    # -- the background task -------------------------------------------------------

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        # A new loop (the old one closed, as between tests) needs its own event and task.
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="firebreak-revocation-retries")

    async def _run(self) -> None:
        while self._pending:
            now = time.monotonic()
            due = [p for p in self._pending.values() if p.due <= now]
            for item in due:
                await self._attempt(item)
            if not self._pending:
                break
            wait = max(0.0, min(p.due for p in self._pending.values()) - time.monotonic())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    async def _attempt(self, item: _Pending) -> None:
        if self._clock() > item.expires_at + EXPIRY_MARGIN_S:
            self._pending.pop(item.grant_id, None)
            log.info("grant %s expired before its revocation could land: no target accepts it any more", item.grant_id)
            return
        item.attempts += 1
        try:
            known = await self._revoke(item.grant_id)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the broker is retried the same way
            item.due = time.monotonic() + min(self._max, self._initial * 2 ** item.attempts)
            if item.attempts == 1 or item.attempts % 10 == 0:
                log.warning("revocation of grant %s still failing after %d attempt(s): %s",
                            item.grant_id, item.attempts, type(exc).__name__)
            return
        self._pending.pop(item.grant_id, None)
        self.landed.append(item.grant_id)
        del self.landed[: -self._capacity]
        log.warning("revocation of grant %s landed after %d retr%s%s", item.grant_id, item.attempts,
                    "y" if item.attempts == 1 else "ies", "" if known else " (the broker no longer knew it)")


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
