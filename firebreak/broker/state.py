"""The broker's durable state under ``STATE_DIR/broker/``.

```
signing-key.pem   Ed25519 key for target tokens (0600, created on first start)
signing-keys.json public halves of rotated-out keys, each published until its overlap ends (signing_keys.py)
agent-token       the worker's bootstrap credential (0600) unless FIREBREAK_BROKER_TOKEN
agent-credential.json  when it was issued; SHA-256 and overlap end of rotated-out ones (agent_credential.py)
admin-token       for freeze/thaw (0600) unless FIREBREAK_BROKER_ADMIN_TOKEN
audit.jsonl       hash-chained audit log (audit.py); audit.checkpoints.jsonl its signed checkpoints
frozen            present while the kill switch is on (survives restarts)
state.jsonl       the journal of everything else a restart must keep, one JSON line per change: grants
                  (jti, expiry; revoked?) so a freeze after a restart still revokes, approval nonces with
                  the digest of the approval that carried each, each approval's verdict and the instant
                  the broker first saw it (judged once), and plan authorizations per (workflow, run, plan
                  hash): who approved which steps, until when, and which step and undo each activity
                  minted (once), with the attempt, grant and time of each and which wrote at the target;
                  runs the workflow reported closed; everyone a genuine receipt named as having raised
                  each incident. Rewritten with the live records when it grows. The earlier forms
                  (grants.jsonl, grants.json, nonces.json, approvals.json, plans.json) are read once and
                  replaced.
```

Nothing here holds a token: grants are known by their id (the jti). Every write is whole and fsynced
or an error (:mod:`firebreak.broker.storage`); a journal line torn by a crash is dropped at start and the
drop recorded in the audit log.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firebreak import signing
from firebreak.broker import storage
from firebreak.broker.group_commit import GroupCommit


def broker_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "broker"


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        storage.write_all(fd, text.encode("ascii"), path)
        storage.fsync_fd(fd, path)
    except BaseException:
        path.unlink(missing_ok=True)  # half a secret is no secret: the next start makes a whole one
        raise
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` whole or not at all; a failed write removes its temporary file (on a full disk
    the space it holds is what the next attempt needs)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise storage.StorageError(tmp, "open of", exc) from exc
    try:
        try:
            storage.write_all(fd, text.encode("utf-8"), tmp)
            storage.fsync_fd(fd, tmp)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise storage.StorageError(path, "rename onto", exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    storage.fsync_dir(path.parent)  # the rename itself survives a crash only once the directory is on disk


def _append(path: Path, text: str) -> None:
    """Whole and fsynced, or an error with the part that reached the file cut off again (a torn line
    left anyway, if the cut fails too, is dropped at the next start and the journal rewritten)."""
    storage.append_bytes(path, text.encode("utf-8"), fsync=True)


def _atomic_json(path: Path, data: Any) -> None:
    _atomic_write(path, json.dumps(data, sort_keys=True))


def read_or_create_secret(path: Path, env_var: str | None = None, given: str | None = None) -> str:
    """A bearer secret: given, else from the environment, else the file (created if absent)."""
    if given:
        return given
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_secret(path, secrets.token_urlsafe(32))
    return path.read_text(encoding="ascii").strip()


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    if not path.exists():
        signing.write_private_key(path, signing.generate_key())
    return signing.load_private_key(path)


@dataclass
class GrantRecord:
    grant_id: str  # == the token's jti
    exp: float
    audience: str
    verb: str
    resource: str
    workflow_id: str
    run_id: str
    step_id: str
    subject: str
    approvers: list[str]
    revoked: bool = False
    # "PLAN KEY#STEP/do" for a write or undo: the plan slot this grant spent (a write reported on revoke closes it)
    slot: str = ""


# A revoked jti stays on the list a little past its exp, to cover targets' leeway.
REVOKED_MARGIN_S = 60


@dataclass
class ApprovalSeen:
    """The broker's one judgement of an approval's signature, made when it first arrived."""

    received_at: float
    workflow_id: str
    valid: bool
    reason: str
    groups: list[str]
    keep_until: float


@dataclass
class PlanAuthorization:
    """Recorded at the first write mint of (workflow, run, plan hash); later mints use it.

    ``minted`` maps "STEP/do" and "STEP/undo" to the activity that minted it, ``attempts`` to its
    attempt, ``grants`` to the grant it holds and ``minted_at`` to when it first minted. The same
    attempt of that activity reuses its grant; a later attempt of it may mint again (the target's
    idempotency key makes it one write) until a grant of the slot is reported to have written
    (``wrote``); nothing else may. ``expires_at`` is the plan's execution budget from its first write
    (each step's timeout, verification window and undo), not the runbook's whole execution window.
    """

    workflow_id: str
    run_id: str
    plan_hash: str
    created_at: float
    expires_at: float
    keep_until: float
    approved_steps: list[str]
    approvers: dict[str, list[str]]
    digests: list[str]
    requesters: list[str]
    minted: dict[str, str]
    attempts: dict[str, int] = field(default_factory=dict)
    grants: dict[str, str] = field(default_factory=dict)
    minted_at: dict[str, float] = field(default_factory=dict)
    wrote: list[str] = field(default_factory=list)
    # slot -> what its holder reported the target answered (scalars an undo needs), with ``wrote``.
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return plan_key(self.workflow_id, self.run_id, self.plan_hash)


def run_key(workflow_id: str, run_id: str) -> str:
    return f"{workflow_id}/{run_id}"


def plan_key(workflow_id: str, run_id: str, plan_hash: str) -> str:
    return f"{workflow_id}/{run_id}/{plan_hash}"


class DurableState:
    """Grants, nonces, approvals, plan authorizations and the freeze flag.

    Not thread-safe: the broker changes it under ``lock`` (its own lock, shared here), in memory only.
    :meth:`sync`, called once that lock is released, returns when the change is on disk. Every change is
    a line appended to one journal, so a flush is one append and one fsync however many requests and
    kinds of record it carries, and costs the same with ten records kept as with ten thousand
    (:class:`GroupCommit` shares it between concurrent requests; the lock is never held across it).
    """

    def __init__(self, directory: Path, lock: threading.Lock | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._lock = lock or threading.Lock()
        self._journal_file = directory / "state.jsonl"
        self._frozen_file = directory / "frozen"
        self.grants: dict[str, GrantRecord] = {}
        self.nonces: dict[str, dict[str, Any]] = {}
        self.approvals: dict[str, ApprovalSeen] = {}
        self.plans: dict[str, PlanAuthorization] = {}
        self.repaired: list[str] = []  # torn tails dropped at start, for the broker to put in its audit log
        self.on_storage_error: Callable[[str], None] | None = None  # told "journal" when a flush fails
        # "workflow/run" -> (when the workflow reported it closed, keep until)
        self.closed_runs: dict[str, dict[str, Any]] = {}
        # workflow id -> {"names": requesters any genuine receipt named, "keep_until": ...}
        self.requesters: dict[str, dict[str, Any]] = {}
        legacy = self._read_legacy()
        self._replay(self._journal_file)
        self.prune()
        self._pruned_at = time.monotonic()
        self._generation = 0  # changes made in memory; the commit knows how many are on disk
        self._commit = GroupCommit(self._flush)
        # Lines not yet appended; the journal starts as the live records only.
        self._journal_pending: list[str] = []
        self._journal_lines = self._live_count()
        _atomic_write(self._journal_file, self._journal_text())
        for path in legacy:  # carried into the journal, which is on disk: read once, never again
            path.unlink(missing_ok=True)

    # -- durability --

    def _record(self, entry: dict[str, Any]) -> None:
        """Under the lock: one change, in memory now, in the journal at the next flush."""
        self._journal_pending.append(json.dumps(entry, sort_keys=True) + "\n")
        self._generation += 1

    def sync(self) -> None:
        """Outside the lock: return once every change made so far is on disk."""
        self._commit.wait(self._generation)

    def _flush(self) -> int:
        with self._lock:
            if time.monotonic() - self._pruned_at >= 1.0:  # what is pruned is past use anyway: no hurry
                self.prune()
                self._pruned_at = time.monotonic()
            generation = self._generation
            rewrite, text = self._take_journal()
        if not rewrite and not text:
            return generation
        try:
            (_atomic_write if rewrite else _append)(self._journal_file, text)
        except BaseException as exc:
            if isinstance(exc, OSError) and self.on_storage_error is not None:
                self.on_storage_error("journal")
            with self._lock:
                # Not written, and a torn append could swallow the next line: the next flush rewrites the
                # journal whole, from memory, which holds every change (those since included).
                self._journal_lines = 1 << 62
            raise
        return generation

    def _take_journal(self) -> tuple[bool, str]:
        """Under the lock: (rewrite?, text). Appends until the journal holds many more lines than there are
        live records, then one rewrite with the live records."""
        pending, self._journal_pending = self._journal_pending, []
        live = self._live_count()
        if self._journal_lines + len(pending) > 2 * live + 1000:
            self._journal_lines = live
            return True, self._journal_text()
        self._journal_lines += len(pending)
        return False, "".join(pending)

    def _live_count(self) -> int:
        return (len(self.grants) + len(self.nonces) + len(self.approvals) + len(self.plans) + len(self.closed_runs)
                + len(self.requesters))

    def _journal_text(self) -> str:
        entries: list[dict[str, Any]] = [{"grant": vars(g)} for g in self.grants.values()]
        entries += [{"nonce": n, **v} for n, v in self.nonces.items()]
        entries += [{"approval": d, **vars(a)} for d, a in self.approvals.items()]
        entries += [{"plan": vars(p)} for p in self.plans.values()]
        entries += [{"closed_run": k, **v} for k, v in self.closed_runs.items()]
        entries += [{"requesters": w, **v} for w, v in self.requesters.items()]
        return "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)

    def _replay(self, path: Path) -> None:
        """Apply a journal's lines in order (a plan's later line replaces its earlier one). A torn last line
        (a write cut short) is dropped and described in :attr:`repaired`; the journal is rewritten whole
        from memory right after, without it."""
        if not path.exists():
            return
        text = path.read_text(errors="replace")
        if text and not text.endswith("\n"):
            torn = text[text.rfind("\n") + 1:]
            self.repaired.append(f"{path.name}: cut a torn last line of {len(torn.encode())} bytes (a write cut"
                                 " short by a full disk or a crash; never answered, so nothing it held was promised)")
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a write cut short by a crash: never answered, so nothing was promised
            if "grant" in entry:
                grant = GrantRecord(**entry["grant"])
                self.grants[grant.grant_id] = grant
            elif "revoked" in entry:
                if entry["revoked"] in self.grants:
                    self.grants[entry["revoked"]].revoked = True
            elif "nonce" in entry:
                self.nonces[entry["nonce"]] = {"digest": entry["digest"], "expires_at": entry["expires_at"]}
            elif "approval" in entry:
                digest = entry.pop("approval")
                self.approvals.setdefault(digest, ApprovalSeen(**entry))
            elif "plan" in entry:
                plan = PlanAuthorization(**entry["plan"])
                self.plans[plan.key] = plan
            elif "closed_run" in entry:
                self.closed_runs[entry.pop("closed_run")] = entry
            elif "requesters" in entry:
                self.requesters[entry.pop("requesters")] = entry

    def _read_legacy(self) -> list[Path]:
        """The files of earlier versions, folded into memory; returns those found."""
        found: list[Path] = []
        old_grants = self.dir / "grants.json"
        if old_grants.exists():
            self.grants.update({g: GrantRecord(**r) for g, r in json.loads(old_grants.read_text()).items()})
            found.append(old_grants)
        if (self.dir / "grants.jsonl").exists():
            self._replay(self.dir / "grants.jsonl")
            found.append(self.dir / "grants.jsonl")
        for name, load in (
            ("nonces.json", lambda data: self.nonces.update(data)),
            ("approvals.json", lambda data: self.approvals.update({d: ApprovalSeen(**r) for d, r in data.items()})),
            ("plans.json", lambda data: self.plans.update({k: PlanAuthorization(**r) for k, r in data.items()})),
        ):
            if (self.dir / name).exists():
                load(json.loads((self.dir / name).read_text()))
                found.append(self.dir / name)
        return found

    # -- freeze --

    @property
    def frozen(self) -> bool:
        return self._frozen_file.exists()

    def set_frozen(self, frozen: bool, reason: str = "", by: str = "") -> None:
        if frozen:
            self._frozen_file.write_text(json.dumps({"at": time.time(), "reason": reason, "by": by}))
        elif self._frozen_file.exists():
            self._frozen_file.unlink()

    def frozen_at(self) -> float | None:
        """When the kill switch was pulled (None: not frozen, or not readable)."""
        try:
            return float(json.loads(self._frozen_file.read_text())["at"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def extend_plans(self, *, since: float, by: float) -> None:
        """Give the plan authorizations live at ``since`` ``by`` seconds more: the time a freeze held them."""
        for plan in list(self.plans.values()):
            if plan.expires_at <= since or by <= 0:
                continue
            plan.expires_at += by
            plan.keep_until += by
            plan.minted_at = {slot: at + by for slot, at in plan.minted_at.items()}
            self.save_plan(plan)

    def frozen_by(self) -> str:
        """"credentials frozen by NAME at T: REASON", what a held incident shows."""
        try:
            data = json.loads(self._frozen_file.read_text())
        except (OSError, ValueError):
            return "credentials frozen (kill switch)"
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(data.get("at", 0))))
        return f"credentials frozen by {data.get('by') or 'someone'} at {at}: {data.get('reason') or 'no reason given'}"

    # -- grants --

    def prune(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.grants = {g: r for g, r in self.grants.items() if r.exp + REVOKED_MARGIN_S > now}
        self.nonces = {n: v for n, v in self.nonces.items() if v["expires_at"] > now}
        # Kept until no approval they hold could authorize anything again (see rules.authorize_write).
        self.approvals = {d: a for d, a in self.approvals.items() if a.keep_until > now}
        self.plans = {k: p for k, p in self.plans.items() if p.keep_until > now}
        self.closed_runs = {k: v for k, v in self.closed_runs.items() if v["keep_until"] > now}
        self.requesters = {k: v for k, v in self.requesters.items() if v["keep_until"] > now}

    def add_grant(self, grant: GrantRecord) -> None:
        self.grants[grant.grant_id] = grant
        self._record({"grant": vars(grant)})

    def revoke(self, grant_id: str) -> GrantRecord | None:
        grant = self.grants.get(grant_id)
        if grant is None:
            return None
        grant.revoked = True
        self._record({"revoked": grant_id})
        return grant

    def live_grants(self, now: float | None = None) -> list[GrantRecord]:
        now = time.time() if now is None else now
        return [g for g in self.grants.values() if not g.revoked and g.exp > now]

    def revoked_jtis(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        return sorted(g.grant_id for g in self.grants.values() if g.revoked and g.exp + REVOKED_MARGIN_S > now)

    # -- approval nonces --

    def nonce_conflict(self, nonce: str, digest: str) -> bool:
        """A nonce already carried by a *different* approval."""
        seen = self.nonces.get(nonce)
        return seen is not None and seen["digest"] != digest

    def remember_nonces(self, entries: list[tuple[str, str, float]]) -> None:
        """(nonce, approval digest, approval expiry): kept until the approval expires,
        after which policy refuses it anyway."""
        for nonce, digest, expires_at in entries:
            if nonce not in self.nonces:
                self.nonces[nonce] = {"digest": digest, "expires_at": expires_at}
                self._record({"nonce": nonce, **self.nonces[nonce]})

    # -- approvals judged once, plan authorizations --

    def approval_seen(self, digest: str) -> ApprovalSeen | None:
        return self.approvals.get(digest)

    def remember_approval(self, digest: str, seen: ApprovalSeen) -> ApprovalSeen:
        """The first judgement stands: a second arrival of the same approval changes nothing."""
        if digest not in self.approvals:
            self.approvals[digest] = seen
            self._record({"approval": digest, **vars(seen)})
        return self.approvals[digest]

    def plan(self, key: str) -> PlanAuthorization | None:
        return self.plans.get(key)

    def save_plan(self, plan: PlanAuthorization) -> None:
        self.plans[plan.key] = plan
        self._record({"plan": vars(plan)})  # the whole record again: on replay the last line stands

    def grant_slot(self, grant_id: str) -> tuple[PlanAuthorization, str] | None:
        """The plan authorization and slot ("s1/do") a write or undo grant spent, if it was one."""
        grant = self.grants.get(grant_id)
        if grant is None or not grant.slot:
            return None
        key, _, slot = grant.slot.rpartition("#")
        plan = self.plans.get(key)
        return None if plan is None else (plan, slot)

    # -- runs the workflow reported closed --

    def close_run(self, workflow_id: str, run_id: str, *, at: float, keep_until: float) -> bool:
        """Record a closed run; False if it was already known closed."""
        key = run_key(workflow_id, run_id)
        if key in self.closed_runs:
            return False
        self.closed_runs[key] = {"closed_at": at, "keep_until": keep_until}
        self._record({"closed_run": key, **self.closed_runs[key]})
        return True

    def run_closed_at(self, workflow_id: str, run_id: str) -> float | None:
        seen = self.closed_runs.get(run_key(workflow_id, run_id))
        return None if seen is None else float(seen["closed_at"])

    # -- who raised each incident, from every genuine receipt shown --

    def known_requesters(self, workflow_id: str) -> list[str]:
        return list(self.requesters.get(workflow_id, {}).get("names", []))

    def remember_requesters(self, workflow_id: str, names: list[str], keep_until: float) -> None:
        known = self.requesters.get(workflow_id)
        merged = sorted(set(names) | set(known["names"] if known else []))
        until = max(keep_until, known["keep_until"] if known else 0.0)
        if known is not None and known["names"] == merged and known["keep_until"] >= until:
            return
        self.requesters[workflow_id] = {"names": merged, "keep_until": until}
        self._record({"requesters": workflow_id, **self.requesters[workflow_id]})
