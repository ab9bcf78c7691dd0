"""Keys, approval signatures, and target credentials (mint and verify).

All of Firebreak's cryptography lives here, so that it can be read in one
sitting. Two kinds of signature:

* **Approvals**: an approver's Ed25519 key signs the canonical bytes of an
  :class:`~firebreak.contracts.Approval` (``signing_payload()``). Anyone with
  the roster can check them; policy (quorum, expiry, plan hash) is elsewhere.
* **Tokens**: the credential broker's Ed25519 key signs short-lived JWTs
  (EdDSA). A target checks them with :class:`TargetVerifier`.

Tokens are secrets: nothing here logs one, and no exception message or repr
carries one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

# Re-exported (``signing.Ed25519PrivateKey``) so callers need not import cryptography.
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey as Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey as Ed25519PublicKey

from firebreak import identity as identity_defaults
from firebreak.contracts import Approval, ApprovalCheck, Receipt
from firebreak.replay_cache import ReplayCache

if TYPE_CHECKING:
    from firebreak.roster import Roster

log = logging.getLogger(__name__)

ALGORITHM = "EdDSA"
MAX_TTL_S = 900
# The environment of an agent identity (and of a target) when none is configured: the embedded demo.
DEFAULT_ENVIRONMENT = identity_defaults.DEFAULT_ENVIRONMENT
# The largest leeway a TargetVerifier allows (see its constructor).
MAX_LEEWAY_S = 30
# How long a rotated-out token key stays published: every token it signed has expired by then.
KEY_OVERLAP_S = MAX_TTL_S + MAX_LEEWAY_S
# Every claim a Firebreak token must carry; a token without one is refused.
REQUIRED_CLAIMS = [
    "iss",
    "sub",
    "aud",
    "scope",
    "exp",
    "nbf",
    "iat",
    "jti",
    "workflow_id",
    "run_id",
    "activity_id",
    "step_id",
    "plan_hash",
]
_RESERVED = frozenset(REQUIRED_CLAIMS)


# -- keys -----------------------------------------------------------------------


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def write_private_key(path: str | Path, key: Ed25519PrivateKey) -> Path:
    """Write a PKCS#8 PEM created with mode 0600 (never briefly world-readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: never overwrite a key by accident; the mode is set at creation.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, private_pem(key))
    finally:
        os.close(fd)
    os.chmod(path, 0o600)  # in case a umask made it narrower than asked; never wider
    return path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        # Like ssh: a private key others can read is refused, not silently used.
        raise PermissionError(f"{path}: private key is readable by others (mode {mode:o}); chmod 600 {path}")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _raw_public(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint: a kid that changes whenever the key does."""
    members = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(_raw_public(key))}
    digest = hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest()
    return _b64url(digest)


def public_jwk(key: Ed25519PrivateKey | Ed25519PublicKey, kid: str | None = None) -> dict[str, str]:
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64url(_raw_public(key)),
        "kid": kid or key_id(key),
        "alg": ALGORITHM,
        "use": "sig",
    }


def audience_for(target: str, environment: str) -> str:
    """The ``aud`` of a token for ``target`` in ``environment``: ``fleet@prod``.

    The environment is part of the audience itself, so that even a target that compares ``aud``
    as an opaque string never takes a staging token in prod.
    """
    return f"{target}@{environment}"


def split_audience(aud: str) -> tuple[str, str]:
    """``fleet@prod`` -> ("fleet", "prod"). A bare ``fleet`` is the default environment's (``demo``)."""
    target, sep, environment = aud.rpartition("@")
    return (target, environment) if sep else (aud, DEFAULT_ENVIRONMENT)


def jwks_expiry(jwks: dict[str, Any]) -> dict[str, float]:
    """kid -> until when the broker publishes it (``exp``, seconds since the epoch), for rotated-out keys.

    A key without ``exp`` is the broker's current key. A target refuses tokens signed by a key past its
    ``exp`` even if it cannot reach the broker, so a cached JWKS is never trusted for ever.
    """
    out: dict[str, float] = {}
    for jwk in jwks.get("keys", []):
        if isinstance(jwk, dict) and isinstance(jwk.get("kid"), str) and isinstance(jwk.get("exp"), int | float):
            out[jwk["kid"]] = float(jwk["exp"])
    return out


def jwks_keys(jwks: dict[str, Any]) -> dict[str, Ed25519PublicKey]:
    """kid -> public key, from a JWKS document; anything but OKP/Ed25519 is skipped."""
    keys: dict[str, Ed25519PublicKey] = {}
    for jwk in jwks.get("keys", []):
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        if jwk.get("alg", ALGORITHM) != ALGORITHM or not isinstance(jwk.get("kid"), str):
            continue
        keys[jwk["kid"]] = Ed25519PublicKey.from_public_bytes(_b64url_decode(jwk["x"]))
    return keys


# -- approvals --------------------------------------------------------------------


def sign_approval(approval: Approval, key: Ed25519PrivateKey) -> Approval:
    signature = key.sign(approval.signing_payload())
    return approval.model_copy(update={"signature": base64.b64encode(signature).decode("ascii")})


def canonical_approval(approval: Approval) -> Approval:
    """The approval with its signature in the one base64 spelling of the bytes it decodes to.

    Base64 has several spellings of the same bytes (the unused low bits of the last character): an
    approval is identified by what it decodes to, so a re-spelt copy is the same approval. A signature
    that does not decode is left as it is (it verifies as nothing anyway)."""
    try:
        raw = base64.b64decode(approval.signature, validate=True)
    except (binascii.Error, ValueError):
        return approval
    spelt = base64.b64encode(raw).decode("ascii")
    return approval if spelt == approval.signature else approval.model_copy(update={"signature": spelt})


def verify_approval(approval: Approval, roster: Roster) -> ApprovalCheck:
    """Signature only: is this approval really from the roster person it names?"""
    if not approval.signature:
        return ApprovalCheck(valid=False, reason="unsigned approval")
    try:
        signature = base64.b64decode(approval.signature, validate=True)
    except (binascii.Error, ValueError):
        return ApprovalCheck(valid=False, reason="signature is not base64")
    if len(signature) != 64:
        return ApprovalCheck(valid=False, reason=f"signature is {len(signature)} bytes, an Ed25519 signature is 64")
    person = roster.get(approval.approver)
    if person is None:
        return ApprovalCheck(valid=False, reason=f"approver {approval.approver!r} is not in the roster")
    try:
        person.key.verify(signature, approval.signing_payload())
    except InvalidSignature:
        return ApprovalCheck(
            valid=False,
            reason=f"signature does not verify with {approval.approver!r}'s key (forged, or the approval was altered)",
        )
    return ApprovalCheck(valid=True, reason="signature verified", groups=list(person.groups))


# -- receipts: who raised an incident ----------------------------------------------


def sign_receipt(receipt: Receipt, key: Ed25519PrivateKey) -> Receipt:
    signature = key.sign(receipt.signing_payload())
    return receipt.model_copy(update={"signature": base64.b64encode(signature).decode("ascii")})


def verify_receipt(receipt: Receipt, roster: Roster | None, intake_keys: list[Ed25519PublicKey]) -> str | None:
    """None if the receipt is genuine, else why not.

    "intake" receipts verify with one of the intake API's keys and name no person;
    any other signer is a roster person who can only sign for themselves.
    """
    try:
        signature = base64.b64decode(receipt.signature, validate=True)
    except (binascii.Error, ValueError):
        return "receipt signature is not base64"
    if len(signature) != 64:
        return "receipt is not signed"
    payload = receipt.signing_payload()
    if receipt.signer == "intake":
        if receipt.requested_by is not None:
            return "an intake receipt cannot name a person"
        keys = intake_keys
    elif roster is not None and (agent := roster.agent(receipt.signer)) is not None:
        # An AI agent's proposal (firebreak mcp): the MCP server signs with the agent's key, naming its owner.
        why = agent.refusal(receipt.issued)
        if why is not None:
            return f"receipt signer: {why}"
        if receipt.requested_by != agent.owner:
            return (f"agent {receipt.signer!r} signed a receipt naming {receipt.requested_by!r}: "
                    f"an agent signs only for its owner {agent.owner!r}")
        keys = [agent.key]
    else:
        if receipt.requested_by != receipt.signer:
            return f"{receipt.signer} signed a receipt naming {receipt.requested_by!r}: a person signs only for themselves"
        person = roster.get(receipt.signer) if roster is not None else None
        if person is None:
            return f"receipt signer {receipt.signer!r} is not in the roster"
        keys = [person.key]
    for key in keys:
        try:
            key.verify(signature, payload)
            return None
        except InvalidSignature:
            continue
    return f"receipt signature by {receipt.signer!r} does not verify"


# -- tokens: mint -----------------------------------------------------------------


def mint_token(
    key: Ed25519PrivateKey,
    kid: str,
    *,
    issuer: str,
    subject: str,
    audience: str,
    verb: str,
    resource: str,
    ttl_s: float,
    workflow_id: str,
    run_id: str,
    activity_id: str,
    step_id: str,
    plan_hash: str,
    extra: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """A signed token for one audience and one (verb, resource); ttl capped at 900 s."""
    if not isinstance(audience, str) or not audience:
        raise ValueError("audience must be one non-empty string")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    clash = _RESERVED & set(extra or {})
    if clash:
        # extra must not be a way round the registered claims (e.g. a second aud).
        raise ValueError(f"extra may not set {sorted(clash)}")
    now = int(time.time())
    ttl = min(int(ttl_s) or 1, MAX_TTL_S)
    claims: dict[str, Any] = {
        **(extra or {}),
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "scope": {"verb": verb, "resource": resource},
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
        "workflow_id": workflow_id,
        "run_id": run_id,
        "activity_id": activity_id,
        "step_id": step_id,
        "plan_hash": plan_hash,
    }
    token = jwt.encode(claims, key, algorithm=ALGORITHM, headers={"typ": "JWT", "kid": kid})
    return token, claims


# -- tokens: verify at the target ---------------------------------------------------


class TokenRejected(Exception):
    """A refused token. ``status`` is 401 (not a usable token), 403 (wrong scope) or 503 (cannot be checked now).

    The message is the reason only; it never contains the token.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.status, self.reason))


class TargetVerifier:
    """What a target runs on every request: one pinned algorithm, all claims required,
    one audience, a small leeway, single use (jti replay cache), and revocation.

    A token is good for exactly one request: Firebreak's activities mint one token
    per call, so a second presentation of a jti is a replay and is refused.

    The target serves one environment: it takes ``aud`` = ``AUDIENCE@ENVIRONMENT`` only
    (a bare ``AUDIENCE`` counts as the default environment, ``demo``), so a prod target refuses
    a staging token. Keys rotated out by the broker carry an expiry (``key_expiry``, from the
    JWKS ``exp``) past which their tokens are refused, cached or not.
    """

    def __init__(
        self,
        audience: str,
        public_keys: dict[str, Ed25519PublicKey],
        *,
        leeway_s: float = 5,
        revoked: Callable[[], set[str]] | None = None,
        issuer: str | None = None,
        on_unknown_kid: Callable[[], dict[str, Ed25519PublicKey]] | None = None,
        replay_cache_path: str | Path | None = None,
        environment: str | None = None,
        key_expiry: dict[str, float] | None = None,
    ) -> None:
        """``replay_cache_path``: where the accepted jtis are kept, so a restarted target still
        refuses a replay (see :mod:`firebreak.replay_cache`); None keeps them in memory only.
        ``environment``: the one this target serves (default ``demo``, or the one in ``audience``
        when it is written ``fleet@prod``)."""
        if not audience:
            raise ValueError("audience is required")
        if not 0 <= leeway_s <= MAX_LEEWAY_S:
            raise ValueError(f"leeway_s must be between 0 and {MAX_LEEWAY_S} seconds")
        named, env = split_audience(audience)
        if environment is not None and "@" in audience and environment != env:
            raise ValueError(f"audience {audience!r} names environment {env!r}, not {environment!r}")
        self.audience = named
        self.environment = environment or env
        self.leeway_s = leeway_s
        self.issuer = issuer
        self._keys = dict(public_keys)
        self._key_expiry = dict(key_expiry or {})
        self._revoked = revoked
        self._on_unknown_kid = on_unknown_kid
        self._on_unknown_kid_jwks: Callable[[], dict[str, Any] | None] | None = None
        self._replay = ReplayCache(replay_cache_path)
        self._poller: _RevocationPoller | None = None

    # -- construction from a running broker --

    @classmethod
    def from_broker(
        cls,
        broker_url: str,
        audience: str,
        *,
        leeway_s: float = 5,
        poll_interval_s: float = 1.0,
        max_stale_s: float = 15.0,
        issuer: str | None = None,
        replay_cache_path: str | Path | None = None,
        environment: str | None = None,
        keys_interval_s: float = 60.0,
    ) -> TargetVerifier:
        """Keys from the broker's JWKS, refreshed every ``keys_interval_s`` (a key the broker no
        longer publishes is dropped); revocations polled from ``GET /v1/revoked``.

        Fails closed: if the revocation list could not be refreshed for
        ``max_stale_s``, every token is refused until it can be.
        """
        poller = _RevocationPoller(broker_url.rstrip("/"), poll_interval_s, max_stale_s, keys_interval_s)
        jwks = poller.fetch_jwks()
        poller.refresh_once()
        verifier = cls(
            audience,
            jwks_keys(jwks),
            leeway_s=leeway_s,
            revoked=poller.revoked,
            issuer=issuer,
            replay_cache_path=replay_cache_path,
            environment=environment,
            key_expiry=jwks_expiry(jwks),
        )
        verifier._on_unknown_kid_jwks = poller.fetch_jwks_rate_limited
        poller.on_jwks = verifier.set_keys
        verifier._poller = poller
        poller.start()
        return verifier

    def set_keys(self, jwks: dict[str, Any]) -> None:
        """Replace the keys with a JWKS the broker just published: a key it dropped is dropped here."""
        keys = jwks_keys(jwks)
        if keys:  # an empty answer is a broken broker, not "trust nothing"; expiry still applies
            self._keys, self._key_expiry = keys, jwks_expiry(jwks)

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop()
        self._replay.close()

    # -- verification --

    def verify(
        self,
        token: str,
        *,
        verb: str,
        resource: str,
        expect_step: str | None = None,
        expect_workflow: str | None = None,
    ) -> dict[str, Any]:
        if not token or not isinstance(token, str):
            raise TokenRejected(401, "missing bearer token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected(401, "malformed token") from None
        if header.get("alg") != ALGORITHM:
            raise TokenRejected(401, f"algorithm {str(header.get('alg'))[:20]!r} is not allowed (EdDSA only)")
        if header.get("typ") != "JWT":
            raise TokenRejected(401, "token header typ must be JWT")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenRejected(401, "token header has no kid")
        key = self._key_for(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],  # pinned: never taken from the token
                options={"require": REQUIRED_CLAIMS, "verify_aud": False, "strict_aud": True},
                issuer=self.issuer,
                leeway=self.leeway_s,
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected(401, "token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected(401, "token not yet valid (nbf/iat in the future)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected(401, f"token lacks required claim {exc.claim!r}") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected(401, "bad token signature") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected(401, "token from an unexpected issuer") from None
        except jwt.PyJWTError as exc:
            # PyJWT messages describe the check that failed, never the token.
            raise TokenRejected(401, f"invalid token: {type(exc).__name__}") from None

        # Audience: exactly one string. A list is refused even if it names us,
        # so that one token can never be valid at two targets.
        aud = claims["aud"]
        if not isinstance(aud, str):
            raise TokenRejected(401, "token must name exactly one audience (aud is not a single string)")
        revoked = self._revoked() if self._revoked is not None else set()
        if claims["jti"] in revoked:
            raise TokenRejected(401, "token revoked")
        target, environment = split_audience(aud)
        if target != self.audience:
            raise TokenRejected(403, f"token is for audience {aud[:64]!r}, not {self.audience!r}")
        if environment != self.environment:
            raise TokenRejected(403, f"token is for environment {environment[:32]!r}, this target serves "
                                     f"{self.environment!r} (audience {aud[:64]!r}, expected "
                                     f"{audience_for(self.audience, self.environment)!r})")
        if not self._replay.check_and_add(str(claims["jti"]), float(claims["exp"]), time.time(), self.leeway_s):
            raise TokenRejected(401, "token already used (replayed jti)")
        scope = claims["scope"]
        if not isinstance(scope, dict) or not isinstance(scope.get("verb"), str):
            raise TokenRejected(401, "token scope is malformed")
        if scope["verb"] != verb:
            raise TokenRejected(403, f"token allows {scope['verb'][:64]!r}, not {verb!r}")
        if scope.get("resource") != resource:
            raise TokenRejected(403, f"token is for resource {str(scope.get('resource'))[:128]!r}, not {resource!r}")
        if expect_step is not None and claims["step_id"] != expect_step:
            raise TokenRejected(403, f"token is for step {str(claims['step_id'])[:64]!r}, not {expect_step!r}")
        if expect_workflow is not None and claims["workflow_id"] != expect_workflow:
            raise TokenRejected(403, "token is for another workflow")
        return claims

    def _key_for(self, kid: str) -> Ed25519PublicKey:
        key = self._keys.get(kid)
        if key is None and self._on_unknown_kid_jwks is not None:
            # The broker may have a new key; ask once (rate-limited by the poller).
            jwks = self._on_unknown_kid_jwks()
            if jwks is not None:
                self.set_keys(jwks)
            key = self._keys.get(kid)
        elif key is None and self._on_unknown_kid is not None:
            self._keys.update(self._on_unknown_kid())
            key = self._keys.get(kid)
        if key is None:
            raise TokenRejected(401, "token signed by an unknown key")
        retired = self._key_expiry.get(kid)
        if retired is not None and time.time() >= retired:
            # The broker rotated this key out and every token it signed has expired (or the rotation
            # was an emergency): refused even if the broker cannot be asked.
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(retired))
            raise TokenRejected(401, f"token signed by a retired broker key (its overlap ended at {at})")
        return key


def check_request_binding(
    claims: dict[str, Any],
    *,
    idempotency_key: str | None,
    body: bytes,
    recorded_result: Callable[[str], dict[str, Any] | None],
) -> None:
    """A write token is good for one exact request: raise TokenRejected(403) for any other.

    The broker puts ``req`` in every write token (see ``firebreak.broker.rules``):

    * ``idempotency_key``: the request must carry exactly this ``Idempotency-Key``;
    * ``body_sha256``: the SHA-256 of the exact body bytes, like HTTP's Content-Digest,
      so neither the worker nor anyone who lifts the token can change what it does;
    * or, for an undo, ``undo_of`` (the idempotency key of the write it undoes) and
      ``undo_body`` (a template whose ``{result.FIELD}`` values the target fills from
      the result it recorded for ``undo_of``): an undo before its write, or with any
      other values, is refused.

    ``recorded_result(key)`` returns the target's stored success response for a key, or None.
    """
    binding = claims.get("req")
    if not isinstance(binding, dict):
        raise TokenRejected(403, "write token does not bind its request (no req claim)")
    if idempotency_key != binding.get("idempotency_key"):
        raise TokenRejected(403, "Idempotency-Key differs from the one the token was minted for")
    if "body_sha256" in binding:
        if not hmac.compare_digest(hashlib.sha256(body).hexdigest(), str(binding["body_sha256"])):
            raise TokenRejected(403, "request body differs from the body the token was minted for")
        return
    undo_of, template = binding.get("undo_of"), binding.get("undo_body")
    if not isinstance(undo_of, str) or not isinstance(template, dict):
        raise TokenRejected(403, "write token binds neither a body nor the write it undoes")
    recorded = recorded_result(undo_of)
    if recorded is None:
        raise TokenRejected(403, "undo refused: the write it undoes has not run here")
    expected: dict[str, Any] = {}
    for name, value in template.items():
        field = value[len("{result."):-1] if isinstance(value, str) and value.startswith("{result.") else None
        if field is not None:
            if field not in recorded:
                raise TokenRejected(403, f"undo refused: the recorded write has no {field!r}")
            expected[name] = recorded[field]
        else:
            expected[name] = value
    try:
        sent = json.loads(body or b"{}")
    except ValueError:
        raise TokenRejected(403, "undo body is not JSON") from None
    if sent != expected:
        raise TokenRejected(403, "undo body differs from the state recorded at the write it undoes")


class _RevocationPoller:
    """Keeps the broker's revocation list fresh in a daemon thread (sync httpx)."""

    def __init__(self, base_url: str, interval_s: float, max_stale_s: float, keys_interval_s: float = 60.0) -> None:
        import httpx  # local: targets that never use from_broker need not import it

        self._client = httpx.Client(base_url=base_url, timeout=5.0)
        self._interval = interval_s
        self._max_stale = max_stale_s
        self._keys_interval = keys_interval_s
        self._revoked: set[str] = set()
        self._fresh_at = 0.0
        self._last_key_fetch = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="firebreak-revocations", daemon=True)
        self.on_jwks: Callable[[dict[str, Any]], None] | None = None
        self._kids: set[str] = set()  # the kids the broker last published

    def fetch_jwks(self) -> dict[str, Any]:
        response = self._client.get("/.well-known/jwks.json")
        response.raise_for_status()
        self._last_key_fetch = time.monotonic()
        document = response.json()
        document = document if isinstance(document, dict) else {}
        self._kids = set(jwks_keys(document))
        return document

    def fetch_keys(self) -> dict[str, Ed25519PublicKey]:
        return jwks_keys(self.fetch_jwks())

    def fetch_jwks_rate_limited(self) -> dict[str, Any] | None:
        if time.monotonic() - self._last_key_fetch < 5:
            return None
        try:
            return self.fetch_jwks()
        except Exception as exc:  # unknown kid stays unknown
            log.warning("could not refresh broker keys: %s", type(exc).__name__)
            return None

    def _refresh_keys(self) -> None:
        if self.on_jwks is None or time.monotonic() - self._last_key_fetch < self._keys_interval:
            return
        jwks = self.fetch_jwks_rate_limited()
        if jwks is not None:
            self.on_jwks(jwks)

    def refresh_once(self) -> None:
        response = self._client.get("/v1/revoked")
        response.raise_for_status()
        body = response.json()
        jtis = {str(j) for j in body.get("revoked", [])}
        with self._lock:
            self._revoked = jtis
            self._fresh_at = time.monotonic()
        kids = body.get("kids")
        if self.on_jwks is not None and isinstance(kids, list) and set(map(str, kids)) != self._kids:
            # The broker rotated its key (or an old one's overlap ended): take its JWKS now, not at the next
            # periodic refresh, so a retired key is dropped within a poll.
            try:
                self.on_jwks(self.fetch_jwks())
            except Exception as exc:  # the periodic refresh and the key expiry still apply
                log.warning("could not refresh broker keys: %s", type(exc).__name__)

    def revoked(self) -> set[str]:
        with self._lock:
            if time.monotonic() - self._fresh_at > self._max_stale:
                # 503, not 401: the token may be fine, the target cannot tell yet. Callers ask again.
                raise TokenRejected(503, "revocation list is stale (broker unreachable): refusing all tokens")
            return set(self._revoked)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._client.close()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self._interval):
            self._refresh_keys()  # a rotated-out key leaves the JWKS: drop it here too
            try:
                self.refresh_once()
            except Exception as exc:  # keep polling; staleness fails closed
                if not failing:  # once per outage, not once a second
                    log.warning("revocation poll failed: %s (retrying every %.0fs)", type(exc).__name__, self._interval)
                failing = True
            else:
                if failing:
                    log.warning("revocation poll recovered")
                failing = False
