"""Signed checkpoints of the audit log's head: what makes a truncated or rewritten log detectable.

The hash chain alone proves only that the records agree with each other: cutting
off the tail, or rewriting the whole log and re-hashing it, leaves a chain that
verifies. A checkpoint is the broker's Ed25519 signature (the key that signs
tokens, which an attacker of the log does not hold) over one point of the chain:

```
audit.checkpoints.jsonl   (beside audit.jsonl, 0600, append-only; one JSON object a line)
{"at": "2025-...Z", "every": 16, "every_s": 60.0, "hash": "<record hash at seq>", "kid": "<key id>",
 "reason": "start" | "every" | "time" | "shutdown" | "rekey", "seq": 42, "sig": "<base64url Ed25519 signature>"}
```

``sig`` covers :func:`signing_payload`: the canonical JSON of every other field
plus ``"type": "firebreak.audit.checkpoint"``. The type keeps a checkpoint
signature from ever meaning anything else made with the same key (a JWT's
signing input is base64url text and can never start with ``{``). ``seq`` 0 with
the genesis hash is the checkpoint of an empty log. ``every`` is the interval the
writing broker promised, so a verifier can tell how many unsigned records may
legitimately follow the last checkpoint. ``every_s`` (absent from checkpoints of earlier versions)
is the time the writing broker promised: it signs the head at least that often while it runs, even
with nothing new ("time"), so the newest checkpoint of a broker that did not shut down is never much
older than that, and no unsigned record is much older than the first unsigned one.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firebreak import signing
from firebreak.broker import storage
from firebreak.contracts import canonical_json

TYPE = "firebreak.audit.checkpoint"
DEFAULT_EVERY = 16
EVERY_ENV = "FIREBREAK_AUDIT_CHECKPOINT_EVERY"
DEFAULT_SECONDS = 60.0
SECONDS_ENV = "FIREBREAK_AUDIT_CHECKPOINT_SECONDS"
# rekey: the last one signed before a key rotation; time: checkpoint_seconds passed since the last one.
Reason = Literal["start", "every", "time", "shutdown", "rekey"]
_FIELDS = frozenset({"seq", "hash", "at", "kid", "every", "reason", "sig"})
_OPTIONAL = frozenset({"every_s"})


def checkpoints_path(audit_path: str | Path) -> Path:
    """``audit.jsonl`` -> ``audit.checkpoints.jsonl``, in the same directory."""
    audit_path = Path(audit_path)
    return audit_path.with_name(f"{audit_path.stem}.checkpoints.jsonl")


def every_from_env(default: int = DEFAULT_EVERY) -> int:
    raw = os.environ.get(EVERY_ENV)
    if not raw:
        return default
    try:
        every = int(raw)
    except ValueError:
        raise ValueError(f"{EVERY_ENV}={raw!r} is not a whole number of records") from None
    if every < 1:
        raise ValueError(f"{EVERY_ENV} must be at least 1 (got {every})")
    return every


def seconds_from_env(default: float = DEFAULT_SECONDS) -> float:
    raw = os.environ.get(SECONDS_ENV)
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{SECONDS_ENV}={raw!r} is not a number of seconds") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{SECONDS_ENV} must be a number of seconds above 0 (got {raw!r})")
    return seconds


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    at: str
    kid: str
    every: int
    reason: str
    sig: str = ""
    every_s: float | None = None  # None in checkpoints from before time-anchored checkpoints

    def _fields(self) -> dict[str, object]:
        # An earlier version's checkpoint has no every_s: its signature covers none.
        return {k: v for k, v in asdict(self).items() if not (k == "every_s" and v is None)}

    def signing_payload(self) -> bytes:
        body = {k: v for k, v in self._fields().items() if k != "sig"}
        return canonical_json({**body, "type": TYPE})

    def to_line(self) -> bytes:
        return canonical_json(self._fields()) + b"\n"


class MalformedCheckpoint(ValueError):
    pass


def parse(raw: bytes | str) -> Checkpoint:
    """One line of the checkpoints file; :class:`MalformedCheckpoint` says what is wrong."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise MalformedCheckpoint("not valid JSON") from None
    if not isinstance(data, dict) or not _FIELDS <= set(data) <= _FIELDS | _OPTIONAL:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise MalformedCheckpoint(f"wrong fields (expected {sorted(_FIELDS)}, optionally every_s; got {got})")
    if "every_s" in data:
        every_s = data["every_s"]
        if not isinstance(every_s, int | float) or isinstance(every_s, bool) or not 0 < every_s < float("inf"):
            raise MalformedCheckpoint("every_s is not a number of seconds above 0")
    # bool is an int in Python; a true/false seq is still malformed.
    for name in ("seq", "every"):
        if not isinstance(data[name], int) or isinstance(data[name], bool):
            raise MalformedCheckpoint(f"{name} is not an integer")
    for name in ("hash", "at", "kid", "reason", "sig"):
        if not isinstance(data[name], str):
            raise MalformedCheckpoint(f"{name} is not a string")
    if data["seq"] < 0 or data["every"] < 1:
        raise MalformedCheckpoint(f"seq {data['seq']} / every {data['every']} out of range")
    return Checkpoint(**data)


def sign(key: Ed25519PrivateKey, kid: str, *, seq: int, hash: str, every: int, reason: Reason,
         every_s: float | None = None) -> Checkpoint:
    at = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    unsigned = Checkpoint(seq=seq, hash=hash, at=at, kid=kid, every=every, reason=reason, every_s=every_s)
    signature = key.sign(unsigned.signing_payload())
    return Checkpoint(**{**asdict(unsigned), "sig": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")})


def signature_problem(checkpoint: Checkpoint, keys: Mapping[str, Ed25519PublicKey]) -> str | None:
    """None if ``sig`` verifies with the key named by ``kid``; else why not."""
    key = keys.get(checkpoint.kid)
    if key is None:
        return (
            f"signed by key kid={checkpoint.kid[:64]!r}, which is not among the broker keys given"
            " (forged, or signed by an earlier broker key)"
        )
    try:
        signature = base64.urlsafe_b64decode(checkpoint.sig + "=" * (-len(checkpoint.sig) % 4))
    except (binascii.Error, ValueError):
        return "signature is not base64url"
    try:
        key.verify(signature, checkpoint.signing_payload())
    except InvalidSignature:
        return "signature does not verify with the broker's key (forged, or the checkpoint was altered)"
    return None


def read(path: str | Path) -> list[tuple[int, Checkpoint | MalformedCheckpoint]]:
    """(line number, checkpoint or why the line is not one) for every non-blank line; [] if absent."""
    path = Path(path)
    if not path.exists():
        return []
    out: list[tuple[int, Checkpoint | MalformedCheckpoint]] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                out.append((lineno, parse(raw)))
            except MalformedCheckpoint as exc:
                out.append((lineno, exc))
    return out


def append(path: str | Path, checkpoint: Checkpoint) -> None:
    """Append one line, 0600 from creation, and fsync: a checkpoint that is not on disk vouches for nothing."""
    # Whole or an error: a line cut short is cut off again (storage.append_bytes).
    storage.append_bytes(Path(path), checkpoint.to_line(), fsync=True)


def last_valid(path: str | Path, public_key: Ed25519PublicKey, kid: str) -> Checkpoint | None:
    """The newest checkpoint this key really signed (the writer's resume point), or None."""
    for _, item in reversed(read(path)):
        if isinstance(item, Checkpoint) and signature_problem(item, {kid: public_key}) is None:
            return item
    return None


def public_keys(
    given: Ed25519PublicKey | Ed25519PrivateKey | Mapping[str, Ed25519PublicKey],
) -> dict[str, Ed25519PublicKey]:
    """kid -> key, from one key (its kid derived as the broker derives it) or a mapping (e.g. a JWKS)."""
    if isinstance(given, Mapping):
        return dict(given)
    public = given.public_key() if isinstance(given, Ed25519PrivateKey) else given
    return {signing.key_id(public): public}
