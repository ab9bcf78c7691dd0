"""The agent's own identity on the real broker, fleet and CLI: its configuration (owner, environment,
maximum credential age) in `privileges` and `/metrics`, the environment in every audience, and the
rotation of the bootstrap credential and of the broker's signing key, each with its overlap."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from demo.fleet import FleetServer
from firebreak import signing
from firebreak.broker.audit import verify_chain
from firebreak.broker.client import BrokerClient, MintRefused, TokenFile
from firebreak.broker.server import BrokerServer
from firebreak.identity import AgentIdentity
from firebreak.runbook import default_runbook_dir
from firebreak.signing import TargetVerifier, TokenRejected

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"namespace": "shop", "service": "checkout"}


def read_fields(**kw: Any) -> dict[str, Any]:
    """A read the shipped bad-deploy runbook declares (no approvals needed)."""
    fields: dict[str, Any] = dict(audience="prometheus", verb="metrics.read", resource="namespace/shop", ttl_s=60,
                                  workflow_id="shop.checkout.error-rate", run_id="run-1", activity_id="3",
                                  step_id="error_rate", runbook="bad-deploy", params=PARAMS)
    fields.update(kw)
    return fields


def fleet_read(**kw: Any) -> dict[str, Any]:
    return read_fields(audience="fleet", verb="fleet.read", resource="service/checkout", step_id="changes", **kw)


def broker(tmp_path: Path, identity: AgentIdentity | None = None, name: str = "state") -> BrokerServer:
    runbooks = tmp_path / "runbooks"
    runbooks.mkdir(exist_ok=True)
    shutil.copy(default_runbook_dir() / "bad-deploy.yaml", runbooks)
    return BrokerServer(tmp_path / name, roster_path=tmp_path / "roster.yaml", runbooks_dir=runbooks,
                        identity=identity).start()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BrokerServer]:
    srv = broker(tmp_path, AgentIdentity(owner="sre-platform", environment="prod", credential_max_age="30d"))
    try:
        yield srv
    finally:
        srv.stop()


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firebreak.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=60)


def audit(server: BrokerServer) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.audit_path.read_text().splitlines()]


# -- identity configuration ---------------------------------------------------------------------------


def test_metrics_show_the_identity_its_credential_age_and_every_denial_class(server: BrokerServer) -> None:
    metrics = scrape(server.url)
    assert metrics['firebreak_agent_info{agent="firebreak-agent",owner="sre-platform",environment="prod"}'] == 1
    assert metrics["firebreak_agent_credential_max_age_seconds"] == 30 * 86400
    assert 0 <= metrics["firebreak_agent_credential_age_seconds"] < 60
    assert metrics["firebreak_agent_credential_overlap_seconds"] == 0
    assert metrics["firebreak_broker_signing_keys_published"] == 1
    assert metrics["firebreak_broker_unapproved_write_attempts_total"] == 0
    # Every class is there from the start at 0, so Prometheus's increase() sees the first denial.
    for reason in ("unauthenticated", "no_approval", "scope", "reuse", "plan_mismatch", "other"):
        assert metrics[f'firebreak_broker_denials_total{{reason="{reason}"}}'] == 0
    assert httpx.get(f"{server.url}/healthz").json()["identity"]["environment"] == "prod"


@pytest.mark.integration
def test_privileges_shows_the_configured_identity_in_every_format(tmp_path: Path) -> None:
    config = tmp_path / "firebreak.yaml"
    config.write_text("identity:\n  owner: sre-platform\n  environment: prod\n  credential_max_age: 1s\n")
    state = tmp_path / "state"
    (state / "broker").mkdir(parents=True)
    token = state / "broker" / "agent-token"
    token.write_text("x")
    os.utime(token, (time.time() - 3600, time.time() - 3600))  # an hour old: overdue against 1s
    env = {"FIREBREAK_CONFIG": str(config)}
    data = json.loads(cli("privileges", "--json", "--state-dir", str(state), env=env).stdout)
    identity = data["identity"]
    assert (identity["owner"], identity["environment"], identity["credential_max_age_s"]) == ("sre-platform", "prod", 1)
    assert identity["credential_overdue"] is True and identity["credential_age_s"] >= 3600
    for args in (["--markdown"], [], ["--usage"]):
        out = cli("privileges", *args, "--state-dir", str(state), env=env).stdout
        assert "owner **sre-platform**, environment **prod**" in out, args
        assert "`TARGET@prod`" in out and "OVERDUE: rotate it with `firebreak creds rotate`" in out, args
    # The identity is shown, never locked: the lock holds the runbooks' privileges only.
    assert "identity" not in json.loads((ROOT / "privileges.lock.json").read_text())


# -- environment in the audience ---------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_prod_target_refuses_a_staging_token_with_the_reason(tmp_path: Path) -> None:
    staging = broker(tmp_path, AgentIdentity(environment="staging"), name="staging")
    prod = broker(tmp_path, AgentIdentity(environment="prod"), name="prod")
    try:
        async with BrokerClient(staging.url, staging.agent_token) as client:
            staging_cred = await client.mint(**fleet_read())
        async with BrokerClient(prod.url, prod.agent_token) as client:
            prod_cred = await client.mint(**fleet_read())
        assert jwt.decode(staging_cred.token, options={"verify_signature": False})["aud"] == "fleet@staging"
        # The real fleet, serving prod and trusting both brokers' keys: only the environment tells them apart.
        keys = {**signing.jwks_keys(httpx.get(f"{staging.url}/.well-known/jwks.json").json()),
                **signing.jwks_keys(httpx.get(f"{prod.url}/.well-known/jwks.json").json())}
        verifier = TargetVerifier("fleet", keys, environment="prod")
        with FleetServer(verifier=verifier) as fleet:
            refused = httpx.get(f"{fleet.url}/services/checkout", headers={"Authorization": staging_cred.authorization})
            assert refused.status_code == 403
            assert "environment 'staging', this target serves 'prod'" in refused.json()["reason"], refused.json()
            assert staging_cred.token not in refused.text
            ok = httpx.get(f"{fleet.url}/services/checkout", headers={"Authorization": prod_cred.authorization})
            assert ok.status_code == 200, ok.text
        # A target left at the default environment (the demo) takes neither.
        async with BrokerClient(prod.url, prod.agent_token) as client:
            another = await client.mint(**fleet_read(activity_id="4"))
        with pytest.raises(TokenRejected, match="environment 'prod', this target serves 'demo'"):
            TargetVerifier("fleet", keys).verify(another.token, verb="fleet.read", resource="service/checkout")
    finally:
        staging.stop()
        prod.stop()


def test_audience_carries_the_environment() -> None:
    assert signing.audience_for("fleet", "prod") == "fleet@prod"
    assert signing.split_audience("fleet@prod") == ("fleet", "prod")
    assert signing.split_audience("fleet") == ("fleet", "demo")  # a bare audience is the demo's, never prod's
    assert TargetVerifier("fleet@prod", {}).environment == "prod"
    with pytest.raises(ValueError, match="names environment"):
        TargetVerifier("fleet@prod", {}, environment="staging")


# -- bootstrap credential rotation ---------------------------------------------------------------------------


async def test_creds_rotate_keeps_both_credentials_during_the_overlap_then_refuses_and_audits_the_old(
        server: BrokerServer) -> None:
    old = server.agent_token
    state = str(server.state_dir)
    token_file = TokenFile(server.state_dir / "broker" / "agent-token")
    assert token_file() == old
    follower = BrokerClient(server.url, token_file)  # what the worker holds: it reads the file again on change
    result = cli("creds", "rotate", "--overlap", "3s", "--reason", "quarterly rotation", "--as", "dana",
                 "--state-dir", state, "--broker-url", server.url)
    assert result.returncode == 0, result.stderr
    new = (server.state_dir / "broker" / "agent-token").read_text().strip()
    assert new != old and server.agent_token == new
    assert old not in result.stdout + result.stderr and new not in result.stdout + result.stderr
    assert (server.state_dir / "broker" / "agent-token").stat().st_mode & 0o777 == 0o600
    rotated_at = time.time()
    # During the overlap both mint.
    async with BrokerClient(server.url, old) as client:
        await client.mint(**read_fields(activity_id="a1"))
    async with BrokerClient(server.url, new) as client:
        await client.mint(**read_fields(activity_id="a2"))
    await follower.mint(**read_fields(activity_id="a3"))
    assert token_file() == new
    metrics = scrape(server.url)
    assert metrics["firebreak_agent_previous_credential_uses_total"] == 1
    assert 0 < metrics["firebreak_agent_credential_overlap_seconds"] <= 3
    assert metrics["firebreak_agent_credential_age_seconds"] < 10
    time.sleep(max(0.0, rotated_at + 3.2 - time.time()))
    # After it, the old one is refused (401) and audited, naming the rotation; the new one still mints.
    async with BrokerClient(server.url, old) as client:
        with pytest.raises(MintRefused) as info:
            await client.mint(**read_fields(activity_id="a4"))
    assert info.value.status == 401 and "bootstrap credential retired: rotated by dana" in info.value.reason
    await follower.mint(**read_fields(activity_id="a5"))
    await follower.aclose()
    records = audit(server)
    rotate = next(r for r in records if r["event"] == "rotate")
    assert rotate["decision"] == "credential_rotated" and rotate["subject"] == "dana"
    assert "quarterly rotation" in rotate["reason"]
    deny = [r for r in records if r["event"] == "deny"][-1]
    assert deny["decision"] == "unauthenticated" and "bootstrap credential retired" in deny["reason"]
    text = server.audit_path.read_text()
    assert old not in text and new not in text
    assert scrape(server.url)['firebreak_broker_denials_total{reason="unauthenticated"}'] == 1
    assert verify_chain(server.audit_path)[0]


@pytest.mark.integration
def test_a_credential_from_the_environment_is_not_rotated_by_the_broker(tmp_path: Path) -> None:
    srv = BrokerServer(tmp_path / "s", roster_path=tmp_path / "r.yaml", agent_token="given-elsewhere").start()
    try:
        response = httpx.post(f"{srv.url}/v1/creds/rotate", json={"overlap_s": 1},
                              headers={"Authorization": f"Bearer {srv.admin_token}"})
        assert response.status_code == 409 and "rotate it where it is set" in response.json()["reason"]
    finally:
        srv.stop()


# -- signing key rotation ---------------------------------------------------------------------------------------


async def test_signing_key_rotation_old_key_verifies_during_the_overlap_and_is_refused_after(
        server: BrokerServer) -> None:
    async with BrokerClient(server.url, server.agent_token) as client:
        during = await client.mint(**read_fields(activity_id="k1"))  # signed with the old key
        after = await client.mint(**read_fields(activity_id="k2"))  # signed with the old key too
    old_kid = server.broker.kid if server.broker else ""
    cached = TargetVerifier.from_broker(server.url, "prometheus", environment="prod", leeway_s=0)
    try:
        result = cli("creds", "rotate-key", "--overlap", "3s", "--reason", "drill", "--as", "dana",
                     "--state-dir", str(server.state_dir), "--broker-url", server.url)
        assert result.returncode == 0, result.stderr
        assert "refuses tokens the old key signed before they expire" in result.stderr  # 3s < 930s: said so
        rotated_at = time.time()
        jwks = httpx.get(f"{server.url}/.well-known/jwks.json").json()
        published = {k["kid"]: k for k in jwks["keys"]}
        assert old_kid in published and len(published) == 2 and "exp" in published[old_kid]
        new_kid = next(k for k in published if k != old_kid)
        assert "exp" not in published[new_kid]
        assert scrape(server.url)["firebreak_broker_signing_keys_published"] == 2
        # During the overlap: a target that has just fetched the JWKS takes both keys.
        fresh = TargetVerifier.from_broker(server.url, "prometheus", environment="prod", leeway_s=0)
        try:
            fresh.verify(during.token, verb="metrics.read", resource="namespace/shop")
            async with BrokerClient(server.url, server.agent_token) as client:
                signed_new = await client.mint(**read_fields(activity_id="k3"))
            assert jwt.get_unverified_header(signed_new.token)["kid"] == new_kid
            fresh.verify(signed_new.token, verb="metrics.read", resource="namespace/shop")
        finally:
            fresh.close()
        # A target that keeps this JWKS and never reaches the broker again (no poller at all).
        offline = TargetVerifier("prometheus", signing.jwks_keys(jwks), key_expiry=signing.jwks_expiry(jwks),
                                 environment="prod", leeway_s=0)
        time.sleep(max(0.0, rotated_at + 3.2 - time.time()))
        # After it: refused by the offline target, because the old key's exp passed ...
        with pytest.raises(TokenRejected, match="retired broker key") as info:
            offline.verify(after.token, verb="metrics.read", resource="namespace/shop")
        assert info.value.status == 401
        # ... by the target that held the old key from before the rotation (its poller saw the key set change) ...
        with pytest.raises(TokenRejected, match="retired broker key|unknown key"):
            cached.verify(after.token, verb="metrics.read", resource="namespace/shop")
        # ... and by one that fetches the JWKS now, which no longer has it.
        assert [k["kid"] for k in httpx.get(f"{server.url}/.well-known/jwks.json").json()["keys"]] == [new_kid]
        late = TargetVerifier.from_broker(server.url, "prometheus", environment="prod", leeway_s=0)
        try:
            with pytest.raises(TokenRejected, match="unknown key"):
                late.verify(after.token, verb="metrics.read", resource="namespace/shop")
        finally:
            late.close()
    finally:
        cached.close()
    rotate = next(r for r in audit(server) if r["event"] == "rotate")
    assert rotate["decision"] == "signing_key_rotated" and old_kid in rotate["reason"] and new_kid in rotate["reason"]
    # Checkpoints signed before and after the rotation all verify (the old public key is kept for that).
    assert server.broker is not None
    server.broker.audit.checkpoint()
    verify = cli("audit", "verify", "--no-history", "--state-dir", str(server.state_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    checkpoints = [json.loads(line) for line in server.checkpoints_path.read_text().splitlines()]
    assert {c["kid"] for c in checkpoints} == {old_kid, new_kid}
    assert any(c["reason"] == "rekey" and c["kid"] == old_kid for c in checkpoints)


def test_a_target_drops_a_key_the_broker_stopped_publishing() -> None:
    old, new = signing.generate_key(), signing.generate_key()
    old_kid, new_kid = signing.key_id(old), signing.key_id(new)
    verifier = TargetVerifier("fleet", {old_kid: old.public_key()})
    verifier.set_keys({"keys": [signing.public_jwk(new, new_kid)]})
    token, _ = signing.mint_token(old, old_kid, issuer="i", subject="s", audience="fleet@demo", verb="fleet.read",
                                  resource="service/checkout", ttl_s=60, workflow_id="w", run_id="r",
                                  activity_id=uuid.uuid4().hex, step_id="s", plan_hash="0" * 64)
    with pytest.raises(TokenRejected, match="unknown key"):
        verifier.verify(token, verb="fleet.read", resource="service/checkout")
