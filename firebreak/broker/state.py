"""The broker's durable state under ``STATE_DIR/broker/``.

```
signing-key.pem   Ed25519 key for target tokens (0600, created on first start)
signing-keys.json public halves of rotated-out keys, each published until its overlap ends (signing_keys.py)
agent-token       the worker's bootstrap credential (0600) unless FIREBREAK_BROKER_TOKEN
agent-credential.json  when it was issued; SHA-256 and overlap end of rotated-out ones (agent_credential.py)
admin-token       for freeze/thaw (0600) unless FIREBREAK_BROKER_ADMIN_TOKEN
audit.jsonl       hash-chained audit log
frozen            present while the kill switch is on (survives restarts)
grants.jsonl      grants (jti, expiry, revoked?) so a freeze after a restart still revokes: one line
                  appended per mint and per revocation, rewritten with the live ones when it grows
                  (grants.json, the earlier form, is read once and replaced)
nonces.json       approval nonces seen, with the digest of the approval that carried each
approvals.json    each approval's verdict and the instant the broker first saw it (judged once)
plans.json        plan authorizations per (workflow, run, plan hash): who approved which
                  steps, until when, and which step and undo each activity minted (once)
```

Nothing here holds a token: grants are known by their id (the jti).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firebreak import signing
from firebreak.broker.group_commit import GroupCommit


def broker_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "broker"


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    _write_durably(tmp, text, os.O_TRUNC)
    os.replace(tmp, path)


def _append(path: Path, text: str) -> None:
    _write_durably(path, text, os.O_APPEND)


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

    ``minted`` maps "STEP/do" and "STEP/undo" to the activity that minted it: a retry of
    that activity may mint again (same idempotency key), nothing else may.
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

    @property
    def key(self) -> str:
        return plan_key(self.workflow_id, self.run_id, self.plan_hash)


def plan_key(workflow_id: str, run_id: str, plan_hash: str) -> str:
    return f"{workflow_id}/{run_id}/{plan_hash}"


class DurableState:
    """Grants, nonces, approvals, plan authorizations and the freeze flag.

    Not thread-safe: the broker changes it under ``lock`` (its own lock, shared here), in memory only.
    :meth:`sync`, called once that lock is released, returns when the change is on disk: the files
    changed since the last flush are written together (:class:`GroupCommit`), so concurrent requests
    share one write and the lock is never held across one.
    """

    def __init__(self, directory: Path, lock: threading.Lock | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._lock = lock or threading.Lock()
        self._legacy_grants_file = directory / "grants.json"
        self._grants_file = directory / "grants.jsonl"
        self._nonces_file = directory / "nonces.json"
        self._frozen_file = directory / "frozen"
        self._approvals_file = directory / "approvals.json"
        self._plans_file = directory / "plans.json"
        self.grants: dict[str, GrantRecord] = {}
        self.nonces: dict[str, dict[str, Any]] = {}
        self.approvals: dict[str, ApprovalSeen] = {}
        self.plans: dict[str, PlanAuthorization] = {}
        self.grants = self._read_grants()
        if self._nonces_file.exists():
            self.nonces = json.loads(self._nonces_file.read_text())
        if self._approvals_file.exists():
            self.approvals = {d: ApprovalSeen(**r) for d, r in json.loads(self._approvals_file.read_text()).items()}
        if self._plans_file.exists():
            self.plans = {k: PlanAuthorization(**r) for k, r in json.loads(self._plans_file.read_text()).items()}
        self.prune()
        self._pruned_at = time.monotonic()
        self._generation = 0  # changes made in memory; the commit knows how many are on disk
        self._dirty: set[Path] = set()
        self._commit = GroupCommit(self._flush)
        # Grant changes not yet appended; the journal starts as the live grants only.
        self._journal_pending: list[str] = []
        self._journal_lines = len(self.grants)
        _atomic_write(self._grants_file, self._journal_text())
        self._legacy_grants_file.unlink(missing_ok=True)

    # -- durability --

    def _changed(self, path: Path) -> None:
        self._generation += 1
        self._dirty.add(path)

    def sync(self) -> None:
        """Outside the lock: return once every change made so far is on disk."""
        self._commit.wait(self._generation)

    def _flush(self) -> int:
        with self._lock:
            if time.monotonic() - self._pruned_at >= 1.0:  # what is pruned is past use anyway: no hurry
                self.prune()
                self._pruned_at = time.monotonic()
            generation, dirty, self._dirty = self._generation, self._dirty, set()
            texts = {path: json.dumps(self._contents(path), sort_keys=True) for path in dirty - {self._grants_file}}
            journal = self._take_journal() if self._grants_file in dirty else None
        try:
            if journal is not None:
                rewrite, text = journal
                (_atomic_write if rewrite else _append)(self._grants_file, text)
            for path, text in texts.items():
                _atomic_write(path, text)
        except BaseException:
            with self._lock:
                self._dirty |= dirty  # not written: the next flush writes them (with whatever changed since)
                if journal is not None:
                    # A torn append could swallow the next line: the next flush rewrites the journal whole.
                    self._journal_lines = 1 << 62
            raise
        return generation

    def _take_journal(self) -> tuple[bool, str]:
        """Under the lock: (rewrite?, text). Appends until the journal holds many more lines than there are
        grants (each grant is a line, its revocation another), then one rewrite with the live grants."""
        pending, self._journal_pending = self._journal_pending, []
        if self._journal_lines + len(pending) > 2 * len(self.grants) + 1000:
            self._journal_lines = len(self.grants)
            return True, self._journal_text()
        self._journal_lines += len(pending)
        return False, "".join(pending)

    def _journal_text(self) -> str:
        return "".join(json.dumps({"grant": vars(g)}, sort_keys=True) + "\n" for g in self.grants.values())

    def _read_grants(self) -> dict[str, GrantRecord]:
        grants: dict[str, GrantRecord] = {}
        if self._legacy_grants_file.exists():
            grants = {g: GrantRecord(**r) for g, r in json.loads(self._legacy_grants_file.read_text()).items()}
        if self._grants_file.exists():
            for line in self._grants_file.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a write cut short by a crash: never answered, so nothing was promised
                if "grant" in entry:
                    grant = GrantRecord(**entry["grant"])
                    grants[grant.grant_id] = grant
                elif entry.get("revoked") in grants:
                    grants[entry["revoked"]].revoked = True
        return grants

    def _contents(self, path: Path) -> Any:
        if path == self._nonces_file:
            return self.nonces
        if path == self._approvals_file:
            return {d: vars(a) for d, a in self.approvals.items()}
        return {k: vars(p) for k, p in self.plans.items()}

    # -- freeze --

    @property
    def frozen(self) -> bool:
        return self._frozen_file.exists()

    def set_frozen(self, frozen: bool, reason: str = "", by: str = "") -> None:
        if frozen:
            self._frozen_file.write_text(json.dumps({"at": time.time(), "reason": reason, "by": by}))
        elif self._frozen_file.exists():
            self._frozen_file.unlink()

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

    def add_grant(self, grant: GrantRecord) -> None:
        self.grants[grant.grant_id] = grant
        self._journal_pending.append(json.dumps({"grant": vars(grant)}, sort_keys=True) + "\n")
        self._changed(self._grants_file)

    def revoke(self, grant_id: str) -> GrantRecord | None:
        grant = self.grants.get(grant_id)
        if grant is None:
            return None
        grant.revoked = True
        self._journal_pending.append(json.dumps({"revoked": grant_id}) + "\n")
        self._changed(self._grants_file)
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
                self._changed(self._nonces_file)

    # -- approvals judged once, plan authorizations --

    def approval_seen(self, digest: str) -> ApprovalSeen | None:
        return self.approvals.get(digest)

    def remember_approval(self, digest: str, seen: ApprovalSeen) -> ApprovalSeen:
        """The first judgement stands: a second arrival of the same approval changes nothing."""
        if digest not in self.approvals:
            self.approvals[digest] = seen
            self._changed(self._approvals_file)
        return self.approvals[digest]

    def plan(self, key: str) -> PlanAuthorization | None:
        return self.plans.get(key)

    def save_plan(self, plan: PlanAuthorization) -> None:
        self.plans[plan.key] = plan
        self._changed(self._plans_file)
