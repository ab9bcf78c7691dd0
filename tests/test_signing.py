"""Keys, approval signatures and the target-side token verifier (no broker needed)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest

from firebreak import signing
from firebreak.contracts import Approval
from firebreak.roster import Roster, entry_yaml
from firebreak.signing import TargetVerifier, TokenRejected

PLAN_HASH = "a" * 64


# -- helpers ----------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A hand-built JWT: what an attacker can send, not what our mint produces."""
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    signature = sign(f"{head}.{body}".encode()) if sign else b""
    return f"{head}.{body}.{b64url(signature)}"


@pytest.fixture(scope="module")
def broker_key() -> signing.Ed25519PrivateKey:
    return signing.generate_key()


@pytest.fixture(scope="module")
def kid(broker_key: signing.Ed25519PrivateKey) -> str:
    return signing.key_id(broker_key)


def mint(key: signing.Ed25519PrivateKey, kid: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    fields: dict[str, Any] = dict(
        issuer="firebreak-broker",
        subject="firebreak-agent",
        audience="fleet",
        verb="fleet.rollback",
        resource="service/checkout",
        ttl_s=60,
        workflow_id="shop.checkout.error-rate",
        run_id="run-1",
        activity_id="7",
        step_id="s1",
        plan_hash=PLAN_HASH,
    )
    fields.update(overrides)
    return signing.mint_token(key, kid, **fields)


def claims_now(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "firebreak-broker",
        "sub": "firebreak-agent",
        "aud": "fleet",
        "scope": {"verb": "fleet.rollback", "resource": "service/checkout"},
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
        "workflow_id": "wf",
        "run_id": "r",
        "activity_id": "1",
        "step_id": "s1",
        "plan_hash": PLAN_HASH,
    }
    claims.update(overrides)
    return claims


def verifier(key: signing.Ed25519PrivateKey, kid: str, audience: str = "fleet", **kw: Any) -> TargetVerifier:
    return TargetVerifier(audience, {kid: key.public_key()}, **kw)


def rejected(v: TargetVerifier, token: str, **kw: Any) -> TokenRejected:
    kw.setdefault("verb", "fleet.rollback")
    kw.setdefault("resource", "service/checkout")
    with pytest.raises(TokenRejected) as info:
        v.verify(token, **kw)
    assert info.value.reason
    if token:
        assert token not in str(info.value) and token not in repr(info.value)
    return info.value


# -- keys -------------------------------------------------------------------------


def test_private_key_written_0600_and_round_trips(tmp_path: Path) -> None:
    key = signing.generate_key()
    path = signing.write_private_key(tmp_path / "k" / "alice.pem", key)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = signing.load_private_key(path)
    assert signing.public_pem(loaded) == signing.public_pem(key)
    assert signing.private_pem(key).startswith(b"-----BEGIN PRIVATE KEY-----")
    assert signing.public_pem(key).startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(FileExistsError):
        signing.write_private_key(path, signing.generate_key())  # never overwrites a key


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = signing.write_private_key(tmp_path / "k.pem", signing.generate_key())
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        signing.load_private_key(path)


def test_load_public_key_refuses_non_ed25519() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not an Ed25519"):
        signing.load_public_key(pem)
    with pytest.raises(ValueError):
        signing.load_public_key("not a pem")


# -- approvals ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice_key() -> signing.Ed25519PrivateKey:
    return signing.generate_key()


@pytest.fixture(scope="module")
def roster(alice_key: signing.Ed25519PrivateKey) -> Roster:
    return Roster.parse("people:\n" + entry_yaml("alice", ["oncall-checkout"], signing.public_pem(alice_key)))


def approval(approver: str = "alice", **kw: Any) -> Approval:
    fields: dict[str, Any] = dict(
        workflow_id="shop.checkout.error-rate",
        plan_hash=PLAN_HASH,
        decision="approve",
        nonce=uuid.uuid4().hex,
        expires_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        approver=approver,
    )
    fields.update(kw)
    return Approval(**fields)


def test_valid_approval_verifies_with_groups(alice_key: signing.Ed25519PrivateKey, roster: Roster) -> None:
    signed = signing.sign_approval(approval(), alice_key)
    assert len(base64.b64decode(signed.signature)) == 64
    check = signing.verify_approval(signed, roster)
    assert check.valid, check.reason
    assert check.groups == ["oncall-checkout"]


def test_unsigned_approval_refused(roster: Roster) -> None:
    check = signing.verify_approval(approval(), roster)
    assert not check.valid and "unsigned" in check.reason


def test_signature_not_base64_refused(roster: Roster) -> None:
    check = signing.verify_approval(approval(signature="!!not base64!!"), roster)
    assert not check.valid and "base64" in check.reason


def test_forged_approval_refused(roster: Roster) -> None:
    # Signed by someone else's key but naming alice.
    forged = signing.sign_approval(approval(), signing.generate_key())
    check = signing.verify_approval(forged, roster)
    assert not check.valid and "does not verify" in check.reason


def test_altered_approval_refused(alice_key: signing.Ed25519PrivateKey, roster: Roster) -> None:
    signed = signing.sign_approval(approval(steps=["s1"]), alice_key)
    altered = signed.model_copy(update={"steps": []})  # widen "s1" to "the whole plan"
    check = signing.verify_approval(altered, roster)
    assert not check.valid and "altered" in check.reason


def test_approver_not_in_roster_refused(roster: Roster) -> None:
    mallory = signing.generate_key()
    check = signing.verify_approval(signing.sign_approval(approval("mallory"), mallory), roster)
    assert not check.valid and "not in the roster" in check.reason


# -- minting -------------------------------------------------------------------------


def test_minted_token_has_every_claim_and_pinned_header(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    token, claims = mint(broker_key, kid, ttl_s=5000)
    assert set(signing.REQUIRED_CLAIMS) <= set(claims)
    assert claims["exp"] - claims["iat"] == signing.MAX_TTL_S  # capped at 900 s
    assert claims["aud"] == "fleet" and isinstance(claims["aud"], str)
    assert claims["scope"] == {"verb": "fleet.rollback", "resource": "service/checkout"}
    assert len(claims["jti"]) == 32
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": kid}


def test_extra_claims_cannot_override_registered_ones(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    with pytest.raises(ValueError, match="aud"):
        mint(broker_key, kid, extra={"aud": ["fleet", "prometheus"]})


# -- target verification ------------------------------------------------------------------


def test_good_token_accepted_once(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    v = verifier(broker_key, kid)
    token, claims = mint(broker_key, kid)
    got = v.verify(token, verb="fleet.rollback", resource="service/checkout", expect_step="s1")
    assert got["jti"] == claims["jti"]
    assert "replayed" in rejected(v, token).reason  # a jti seen twice is refused
    assert rejected(v, token).status == 401


def test_alg_none_refused(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    token = raw_token({"alg": "none", "typ": "JWT", "kid": kid}, claims_now())
    err = rejected(verifier(broker_key, kid), token)
    assert err.status == 401 and "not allowed" in err.reason


def test_hs256_signed_with_public_key_refused(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    # The classic confusion attack: HMAC keyed with the (public) verification key.
    public = signing.public_pem(broker_key).encode()
    for secret in (public, signing._raw_public(broker_key)):
        token = raw_token(
            {"alg": "HS256", "typ": "JWT", "kid": kid},
            claims_now(),
            lambda msg, s=secret: hmac.new(s, msg, hashlib.sha256).digest(),
        )
        err = rejected(verifier(broker_key, kid), token)
        assert err.status == 401 and "EdDSA only" in err.reason


def test_token_without_exp_refused(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    claims = claims_now()
    del claims["exp"]
    token = jwt.encode(claims, broker_key, algorithm="EdDSA", headers={"kid": kid, "typ": "JWT"})
    err = rejected(verifier(broker_key, kid), token)
    assert err.status == 401 and "'exp'" in err.reason


@pytest.mark.parametrize("claim", ["jti", "plan_hash", "step_id", "scope", "nbf"])
def test_token_without_any_required_claim_refused(broker_key: signing.Ed25519PrivateKey, kid: str, claim: str) -> None:
    claims = claims_now()
    del claims[claim]
    token = jwt.encode(claims, broker_key, algorithm="EdDSA", headers={"kid": kid, "typ": "JWT"})
    assert f"'{claim}'" in rejected(verifier(broker_key, kid), token).reason


def test_two_audiences_refused_even_if_one_is_ours(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    token = jwt.encode(
        claims_now(aud=["fleet", "prometheus"]), broker_key, algorithm="EdDSA", headers={"kid": kid, "typ": "JWT"}
    )
    err = rejected(verifier(broker_key, kid), token)
    assert err.status == 401 and "exactly one audience" in err.reason


def test_expired_token_refused(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    past = int(time.time()) - 120
    token = jwt.encode(
        claims_now(iat=past - 60, nbf=past - 60, exp=past), broker_key, algorithm="EdDSA",
        headers={"kid": kid, "typ": "JWT"},
    )
    err = rejected(verifier(broker_key, kid), token)
    assert err.status == 401 and "expired" in err.reason


def test_expired_within_leeway_still_accepted(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    now = int(time.time())
    token = jwt.encode(
        claims_now(iat=now - 60, nbf=now - 60, exp=now - 2), broker_key, algorithm="EdDSA",
        headers={"kid": kid, "typ": "JWT"},
    )
    verifier(broker_key, kid, leeway_s=5).verify(token, verb="fleet.rollback", resource="service/checkout")


def test_not_yet_valid_token_refused(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    future = int(time.time()) + 300
    token = jwt.encode(
        claims_now(nbf=future, exp=future + 60), broker_key, algorithm="EdDSA", headers={"kid": kid, "typ": "JWT"}
    )
    err = rejected(verifier(broker_key, kid), token)
    assert err.status == 401 and "not yet valid" in err.reason


def test_token_signed_by_another_key_refused(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    token, _ = mint(signing.generate_key(), kid)  # claims our kid, signed by another key
    err = rejected(verifier(broker_key, kid), token)
    assert err.status == 401 and "signature" in err.reason


def test_unknown_kid_refused(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    token, _ = mint(broker_key, "some-other-kid")
    assert "unknown key" in rejected(verifier(broker_key, kid), token).reason


def test_step_2_token_used_for_step_3_refused(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    token, _ = mint(broker_key, kid, step_id="s2")
    err = rejected(verifier(broker_key, kid), token, expect_step="s3")
    assert err.status == 403 and "step 's2'" in err.reason


def test_token_for_service_a_refused_at_service_b(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    token, _ = mint(broker_key, kid, audience="fleet")
    err = rejected(verifier(broker_key, kid, audience="prometheus"), token)
    assert err.status == 403 and "audience" in err.reason


def test_read_token_used_for_write_refused(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    token, _ = mint(broker_key, kid, verb="fleet.read", plan_hash="")
    err = rejected(verifier(broker_key, kid), token, verb="fleet.rollback")
    assert err.status == 403 and "'fleet.read'" in err.reason


def test_token_for_another_resource_refused(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    token, _ = mint(broker_key, kid, resource="service/checkout")
    err = rejected(verifier(broker_key, kid), token, resource="service/payments")
    assert err.status == 403 and "resource" in err.reason


def test_revoked_token_refused(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    token, claims = mint(broker_key, kid)
    revoked: set[str] = {claims["jti"]}
    err = rejected(verifier(broker_key, kid, revoked=lambda: revoked), token)
    assert err.status == 401 and "revoked" in err.reason


def test_wrong_issuer_refused_when_pinned(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    token, _ = mint(broker_key, kid, issuer="someone-else")
    assert "issuer" in rejected(verifier(broker_key, kid, issuer="firebreak-broker"), token).reason


def test_missing_or_garbage_token_refused(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    v = verifier(broker_key, kid)
    assert rejected(v, "").status == 401
    assert rejected(v, "not.a.jwt").status == 401


def test_jwks_round_trip(broker_key: signing.Ed25519PrivateKey, kid: str) -> None:
    keys = signing.jwks_keys({"keys": [signing.public_jwk(broker_key, kid), {"kty": "RSA", "kid": "x"}]})
    assert list(keys) == [kid]
    token, _ = mint(broker_key, kid)
    TargetVerifier("fleet", keys).verify(token, verb="fleet.rollback", resource="service/checkout")
