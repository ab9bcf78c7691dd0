"""Alerts that opened no incident, kept so that none is silently dropped.

``STATE_DIR/api/unrouted.jsonl``, one JSON object a line:

- ``kind: "unrouted"``: no runbook matches the alert;
- ``kind: "refused"``: a runbook matches but refused a label value (the
  value never reached a query), with the ``field`` and the ``reason``; or the
  alert itself could not be taken (a field missing), or its delivery was a
  replay, a stale event or a spoof;
- ``kind: "test"``: a recognised test notification (Grafana's contact-point
  test, PagerDuty's ping): answered 2xx, opened nothing;
- ``kind: "event"``: an event that changes no incident but is worth keeping
  (Opsgenie's acknowledge), with the ``reason``.

Each write is flushed and fsynced before the webhook is answered, so an
acknowledged alert is on disk. The file is append-only; past ``MAX_BYTES`` it
is rotated to ``unrouted.jsonl.1`` (one generation kept), so a group of
unroutable alerts re-sent every few minutes cannot fill the disk. Reading
returns the newest records.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from firebreak.contracts import Alert

FILE_NAME = "unrouted.jsonl"
_TAIL_BYTES = 8 * 1024 * 1024  # enough for thousands of records without reading a huge file whole
MAX_BYTES = 64 * 1024 * 1024


class UnroutedRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    at: datetime
    kind: Literal["unrouted", "refused", "test", "event"]
    source: str
    delivery_id: str | None = None
    reason: str
    field: str | None = None
    runbook: str | None = None
    alert: Alert


class UnroutedLog:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = asyncio.Lock()

    async def append(self, records: list[UnroutedRecord]) -> None:
        if not records:
            return
        lines = "".join(r.model_dump_json() + "\n" for r in records).encode("utf-8")
        async with self._lock:
            await asyncio.to_thread(self._write, lines)

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size + len(data) > self.max_bytes:
            self.path.replace(self.path.with_name(self.path.name + ".1"))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def tail(self, limit: int, kind: str | None = None) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._tail, limit, kind)

    def _tail(self, limit: int, kind: str | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        # Newest first: the current file, then the rotated one.
        for path in (self.path, self.path.with_name(self.path.name + ".1")):
            for record in _records_newest_first(path):
                if kind is None or record.get("kind") == kind:
                    out.append(record)
                    if len(out) >= limit:
                        return out[::-1]
        return out[::-1]


def _records_newest_first(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _TAIL_BYTES))
        lines = f.read().splitlines()
    if size > _TAIL_BYTES:
        lines = lines[1:]  # the first line may be cut
    records = []
    for line in reversed(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a torn last line after a crash: skip it, keep the rest
    return records


def now() -> datetime:
    return datetime.now(timezone.utc)
