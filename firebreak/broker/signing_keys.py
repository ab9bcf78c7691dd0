"""The broker's token-signing key and its rotation.

```
signing-key.pem    the current private key (0600); the only one that signs
signing-keys.json  when the current key was made, and the public half of every key rotated out,
                   with the end of its overlap (until then the JWKS still publishes it)
```

A rotation makes a new key and destroys the old private key at once (nothing can sign with it
again); its public half stays in the JWKS, marked with ``exp``, for the overlap: by default the
longest token TTL plus the largest target leeway (:data:`firebreak.signing.KEY_OVERLAP_S`), so every
token it signed expires first. Targets refuse its tokens after ``exp`` whether or not they can
reach the broker. The public halves are kept for ``firebreak audit verify``: audit checkpoints
signed before a rotation still verify.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from firebreak import signing
from firebreak.broker.state import _atomic_json, load_or_create_signing_key


@dataclass
class RetiredKey:
    kid: str
    x: str  # the raw public key, base64url (as in a JWK)
    retired_at: float
    published_until: float

    @property
    def public_key(self) -> signing.Ed25519PublicKey:
        return signing.Ed25519PublicKey.from_public_bytes(signing._b64url_decode(self.x))


def _history(path: Path) -> tuple[float | None, list[RetiredKey]]:
    if not path.exists():
        return None, []
    data = json.loads(path.read_text())
    return data.get("current_since"), [RetiredKey(**k) for k in data.get("retired", [])]


def retired_public_keys(directory: Path) -> dict[str, signing.Ed25519PublicKey]:
    """kid -> public key of every key the broker in ``directory`` rotated out (for audit verify)."""
    return {k.kid: k.public_key for k in _history(directory / "signing-keys.json")[1]}


class SigningKeys:
    """Not thread-safe on its own: the broker rotates under its lock."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "signing-key.pem"
        self.history_path = directory / "signing-keys.json"
        self.key = load_or_create_signing_key(self.path)
        self.kid = signing.key_id(self.key)
        since, self.retired = _history(self.history_path)
        self.current_since = since if since is not None else self.path.stat().st_mtime

    def age_s(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.current_since)

    def published(self, now: float | None = None) -> list[RetiredKey]:
        now = time.time() if now is None else now
        return [k for k in self.retired if k.published_until > now]

    def jwks(self, now: float | None = None) -> dict[str, Any]:
        keys = [signing.public_jwk(self.key, self.kid)]
        for old in self.published(now):
            keys.append({**signing.public_jwk(old.public_key, old.kid), "exp": int(old.published_until)})
        return {"keys": keys}

    def rotate(self, overlap_s: float = signing.KEY_OVERLAP_S, now: float | None = None) -> RetiredKey:
        if overlap_s < 0:
            raise ValueError("overlap must not be negative")
        now = time.time() if now is None else now
        new = signing.generate_key()
        tmp = self.path.with_name(self.path.name + ".new")
        tmp.unlink(missing_ok=True)
        signing.write_private_key(tmp, new)
        old = RetiredKey(kid=self.kid, x=signing.public_jwk(self.key)["x"], retired_at=now,
                         published_until=now + overlap_s)
        retired = [*self.retired, old]
        # The old public half is on disk before its private key is replaced: nothing it signed becomes unverifiable.
        _atomic_json(self.history_path, {"current_since": now, "retired": [asdict(k) for k in retired]})
        os.replace(tmp, self.path)
        self.key, self.kid, self.retired, self.current_since = new, signing.key_id(new), retired, now
        return old
