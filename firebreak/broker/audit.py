"""The broker's audit log: append-only JSON lines, each record chained to the last.

``hash = sha256(prev_hash + canonical JSON of the record without "hash")``, so an
edited, deleted or reordered record breaks the chain from that record on, and
``verify_chain`` names it. Tokens never enter the log: only grant ids (the jti),
audiences, scopes and who approved.

A chain cannot show that records are missing at its end, or that the whole log
was rewritten and re-hashed. For that the broker signs checkpoints of the head
(:mod:`firebreak.broker.checkpoints`): at start, every ``N`` records and at
shutdown. ``verify_chain`` checks them, and can cross-check the audit sequence
numbers that Temporal history recorded for each grant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firebreak import signing
from firebreak.broker import checkpoints as cp
from firebreak.broker.group_commit import GroupCommit
from firebreak.contracts import canonical_json

log = logging.getLogger(__name__)

GENESIS = "0" * 64
Event = Literal["mint", "deny", "revoke", "freeze", "thaw", "rotate", "catalog_read", "run_closed"]
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
    unsigned, and one on :meth:`close`. Only those appends pay for a signature.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        kid: str | None = None,
        checkpoint_every: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.checkpoints_path = cp.checkpoints_path(self.path)
        self._lock = threading.Lock()
        self._commit = GroupCommit(self._flush)
        # Create it now, 0600, so that it exists (empty) from the first start.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        self._seq, self._last_hash = self._tail()
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1 (got {checkpoint_every})")
        self._every = checkpoint_every or cp.every_from_env()
        self._key = signing_key
        self._kid = (kid or signing.key_id(signing_key)) if signing_key is not None else ""
        self._last_checkpoint: cp.Checkpoint | None = None
        if signing_key is not None:
            self._last_checkpoint = cp.last_valid(self.checkpoints_path, signing_key.public_key(), self._kid)
            self._warn_if_behind_checkpoint()
            # A checkpoint at start records this run's interval (a verifier needs it to know how
            # many unsigned records may follow) and covers records a crash left unsigned.
            with self._lock:
                self._checkpoint_locked("start")

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
        sync: bool = True,
    ) -> dict[str, Any]:
        """Append one record; with ``sync`` (the default) return once it is on disk. A caller holding a lock
        others wait for passes ``sync=False`` and calls :meth:`sync` once it has let go."""
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
            finally:
                os.close(fd)
            self._seq, self._last_hash = record["seq"], record["hash"]
            signed_up_to = self._last_checkpoint.seq if self._last_checkpoint else 0
            if self._key is not None and self._seq - signed_up_to >= self._every:
                try:
                    self._checkpoint_locked("every")
                except OSError:
                    # The record is written; failing the request now would help nobody. The next
                    # append retries, and until then `audit verify` reports the missing checkpoint.
                    log.exception("could not write the audit checkpoint for record %d", self._seq)
        if sync:
            self.sync(record["seq"])
        return record

    def sync(self, seq: int) -> None:
        """Return once record ``seq`` and every one before it are on disk: one fsync for all who wait."""
        self._commit.wait(seq)

    def _flush(self) -> int:
        with self._lock:
            seq = self._seq
        _fsync(self.path)  # every record up to seq was written before we read it
        return seq

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
            return self._checkpoint_locked(reason)

    def close(self) -> cp.Checkpoint | None:
        """At shutdown: sign the head, so that no record of this run is left unsigned."""
        return self.checkpoint("shutdown")

    def rekey(self, signing_key: Ed25519PrivateKey, kid: str) -> None:
        """The broker's key rotated: sign the head with the old key, then sign with the new one from here."""
        with self._lock:
            if self._key is not None:
                checkpoint = cp.sign(self._key, self._kid, seq=self._seq, hash=self._last_hash, every=self._every,
                                     reason="rekey")
                cp.append(self.checkpoints_path, checkpoint)
                self._last_checkpoint = checkpoint
            self._key, self._kid = signing_key, kid

    def _checkpoint_locked(self, reason: cp.Reason) -> cp.Checkpoint | None:
        if self._key is None:
            return None
        last = self._last_checkpoint
        if last is not None and (last.seq, last.hash, last.every) == (self._seq, self._last_hash, self._every):
            return last
        _fsync(self.path)  # never sign a record that a crash could still take back
        checkpoint = cp.sign(self._key, self._kid, seq=self._seq, hash=self._last_hash, every=self._every, reason=reason)
        cp.append(self.checkpoints_path, checkpoint)
        self._last_checkpoint = checkpoint
        return checkpoint


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    checkpoints removed), or none at all; a history grant beyond the end, or whose
    record is not its mint. The first bad seq is the first record missing or wrong,
    or None when the problem is not one record.
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
    scanned = _scan(path, want_hash, want_record)
    if isinstance(scanned, tuple):
        return scanned
    count, hashes, records = scanned.count, scanned.hashes, scanned.records

    if keys is not None:
        problem = _check_checkpoints(cp_file, cps, keys, count, hashes)
        if problem is not None:
            return False, *problem
    if history is not None:
        problem = _check_history(history, count, records)
        if problem is not None:
            return False, *problem

    if keys is None and history is None:
        return True, None, f"{path}: {count} records, chain intact"
    parts = [f"{count} records"]
    if keys is not None:
        parts.append(f"{len(cps)} checkpoints")
    if history is not None:
        parts.append(f"{len(history)} grants from history")
    return True, None, f"{path}: {', '.join(parts)}: chain intact"


@dataclass
class _Scan:
    count: int
    hashes: dict[int, str]  # seq -> hash, only for the seqs checkpoints name (and 0)
    records: dict[int, tuple[str, str | None]]  # seq -> (event, grant_id), only for history's seqs


def _scan(path: Path, want_hash: set[int], want_record: set[int]) -> Verdict | _Scan:
    """The chain check: the first break as a verdict, else what the later checks need."""
    prev = GENESIS
    count = 0
    hashes: dict[int, str] = {0: GENESIS}
    records: dict[int, tuple[str, str | None]] = {}
    if not path.exists():
        return _Scan(count, hashes, records)
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
            if count in want_hash:
                hashes[count] = record["hash"]
            if count in want_record:
                records[count] = (str(record["event"]), record["grant_id"])
    return _Scan(count, hashes, records)


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
