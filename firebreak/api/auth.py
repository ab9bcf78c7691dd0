"""Who may send alerts: bearer tokens and HMAC signatures over the raw body.

Every comparison is constant-time (``hmac.compare_digest``). A credential that
is presented and fails is a refusal, never skipped in favour of another one.
Nothing here logs or returns a secret; error messages name the header only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

SECRETS_FILE = "secrets.json"


class AuthError(Exception):
    """The request is not authentic: answered 401, the message names what failed, never a value.

    ``authentic``: the body itself was signed by a holder of the secret, but the request still
    cannot be accepted (a Grafana request without its signed timestamp could be a replay). Such a
    refusal is worth recording with the alerts it carried; an unauthenticated one is not.
    """

    def __init__(self, message: str, field: str, *, authentic: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.authentic = authentic


@dataclass(frozen=True)
class GeneratedSecrets:
    intake_token: str
    pagerduty_secret: str
    grafana_secret: str


def load_or_create_secrets(api_dir: Path) -> GeneratedSecrets:
    """The embedded stack's secrets: created once, then read back (file mode 0600, dir 0700)."""
    path = api_dir / SECRETS_FILE
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        return GeneratedSecrets(data["intake_token"], data["pagerduty_secret"], data["grafana_secret"])
    api_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(api_dir, 0o700)
    created = GeneratedSecrets(
        intake_token=secrets.token_urlsafe(32),
        pagerduty_secret=secrets.token_urlsafe(48),
        grafana_secret=secrets.token_urlsafe(32),
    )
    # O_EXCL: two processes starting at once must not each write their own secrets.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(created.__dict__, out)
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(tmp, path)  # fails if another process won the race; then use theirs
    except FileExistsError:
        os.unlink(tmp)
        return load_or_create_secrets(api_dir)
    os.unlink(tmp)
    return created


def _values(secrets_: Sequence[SecretStr]) -> list[bytes]:
    return [s.get_secret_value().encode("utf-8") for s in secrets_ if s.get_secret_value()]


def check_bearer(authorization: str | None, tokens: Sequence[SecretStr]) -> None:
    """``Authorization: Bearer <token>`` must match one configured token."""
    if not authorization:
        raise AuthError("missing Authorization header (Bearer token)", "headers.authorization")
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise AuthError("Authorization must be 'Bearer <token>'", "headers.authorization")
    candidate = presented.strip().encode("utf-8")
    # Compare against every token, without stopping early, so timing says nothing about which one.
    matched = False
    for token in _values(tokens):
        matched |= hmac.compare_digest(candidate, token)
    if not matched:
        raise AuthError("bearer token not accepted", "headers.authorization")


def _hmac_hex(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def check_pagerduty_signature(header: str | None, body: bytes, secrets_: Sequence[SecretStr]) -> None:
    """PagerDuty V3: ``X-PagerDuty-Signature: v1=<hex>[,v1=<hex>...]`` over the raw body.

    Only ``v1=`` entries count (other versions and non-hex entries are ignored);
    one match with any configured secret is enough (secret rotation on either side).
    """
    if not header:
        raise AuthError("missing X-PagerDuty-Signature header", "headers.x-pagerduty-signature")
    candidates: list[bytes] = []
    for entry in header.split(","):
        entry = entry.strip()
        if not entry.startswith("v1="):
            continue
        value = entry[3:].lower()
        if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
            candidates.append(value.encode("ascii"))
    if not candidates:
        raise AuthError("X-PagerDuty-Signature has no v1= signature", "headers.x-pagerduty-signature")
    matched = False
    for secret in _values(secrets_):
        expected = _hmac_hex(secret, body).encode("ascii")
        for candidate in candidates:
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise AuthError("X-PagerDuty-Signature does not match the body", "headers.x-pagerduty-signature")


def pagerduty_signature(secret: str, body: bytes) -> str:
    """The header value PagerDuty would send: for tests, the bench and local senders."""
    return "v1=" + _hmac_hex(secret.encode("utf-8"), body)


def _grafana_matches(candidate: bytes, message: bytes, secrets_: Sequence[SecretStr]) -> bool:
    matched = False
    for secret in _values(secrets_):
        matched |= hmac.compare_digest(_hmac_hex(secret, message).encode("ascii"), candidate)
    return matched


def check_grafana_signature(
    signature: str | None,
    timestamp: str | None,
    body: bytes,
    secrets_: Sequence[SecretStr],
    *,
    max_skew_s: float | None,
    now: float | None = None,
    timestamp_header: str = "X-Grafana-Alerting-Timestamp",
) -> int:
    """Grafana: hex HMAC-SHA256 of ``timestamp:body``; returns the signed Unix time.

    The timestamp is required: a signature over the body alone never expires, so anyone who saw
    one request could send it again for ever. Such a request is refused even when its signature
    is good (then ``authentic`` is set, so the refusal is recorded with its alerts).
    """
    ts_field = f"headers.{timestamp_header.lower()}"
    if not signature:
        raise AuthError("missing X-Grafana-Alerting-Signature header: a request without a signed timestamp could "
                        "be a replay", "headers.x-grafana-alerting-signature")
    candidate = signature.strip().lower().encode("ascii", errors="replace")
    if timestamp is None:
        authentic = _grafana_matches(candidate, body, secrets_)
        raise AuthError(f"missing {timestamp_header} header: set the contact point's timestamp header, "
                        "so that a signed request cannot be replayed", ts_field, authentic=authentic)
    stamp = timestamp.strip()
    if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 12:
        raise AuthError(f"{timestamp_header} is not a Unix time", ts_field)
    sent_at = int(stamp)
    if max_skew_s is not None and abs((now if now is not None else time.time()) - sent_at) > max_skew_s:
        # A replayed request keeps its old timestamp: the signature covers it, so it cannot be refreshed.
        raise AuthError("signed timestamp is too old or in the future", ts_field)
    if not _grafana_matches(candidate, stamp.encode("ascii") + b":" + body, secrets_):
        raise AuthError(
            "X-Grafana-Alerting-Signature does not match the timestamp and body", "headers.x-grafana-alerting-signature"
        )
    return sent_at


def grafana_signature(secret: str, body: bytes, timestamp: str | None = None) -> str:
    message = body if timestamp is None else timestamp.encode("ascii") + b":" + body
    return _hmac_hex(secret.encode("utf-8"), message)
