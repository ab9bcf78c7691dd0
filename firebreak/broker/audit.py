"""The broker's audit log: append-only JSON lines, each record chained to the last.

``hash = sha256(prev_hash + canonical JSON of the record without "hash")``, so an
edited, deleted or reordered record breaks the chain from that record on, and
``verify_chain`` names it. Tokens never enter the log: only grant ids (the jti),
audiences, scopes and who approved.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from firebreak.contracts import canonical_json

GENESIS = "0" * 64
Event = Literal["mint", "deny", "revoke", "freeze", "thaw"]
FIELDS = (
    "seq",
    "at",
    "event",
    "grant_id",
    "audience",
    "scope",
    "subject",
    "workflow_id",
    "run_id",
    "step_id",
    "approvers",
    "decision",
    "reason",
    "prev_hash",
)


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(record["prev_hash"].encode("ascii") + canonical_json(body)).hexdigest()


class AuditLog:
    """One writer per file (the broker process); appends are serialised by a lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Create it now, 0600, so that it exists (empty) from the first start.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        self._seq, self._last_hash = self._tail()

    def _tail(self) -> tuple[int, str]:
        if not self.path.exists():
            return 0, GENESIS
        last = None
        with self.path.open("rb") as fh:
            for line in fh:
                if line.strip():
                    last = line
        if last is None:
            return 0, GENESIS
        try:
            record = json.loads(last)
            return int(record["seq"]), str(record["hash"])
        except (ValueError, KeyError, TypeError):
            # A damaged tail is for `firebreak audit verify` to report; keep appending
            # after it rather than refusing to run (the break stays detectable).
            return sum(1 for _ in self.path.open("rb")), GENESIS

    def append(
        self,
        event: Event,
        *,
        decision: str,
        reason: str = "",
        grant_id: str | None = None,
        audience: str | None = None,
        scope: dict[str, str] | None = None,
        subject: str | None = None,
        workflow_id: str | None = None,
        run_id: str | None = None,
        step_id: str | None = None,
        approvers: list[str] | None = None,
    ) -> dict[str, Any]:
        with self._lock:
            record: dict[str, Any] = {
                "seq": self._seq + 1,
                "at": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                "event": event,
                "grant_id": grant_id,
                "audience": audience,
                "scope": scope,
                "subject": subject,
                "workflow_id": workflow_id,
                "run_id": run_id,
                "step_id": step_id,
                "approvers": list(approvers or []),
                "decision": decision,
                "reason": reason,
                "prev_hash": self._last_hash,
            }
            record["hash"] = record_hash(record)
            line = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
            # O_APPEND: every write lands at the end, even if someone else opened it.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            self._seq, self._last_hash = record["seq"], record["hash"]
            return record


def verify_chain(path: str | Path) -> tuple[bool, int | None, str]:
    """(ok, first bad seq or None, message). A missing file is an empty, valid log."""
    path = Path(path)
    if not path.exists():
        return True, None, f"{path}: no audit log yet (0 records)"
    prev = GENESIS
    count = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            expected_seq = count + 1
            try:
                record = json.loads(raw)
            except ValueError:
                return False, expected_seq, f"{path}:{lineno}: record {expected_seq} is not valid JSON"
            if not isinstance(record, dict) or set(record) != set(FIELDS) | {"hash"}:
                return False, expected_seq, f"{path}:{lineno}: record {expected_seq} has the wrong fields"
            if record["seq"] != expected_seq:
                return (
                    False,
                    expected_seq,
                    f"{path}:{lineno}: expected seq {expected_seq}, found {record['seq']}"
                    " (record removed or reordered)",
                )
            if record["prev_hash"] != prev:
                return False, expected_seq, f"{path}:{lineno}: record {expected_seq} does not chain to the one before"
            if record_hash(record) != record["hash"]:
                return False, expected_seq, f"{path}:{lineno}: record {expected_seq} was altered (hash mismatch)"
            prev = record["hash"]
            count += 1
    return True, None, f"{path}: {count} records, chain intact"
