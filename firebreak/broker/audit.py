"""The broker's audit log: append-only JSON lines, each record chained to the last.

``hash = sha256(prev_hash + canonical JSON of the record without "hash")``, so an
edited, deleted or reordered record breaks the chain from that record on, and
``verify_chain`` names it. Tokens never enter the log: only grant ids (the jti),
audiences, scopes and who approved.

A chain cannot show that records are missing at its end, or that the whole log
was rewritten and re-hashed. For that the broker signs checkpoints of the head
(:mod:`firebreak.broker.checkpoints`): at start, every ``N`` records, at least every
``N`` seconds and at shutdown. ``verify_chain`` checks them, and can cross-check the
audit sequence numbers that Temporal history recorded for each grant.

A record is written whole or not at all (a short write is an error, and what reached the
file is cut off); a torn tail found at start is cut off too. Each cut is recorded in the
chain as a ``repair`` record saying what was cut and why, which ``verify_chain`` names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firebreak import signing
from firebreak.broker import checkpoints as cp
from firebreak.broker import storage
from firebreak.broker.group_commit import GroupCommit
from firebreak.contracts import canonical_json

log = logging.getLogger(__name__)

GENESIS = "0" * 64
# repair: a torn tail the broker cut off (what, and why); written before the next record.
Event = Literal["mint", "deny", "revoke", "freeze", "thaw", "rotate", "catalog_read", "repair", "run_closed"]
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
    """One writer per file (the broker process); appends are serialised by a lock, and the fsyncs of
    concurrent appends are grouped into one (:class:`GroupCommit`), outside that lock.

    With ``signing_key`` it also signs checkpoints of the head into
    ``audit.checkpoints.jsonl``: one when opened, one whenever ``checkpoint_every``
    records (default ``$FIREBREAK_AUDIT_CHECKPOINT_EVERY`` or 16) have gone
    unsigned, one at least every ``checkpoint_seconds`` (default
    ``$FIREBREAK_AUDIT_CHECKPOINT_SECONDS`` or 60) while it is open, even with nothing new
    (so a verifier can tell a log whose later checkpoints were cut away), and one on
    :meth:`close`. Only those appends pay for a signature.

    A write is whole or an error (:mod:`firebreak.broker.storage`): a record cut short is cut off
    again, its request fails, and the repair goes into the chain as a ``repair`` record before the
    next one (or at the next tick, or at close). A torn tail found when the log is opened (a crash
    mid-write) is cut off and recorded the same way.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        kid: str | None = None,
        checkpoint_every: int | None = None,
        checkpoint_seconds: float | None = None,
        on_storage_error: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.checkpoints_path = cp.checkpoints_path(self.path)
        self.on_storage_error = on_storage_error  # told "audit" or "checkpoints" on every failed write
        self._lock = threading.Lock()
        self._commit = GroupCommit(self._flush)
        # Create it now, 0600, so that it exists (empty) from the first start; its name durable too.
        created = not self.path.exists()
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        if created:
            storage.fsync_dir(self.path.parent)
        self._repairs: list[str] = []  # repairs made but not yet recorded in the chain
        # The first write cut short since the last record that got through, and how many more were: one
        # repair record tells them all (a full disk cuts every attempt until space returns).
        self._cut: tuple[str, int] | None = None
        self._torn = False  # bytes past self._size that a failed write left and could not cut off
        self._fsync_failed_upto = 0  # the highest record an fsync failed for (see sync)
        self._size = 0
        self._seq, self._last_hash = self._tail()
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1 (got {checkpoint_every})")
        if checkpoint_seconds is not None and checkpoint_seconds <= 0:
            raise ValueError(f"checkpoint_seconds must be above 0 (got {checkpoint_seconds})")
        self._every = checkpoint_every or cp.every_from_env()
        self._every_s = checkpoint_seconds or cp.seconds_from_env()
        self._key = signing_key
        self._kid = (kid or signing.key_id(signing_key)) if signing_key is not None else ""
        self._last_checkpoint: cp.Checkpoint | None = None
        self._checkpointed_at = time.monotonic()  # when the newest checkpoint was signed
        self._first_unsigned_at: float | None = None  # when the oldest record no checkpoint covers was written
        self._stop = threading.Event()
        with self._lock:
            self._write_repairs_locked()  # a torn tail cut at start goes on the record before anything else
        if signing_key is not None:
            self._cut_torn_checkpoint()
            self._last_checkpoint = cp.last_valid(self.checkpoints_path, signing_key.public_key(), self._kid)
            self._warn_if_behind_checkpoint()
            # A checkpoint at start records this run's interval (a verifier needs it to know how
            # many unsigned records may follow) and covers records a crash left unsigned.
            with self._lock:
                self._checkpoint_locked("start")
            threading.Thread(target=_tick_until_closed, args=(weakref.ref(self), self._stop, min(self._every_s / 4, 5.0)),
                             name=f"audit-checkpoints-{self.path.name}", daemon=True).start()

    def _warn_if_behind_checkpoint(self) -> None:
        last = self._last_checkpoint
        if last is None:
            return
        if last.seq > self._seq or (last.seq == self._seq and last.hash != self._last_hash):
            # Keep serving (the old checkpoint stays on file as the evidence), but say it now.
            log.error(
                "audit log %s does not match its last checkpoint (record %d): the log was cut short or "
                "rewritten while the broker was down; run `firebreak audit verify`",
                self.path,
                last.seq,
            )

    def _tail(self) -> tuple[int, str]:
        """(seq, hash) of the last record; a torn tail (bytes after the last end of line) is cut off first."""
        last = None
        whole = 0  # bytes up to and including the last end of line
        torn = b""
        with self.path.open("rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    torn = line
                    break
                whole += len(line)
                if line.strip():
                    last = line
        if torn:
            # Only a write cut short (a full disk, a crash) leaves a line without its end: it was never
            # answered, so nothing it recorded happened. A damaged *whole* line is for verify to report.
            after = "the start of the log"
            try:
                after = f"record {int(json.loads(last)['seq'])}" if last is not None else after
            except (ValueError, KeyError, TypeError):
                pass
            storage.truncate(self.path, whole)
            self._repairs.append(
                f"at start: cut a torn record after {after}: {len(torn)} bytes without an end of line"
                f" (sha256 {hashlib.sha256(torn).hexdigest()[:16]}, begins {torn[:48]!r}), left by a write cut"
                " short (a full disk or a crash); never answered, so nothing it recorded was issued"
            )
            log.error("audit log %s: cut a torn tail of %d bytes (a write cut short)", self.path, len(torn))
        self._size = whole
        if last is None:
            return 0, GENESIS
        try:
            record = json.loads(last)
            return int(record["seq"]), str(record["hash"])
        except (ValueError, KeyError, TypeError):
            # A damaged tail is for `firebreak audit verify` to report; keep appending
            # after it rather than refusing to run (the break stays detectable).
            return sum(1 for _ in self.path.open("rb")), GENESIS

    def _cut_torn_checkpoint(self) -> None:
        """A checkpoint line without its end was never fsynced whole: it vouches for nothing. Cut it off."""
        if not self.checkpoints_path.exists():
            return
        data = self.checkpoints_path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            storage.truncate(self.checkpoints_path, keep)
            self._repairs.append(f"at start: cut a torn checkpoint line of {len(data) - keep} bytes from"
                                 f" {self.checkpoints_path.name} (a write cut short)")
            with self._lock:
                self._write_repairs_locked()

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
        sync: bool = True,
    ) -> dict[str, Any]:
        """Append one record; with ``sync`` (the default) return once it is on disk. A caller holding a lock
        others wait for passes ``sync=False`` and calls :meth:`sync` once it has let go.

        Raises :class:`~firebreak.broker.storage.StorageError` if the record could not be written whole:
        it is then not in the log, and the caller must fail (a credential it recorded must not be issued)."""
        with self._lock:
            self._checkpoint_if_due_locked()
            record = self._append_locked(
                event, decision=decision, reason=reason, grant_id=grant_id, audience=audience, scope=scope,
                subject=subject, workflow_id=workflow_id, run_id=run_id, step_id=step_id,
                approvers=list(approvers or []),
            )
            signed_up_to = self._last_checkpoint.seq if self._last_checkpoint else 0
            if self._key is not None and self._seq - signed_up_to >= self._every:
                self._checkpoint_or_log_locked("every")
        if sync:
            self.sync(record["seq"])
        return record

    def _append_locked(self, event: Event, **fields: Any) -> dict[str, Any]:
        """Write the pending repairs and then this record, in one write; advance only once it is whole."""
        if self._torn:
            self._cut_torn_locked()
        records: list[dict[str, Any]] = []
        seq, prev = self._seq, self._last_hash
        for note in self._pending_repairs():
            seq, prev = seq + 1, self._new_record(records, seq + 1, prev, "repair", decision="truncated", reason=note)
        self._new_record(records, seq + 1, prev, event, **fields)
        data = b"".join(
            (json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
            for r in records
        )
        try:
            # O_APPEND: every write lands at the end, even if someone else opened it.
            start = storage.append_bytes(self.path, data, fsync=False)
        except storage.StorageError as exc:
            self._failed_write_locked(exc, records)
            raise
        self._size = start + len(data)
        self._repairs.clear()
        self._cut = None
        if self._first_unsigned_at is None:
            self._first_unsigned_at = time.monotonic()
        self._seq, self._last_hash = records[-1]["seq"], records[-1]["hash"]
        return records[-1]

    @staticmethod
    def _new_record(out: list[dict[str, Any]], seq: int, prev_hash: str, event: str, *, decision: str,
                    reason: str = "", grant_id: str | None = None, audience: str | None = None,
                    scope: dict[str, str] | None = None, subject: str | None = None,
                    workflow_id: str | None = None, run_id: str | None = None, step_id: str | None = None,
                    approvers: list[str] | None = None) -> str:
        record: dict[str, Any] = {
            "seq": seq,
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
            "prev_hash": prev_hash,
        }
        record["hash"] = record_hash(record)
        out.append(record)
        return str(record["hash"])

    def _failed_write_locked(self, exc: storage.StorageError, records: list[dict[str, Any]]) -> None:
        """Nothing advances. Bytes that reached the file were cut off again (or will be, before the next
        write): either way the cut is described now and recorded in the chain with the next record."""
        self._storage_error("audit")
        log.error("audit log %s: %s", self.path, exc)
        try:
            self._torn = os.stat(self.path).st_size > self._size
        except OSError:
            self._torn = True
        if not (exc.written or self._torn):
            return  # nothing reached the file: nothing to repair
        if self._cut is not None:
            self._cut = (self._cut[0], self._cut[1] + 1)
            return
        last = records[-1]
        what = last["event"] + (f" of grant {last['grant_id']}" if last["grant_id"] else "")
        first = (f"record {last['seq']} ({what}) was cut short: {exc.written} of {exc.wanted} bytes written"
                 f" ({exc.why}); they were cut off and the request it recorded failed")
        self._cut = (first, 0)

    def _pending_repairs(self) -> list[str]:
        notes = list(self._repairs)
        if self._cut is not None:
            first, more = self._cut
            notes.append(first + (f"; {more} later write(s) were cut short the same way, each cut off and its"
                                  " request failed" if more else ""))
        return notes

    def _cut_torn_locked(self) -> None:
        storage.truncate(self.path, self._size)  # raises: the append fails, closed, and tries again next time
        self._torn = False

    def _write_repairs_locked(self) -> None:
        """Record the repairs still pending, best effort (the next append carries them if this fails)."""
        notes = self._pending_repairs()
        if not notes:
            return
        # The last note is the record itself; _append_locked writes the others before it.
        repairs, cut = self._repairs, self._cut
        self._repairs, self._cut = notes[:-1], None
        try:
            self._append_locked("repair", decision="truncated", reason=notes[-1])
        except storage.StorageError:
            failed_too = self._cut is not None  # this write was cut short as well
            self._repairs = repairs
            self._cut = self._cut if cut is None else (cut[0], cut[1] + failed_too)
        else:
            self._commit_now_locked()

    def _commit_now_locked(self) -> None:
        try:
            storage.fsync_path(self.path)
        except storage.StorageError as exc:
            self._fsync_failed_locked(self._seq, exc)
            raise

    def _storage_error(self, which: str) -> None:
        if self.on_storage_error is not None:
            try:
                self.on_storage_error(which)
            except Exception:  # a metric must never turn a failed write into another failure
                log.exception("storage error callback failed")

    def sync(self, seq: int) -> None:
        """Return once record ``seq`` and every one before it are on disk: one fsync for all who wait.

        A record an fsync failed for is never reported durable, even after a later fsync succeeds: Linux
        reports a writeback error once, and the pages it concerned may be gone (the request fails closed)."""
        self._commit.wait(seq)
        if 0 < seq <= self._fsync_failed_upto:  # 0: no record yet, nothing to have lost
            raise storage.StorageError(self.path, f"fsync of record {seq} in", None)

    def _flush(self) -> int:
        with self._lock:
            seq = self._seq
        try:
            storage.fsync_path(self.path)  # every record up to seq was written before we read it
        except storage.StorageError as exc:
            with self._lock:
                self._fsync_failed_locked(seq, exc)
            raise
        return seq

    def _fsync_failed_locked(self, seq: int, exc: storage.StorageError) -> None:
        if seq > self._fsync_failed_upto:
            self._fsync_failed_upto = seq
            # On the record, and past it: callers that sync the head without appending (an approval
            # check) wait for a record after this one, which the next append or tick writes.
            self._repairs.append(f"an fsync of records up to {seq} failed ({exc.why}): they may not be on"
                                 " disk, and every request waiting for them failed")
        self._storage_error("audit")

    @property
    def head_seq(self) -> int:
        """The last record appended (written; :meth:`sync` makes it durable)."""
        return self._seq

    @property
    def last_checkpoint(self) -> cp.Checkpoint | None:
        return self._last_checkpoint

    def checkpoint(self, reason: cp.Reason = "shutdown") -> cp.Checkpoint | None:
        """Sign the head now (None without a signing key); a head already signed is not signed twice."""
        with self._lock:
            if reason == "shutdown":
                self._write_repairs_locked()
            return self._checkpoint_locked(reason)

    def close(self) -> cp.Checkpoint | None:
        """At shutdown: sign the head, so that no record of this run is left unsigned."""
        self._stop.set()
        return self.checkpoint("shutdown")

    def tick(self) -> None:
        """What the background thread does every few seconds: record pending repairs, and sign the head if
        ``checkpoint_seconds`` have passed since the last checkpoint (with something new or not)."""
        if not self.path.exists():  # the log was removed from under us (a test's temporary directory)
            self._stop.set()
            return
        with self._lock:
            self._write_repairs_locked()
            if self._key is not None and time.monotonic() - self._checkpointed_at >= self._every_s:
                self._checkpoint_or_log_locked("time", again=True)

    def _checkpoint_if_due_locked(self) -> None:
        """Before a record is added: sign what has waited ``checkpoint_seconds`` unsigned, so that no two
        unsigned records are further apart than that (what `audit verify` checks)."""
        if (self._key is not None and self._first_unsigned_at is not None
                and time.monotonic() - self._first_unsigned_at >= self._every_s):
            self._checkpoint_or_log_locked("time")

    def _checkpoint_or_log_locked(self, reason: cp.Reason, *, again: bool = False) -> None:
        try:
            self._checkpoint_locked(reason, again=again)
        except OSError:
            # The record is written; failing the request now would help nobody. The next append or tick
            # retries, and until then `audit verify` reports the missing checkpoint.
            log.exception("could not write the audit checkpoint for record %d", self._seq)

    def rekey(self, signing_key: Ed25519PrivateKey, kid: str) -> None:
        """The broker's key rotated: sign the head with the old key, then sign with the new one from here."""
        with self._lock:
            if self._key is not None:
                self._checkpoint_locked("rekey", again=True)
            self._key, self._kid = signing_key, kid

    def _checkpoint_locked(self, reason: cp.Reason, *, again: bool = False) -> cp.Checkpoint | None:
        """Sign the head. ``again``: even if the newest checkpoint already signed it (a time heartbeat)."""
        if self._key is None:
            return None
        last = self._last_checkpoint
        if not again and last is not None and (last.seq, last.hash, last.every, last.every_s) == (
                self._seq, self._last_hash, self._every, self._every_s):
            return last
        self._commit_now_locked()  # never sign a record that a crash could still take back
        checkpoint = cp.sign(self._key, self._kid, seq=self._seq, hash=self._last_hash, every=self._every,
                             reason=reason, every_s=self._every_s)
        try:
            cp.append(self.checkpoints_path, checkpoint)
        except storage.StorageError:
            self._storage_error("checkpoints")
            raise
        self._last_checkpoint = checkpoint
        self._checkpointed_at = time.monotonic()
        self._first_unsigned_at = None
        return checkpoint


def _tick_until_closed(ref: weakref.ref[AuditLog], stop: threading.Event, interval: float) -> None:
    """The ticker holds the log weakly: a log dropped without :meth:`AuditLog.close` ends its thread too."""
    while not stop.wait(interval):
        audit = ref()
        if audit is None:
            return
        try:
            audit.tick()
        except Exception:  # the next tick tries again; verify reports a gap meanwhile
            log.exception("audit checkpoint tick failed")
        del audit


def checkpoint_at_shutdown(audit: AuditLog) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A FastAPI/Starlette ``lifespan`` that signs the head when the server shuts down.

    Uvicorn runs it on a graceful stop (SIGTERM/SIGINT). Servers started with
    ``lifespan="off"`` (:class:`firebreak.serving.ThreadedServer`) must call
    :meth:`AuditLog.close` themselves, as :class:`~firebreak.broker.server.BrokerServer` does.
    """

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        audit.close()

    return lifespan


Verdict = tuple[bool, int | None, str]


def verify_chain(
    path: str | Path,
    *,
    public_key: Ed25519PublicKey | Ed25519PrivateKey | Mapping[str, Ed25519PublicKey] | None = None,
    checkpoints: str | Path | None = None,
    history: Mapping[int, str] | None = None,
    now: datetime | None = None,
) -> Verdict:
    """(ok, first bad seq or None, message). A missing file is an empty, valid log.

    ``public_key`` (the broker's key, or kid -> key as from a JWKS) turns on the
    checkpoint checks against ``checkpoints`` (default: ``audit.checkpoints.jsonl``
    beside the log). Without a key, checkpoints are not read: an unverifiable
    checkpoint proves nothing. ``history`` is ``{audit_seq: grant_id}`` as Temporal
    history recorded the grants (:mod:`firebreak.audit_history`): each seq must be
    in the log and be the mint of that grant.

    Broken, in the order checked: the chain itself; a checkpoint that is malformed,
    not signed by the key, beyond the log's end (the tail was cut off) or whose
    hash is not the record's at its seq (the log was rewritten and re-hashed); more
    unsigned records after the newest checkpoint than the broker leaves (later
    checkpoints removed), or none at all; time, where the checkpoints promise
    ``every_s``: unsigned records further apart than that, or a newest checkpoint
    other than a shutdown's older than that at ``now`` (default: the current time)
    (later checkpoints removed, with the tail they signed; or a broker that crashed
    and has not started since); a history grant beyond the end, or whose record is
    not its mint. The first bad seq is the first record missing or wrong, or None
    when the problem is not one record. An intact log's message names the repairs
    the broker recorded (torn writes it cut off).
    """
    path = Path(path)
    keys = cp.public_keys(public_key) if public_key is not None else None
    cp_file = Path(checkpoints) if checkpoints is not None else cp.checkpoints_path(path)
    cps = cp.read(cp_file) if keys is not None else []
    history = dict(history) if history is not None else None
    if not path.exists() and keys is None and history is None:
        return True, None, f"{path}: no audit log yet (0 records)"

    # Keep only what the later checks look at, not the whole log.
    want_hash = {c.seq for _, c in cps if isinstance(c, cp.Checkpoint)}
    want_record = set(history or ())
    newest_seq = max(want_hash, default=0)
    scanned = _scan(path, want_hash, want_record, newest_seq)
    if isinstance(scanned, tuple):
        return scanned
    count, hashes, records = scanned.count, scanned.hashes, scanned.records

    if keys is not None:
        problem = _check_checkpoints(cp_file, cps, keys, count, hashes)
        if problem is None:
            problem = _check_time(cp_file, cps, scanned, now or datetime.now(UTC))
        if problem is not None:
            return False, *problem
    if history is not None:
        problem = _check_history(history, count, records)
        if problem is not None:
            return False, *problem

    repairs = "".join(f"\n  repair at record {seq}: {reason}" for seq, reason in scanned.repairs)
    if repairs:
        repairs = f"\n{len(scanned.repairs)} repair(s) the broker recorded:{repairs}"
    if keys is None and history is None:
        return True, None, f"{path}: {count} records, chain intact{repairs}"
    parts = [f"{count} records"]
    if keys is not None:
        parts.append(f"{len(cps)} checkpoints")
    if history is not None:
        parts.append(f"{len(history)} grants from history")
    return True, None, f"{path}: {', '.join(parts)}: chain intact{repairs}"


@dataclass
class _Scan:
    count: int
    hashes: dict[int, str]  # seq -> hash, only for the seqs checkpoints name (and 0)
    records: dict[int, tuple[str, str | None]]  # seq -> (event, grant_id), only for history's seqs
    repairs: list[tuple[int, str]] = field(default_factory=list)  # (seq, reason) of each repair record
    # "at" of the first and the last record after the newest checkpoint (None: there are none).
    unsigned: tuple[int, str, str] | None = None  # (first unsigned seq, its at, the last record's at)


def _scan(path: Path, want_hash: set[int], want_record: set[int], newest_seq: int = 0) -> Verdict | _Scan:
    """The chain check: the first break as a verdict, else what the later checks need."""
    prev = GENESIS
    count = 0
    hashes: dict[int, str] = {0: GENESIS}
    records: dict[int, tuple[str, str | None]] = {}
    found = _Scan(count, hashes, records)
    if not path.exists():
        return found
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            expected_seq = count + 1
            try:
                record = json.loads(raw)
            except ValueError:
                if not raw.endswith(b"\n"):
                    return False, expected_seq, (
                        f"{path}:{lineno}: the log ends in a torn record after record {count} ({len(raw)} bytes"
                        " without an end of line): a write cut short by a full disk or a crash. The broker cuts"
                        " it off and records the repair when it next starts or writes"
                    )
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
            if count in want_hash:
                hashes[count] = record["hash"]
            if count in want_record:
                records[count] = (str(record["event"]), record["grant_id"])
            if record["event"] == "repair":
                found.repairs.append((count, str(record["reason"])))
            if count > newest_seq:
                first = found.unsigned
                found.unsigned = (count, str(record["at"]), str(record["at"])) if first is None else (
                    first[0], first[1], str(record["at"]))
    found.count = count
    return found


# Clock steps, a busy host, the ticker's own period: how late a checkpoint may be before verify says so.
TIME_GRACE_S = 30.0


def _parse_at(value: str) -> datetime | None:
    try:
        at = datetime.fromisoformat(value)  # "...Z" parses as UTC
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _check_time(
    cp_file: Path,
    cps: list[tuple[int, cp.Checkpoint | cp.MalformedCheckpoint]],
    scanned: _Scan,
    now: datetime,
) -> tuple[int | None, str] | None:
    """The checks a time-anchored newest checkpoint allows (none for one from before ``every_s``)."""
    if not cps:
        return None
    lineno, newest = cps[-1]
    if not isinstance(newest, cp.Checkpoint) or newest.every_s is None:
        return None
    limit = newest.every_s + TIME_GRACE_S
    where = f"the newest checkpoint (record {newest.seq}, {cp_file}:{lineno}, signed {newest.at})"
    if scanned.unsigned is not None:
        first_seq, first_at, last_at = scanned.unsigned
        first, last = _parse_at(first_at), _parse_at(last_at)
        if first is None or last is None:
            return first_seq, f"record {first_seq} or the last record has an unreadable time ({first_at!r}, {last_at!r})"
        if (last - first).total_seconds() > limit:
            return first_seq, (
                f"records {first_seq} to {scanned.count} follow {where} and span"
                f" {(last - first).total_seconds():.0f} s, but the broker signs its head within {newest.every_s:g} s:"
                " later checkpoints were removed (or could not be written; see the broker's log)"
            )
    signed = _parse_at(newest.at)
    if newest.reason == "shutdown" or signed is None:
        return None
    age = (now - signed).total_seconds()
    if age > limit:
        return scanned.count + 1, (
            f"{where} is {age:.0f} s old and not a shutdown checkpoint, but a running broker signs its head at least"
            f" every {newest.every_s:g} s: later checkpoints were removed, and the tail they signed may have been"
            " cut with them (records after"
            f" {scanned.count} missing?); or the broker stopped without shutting down (a crash) and has not"
            " started since (start it: it signs its head, and verify again). Cross-check with Temporal history"
            " (--history)"
        )
    return None


def _check_checkpoints(
    cp_file: Path,
    cps: list[tuple[int, cp.Checkpoint | cp.MalformedCheckpoint]],
    keys: Mapping[str, Ed25519PublicKey],
    count: int,
    hashes: dict[int, str],
) -> tuple[int | None, str] | None:
    for lineno, item in cps:
        where = f"checkpoint {cp_file}:{lineno}"
        if isinstance(item, cp.MalformedCheckpoint):
            return None, f"{where} is malformed: {item}"
        problem = cp.signature_problem(item, keys)
        if problem is not None:
            return item.seq, f"{where} (record {item.seq}) is not the broker's: {problem}"
        if item.seq > count:
            return count + 1, (
                f"{where} signed record {item.seq}, but the log ends at record {count}:"
                f" the log was cut short (records from {count + 1} on are missing)"
            )
        if hashes[item.seq] != item.hash:
            # The newest checkpoint below this one that still matches bounds where the rewrite starts.
            intact = max(
                (c.seq for _, c in cps if isinstance(c, cp.Checkpoint) and c.seq < item.seq
                 and hashes.get(c.seq) == c.hash and cp.signature_problem(c, keys) is None),
                default=None,
            )
            since = f" after record {intact}" if intact else ""
            return item.seq, (
                f"record {item.seq} is not the record {where} signed (hash {hashes[item.seq][:12]}..., signed"
                f" {item.hash[:12]}...): the log was rewritten{since} and re-hashed"
            )
    if not cps:
        if count:
            return None, (
                f"{count} records but no checkpoint in {cp_file}: the checkpoints were deleted (a broker with its"
                " signing key signs one at start, every few records and at shutdown)"
            )
        return None
    lineno, newest = cps[-1]
    assert isinstance(newest, cp.Checkpoint)  # every malformed line returned above
    unsigned = count - newest.seq
    if unsigned > newest.every:
        return newest.seq + 1, (
            f"{unsigned} records follow the newest checkpoint (record {newest.seq}, {cp_file}:{lineno}), but the"
            f" broker signs one every {newest.every}: later checkpoints were removed (or could not be written;"
            " see the broker's log)"
        )
    return None


def _check_history(
    history: Mapping[int, str], count: int, records: dict[int, tuple[str, str | None]]
) -> tuple[int | None, str] | None:
    for seq in sorted(history):
        grant_id = history[seq]
        if seq < 1:
            return None, f"Temporal history says grant {grant_id!r} was minted as record {seq}, which cannot exist"
        if seq > count:
            return count + 1, (
                f"Temporal history says grant {grant_id!r} was minted as record {seq}, but the log ends at"
                f" record {count}: the log was cut short"
            )
        event, logged = records[seq]
        if event != "mint" or logged != grant_id:
            return seq, (
                f"record {seq} is a {event} of grant {logged!r}, but Temporal history says record {seq} minted"
                f" grant {grant_id!r}: the log was rewritten"
            )
    return None
