"""Retried webhook deliveries, answered once.

PagerDuty repeats ``X-Webhook-Id`` on every retry of one delivery (for up to
48 h, at least once). A delivery id is remembered only after the delivery was
processed and recorded, so a delivery that failed (503) is processed again on
retry. Two copies arriving at once are serialised: the second waits for the
first and is then answered as a duplicate.

Ids are kept in memory and appended to ``STATE_DIR/api/pagerduty_deliveries.jsonl`` so
that a restart of the API does not turn a retry into a second alert.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

FILE_NAME = "pagerduty_deliveries.jsonl"
MAX_IDS = 200_000


class DeliveryLog:
    def __init__(self, path: Path, ttl_s: float) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._write_lock = asyncio.Lock()
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        horizon = time.time() - self.ttl_s
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                if entry["at"] >= horizon:
                    self._seen[str(entry["id"])] = float(entry["at"])
            except (ValueError, KeyError, TypeError):
                continue
        self._trim()
        # Rewrite without the expired ids so the file does not grow forever.
        data = "".join(json.dumps({"id": k, "at": v}) + "\n" for k, v in self._seen.items())
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(data, encoding="utf-8")
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)

    def _trim(self) -> None:
        horizon = time.time() - self.ttl_s
        while self._seen and (len(self._seen) > MAX_IDS or next(iter(self._seen.values())) < horizon):
            self._seen.popitem(last=False)

    def seen(self, delivery_id: str) -> bool:
        at = self._seen.get(delivery_id)
        return at is not None and at >= time.time() - self.ttl_s

    @asynccontextmanager
    async def hold(self, delivery_id: str) -> AsyncIterator[bool]:
        """Serialise copies of one delivery; yields True when it was already processed."""
        entry = self._locks.setdefault(delivery_id, (asyncio.Lock(), [0]))
        lock, users = entry
        users[0] += 1  # counted, not lock.locked(): a woken waiter has not re-taken the lock yet
        try:
            async with lock:
                yield self.seen(delivery_id)
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[delivery_id]

    async def mark(self, delivery_id: str) -> None:
        at = time.time()
        self._seen[delivery_id] = at
        self._seen.move_to_end(delivery_id)
        self._trim()
        line = (json.dumps({"id": delivery_id, "at": at}) + "\n").encode("utf-8")
        async with self._write_lock:
            await asyncio.to_thread(self._append, line)

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
