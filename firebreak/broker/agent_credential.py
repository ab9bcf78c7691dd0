"""The worker's bootstrap credential: check it, rotate it with an overlap, and say how old it is.

```
agent-token             the current credential (0600); workers read it (or FIREBREAK_BROKER_TOKEN)
agent-credential.json   when it was issued, and the SHA-256 of each earlier one with the end of its
                        overlap, who rotated it and why (never a credential itself)
```

During an overlap both the old and the new credential are accepted, so workers can pick the new one
up without a gap; after it the old one is refused (401) and the broker audits the attempt, naming the
rotation. Earlier credentials are remembered for :data:`REMEMBER_S` so a late use reads as "retired",
not as an unknown bearer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from firebreak.broker.state import _atomic_json, read_or_create_secret

REMEMBER_S = 30 * 86400


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass
class RetiredCredential:
    sha256: str
    rotated_at: float
    valid_until: float  # the end of the overlap
    by: str
    reason: str


@dataclass
class CredentialCheck:
    accepted: bool
    previous: bool = False  # accepted as an earlier credential, inside its overlap
    refusal: str | None = None  # why a known but retired credential is refused


@dataclass
class _Meta:
    issued_at: float
    retired: list[RetiredCredential] = field(default_factory=list)


class AgentCredential:
    """Not thread-safe on its own: the broker calls it under its lock."""

    def __init__(self, directory: Path, *, env_var: str, given: str | None = None) -> None:
        self.path = directory / "agent-token"
        self.meta_path = directory / "agent-credential.json"
        # Only a credential the broker created in its own file can be rotated by the broker.
        self.source = "given" if given else "environment" if os.environ.get(env_var) else "file"
        self.env_var = env_var
        self.token = read_or_create_secret(self.path, env_var, given)
        self._meta = self._load()

    def _load(self) -> _Meta:
        if self.meta_path.exists():
            data = json.loads(self.meta_path.read_text())
            return _Meta(issued_at=float(data["issued_at"]),
                         retired=[RetiredCredential(**r) for r in data.get("retired", [])])
        try:  # a credential from before rotation existed: as old as its file
            issued = self.path.stat().st_mtime if self.source == "file" else time.time()
        except OSError:
            issued = time.time()
        return _Meta(issued_at=issued)

    @property
    def issued_at(self) -> float:
        return self._meta.issued_at

    def age_s(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self._meta.issued_at)

    def overlap_remaining_s(self, now: float | None = None) -> float:
        """How long an earlier credential is still accepted (0: only the current one is)."""
        now = time.time() if now is None else now
        return max([0.0, *(r.valid_until - now for r in self._meta.retired)])

    @staticmethod
    def compare(presented: str, expected: str) -> CredentialCheck:
        """A plain bearer secret (the admin token): constant-time compare, no rotation."""
        return CredentialCheck(accepted=hmac.compare_digest(presented.encode(), expected.encode()))

    def check(self, presented: str, now: float | None = None) -> CredentialCheck:
        now = time.time() if now is None else now
        if hmac.compare_digest(presented.encode(), self.token.encode()):
            return CredentialCheck(accepted=True)
        digest = _sha256(presented)
        for old in self._meta.retired:
            if hmac.compare_digest(digest, old.sha256):
                if now < old.valid_until:
                    return CredentialCheck(accepted=True, previous=True)
                return CredentialCheck(accepted=False, refusal=(
                    f"bootstrap credential retired: rotated by {old.by or 'someone'} at {_iso(old.rotated_at)}"
                    f" ({old.reason or 'no reason given'}), overlap ended at {_iso(old.valid_until)}"))
        return CredentialCheck(accepted=False)

    def rotate(self, *, overlap_s: float, by: str, reason: str, now: float | None = None) -> RetiredCredential:
        """A new credential in ``agent-token``; the old one is accepted for ``overlap_s`` more."""
        if self.source != "file":
            raise ValueError(f"the agent credential is set in {self.env_var if self.source == 'environment' else 'the broker configuration'}, "
                             "not in a file the broker owns: rotate it where it is set")
        if overlap_s < 0:
            raise ValueError("overlap must not be negative")
        now = time.time() if now is None else now
        new = secrets.token_urlsafe(32)
        old = RetiredCredential(sha256=_sha256(self.token), rotated_at=now, valid_until=now + overlap_s,
                                by=by, reason=reason)
        tmp = self.path.with_name(self.path.name + ".new")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, new.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        # Record the old one first: a crash before the swap leaves the old credential current, still valid.
        retired = [r for r in self._meta.retired if r.valid_until + REMEMBER_S > now] + [old]
        meta = _Meta(issued_at=now, retired=retired)
        _atomic_json(self.meta_path, {"issued_at": meta.issued_at, "retired": [asdict(r) for r in retired]})
        os.replace(tmp, self.path)
        self.token, self._meta = new, meta
        return old


def issued_at(directory: Path) -> float | None:
    """When the credential in ``directory`` was issued or last rotated, read-only (None: no credential there)."""
    meta = directory / "agent-credential.json"
    try:
        return float(json.loads(meta.read_text())["issued_at"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        return (directory / "agent-token").stat().st_mtime
    except OSError:
        return None
