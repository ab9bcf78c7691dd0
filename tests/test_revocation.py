"""Revocation that holds: a revocation the broker missed lands later, and a target that restarts
still refuses a token it already accepted.

Real servers throughout: the broker over HTTP (stopped and started again on its port with its
state), the demo fleet in-process and as its own process, and tokens minted and verified for real.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo.fleet import Fleet, FleetServer, replay_cache_path
from demo.prom import free_port
from firebreak import signing
from firebreak.broker.client import BrokerClient
from firebreak.broker.revocations import RevocationRetries
from firebreak.broker.server import BrokerServer
from firebreak.replay_cache import ReplayCache
from firebreak.roster import entry_yaml
from firebreak.runbook import default_runbook_dir
from firebreak.signing import TargetVerifier, TokenRejected

from fixtures_demo import Minter, minter  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]
WF = "shop.checkout.error-rate"
PARAMS = {"namespace": "shop", "service": "checkout"}


def read_fields(**kw: Any) -> dict[str, Any]:
    """A read the shipped bad-deploy runbook declares (its change log on the fleet)."""
    return dict(audience="fleet", verb="fleet.read", resource="service/checkout", ttl_s=120, workflow_id=WF,
                run_id="run-1", activity_id="3", step_id="changes", runbook="bad-deploy", params=PARAMS) | kw


@pytest.fixture
def broker_files(tmp_path: Path) -> dict[str, Path]:
    runbooks = tmp_path / "runbooks"
    runbooks.mkdir()
    shutil.copy(default_runbook_dir() / "bad-deploy.yaml", runbooks)
    roster = tmp_path / "roster.yaml"
    roster.write_text("people:\n" + entry_yaml("alice", ["oncall"], signing.public_pem(signing.generate_key())))
    return {"state": tmp_path / "state", "roster": roster, "runbooks": runbooks}


def start_broker(files: dict[str, Path], port: int = 0) -> BrokerServer:
    return BrokerServer(files["state"], roster_path=files["roster"], runbooks_dir=files["runbooks"], port=port).start()


def audit_events(server: BrokerServer) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.audit_path.read_text().splitlines()]


# -- the worker's side: a revocation the broker missed ------------------------------------------------


async def test_a_read_does_not_wait_for_its_revocation_and_a_write_does(broker_files: dict[str, Path]) -> None:
    """Reads revoke in the background (off the investigation's critical path), still at once; settle() waits
    for them at shutdown. A write's credential is revoked before its activity may return."""
    server = start_broker(broker_files)
    broker = server.broker
    assert broker is not None
    client = BrokerClient(server.url, server.agent_token)
    try:
        async with client.credential(revoke_in_background=True, **read_fields()) as read:
            broker.lock.acquire()  # the broker cannot answer a revocation until we let go
        try:
            assert not broker.state.grants[read.grant_id].revoked  # returned before the broker took it
        finally:
            broker.lock.release()
        assert await client.settle(10.0) == []
        assert broker.state.grants[read.grant_id].revoked

        held = client.credential(**read_fields(activity_id="4"))
        write = await held.__aenter__()
        broker.lock.acquire()
        leaving = asyncio.ensure_future(held.__aexit__(None, None, None))
        await asyncio.sleep(0.3)
        waited = not leaving.done()
        broker.lock.release()
        await leaving
        assert waited, "left before the broker answered the revocation"
        assert broker.state.grants[write.grant_id].revoked
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)



async def test_a_revocation_sent_while_the_broker_is_down_lands_later(broker_files: dict[str, Path]) -> None:
    broker = start_broker(broker_files)
    port = broker.port
    client = BrokerClient(broker.url, broker.agent_token)
    try:
        async with client.credential(**read_fields()) as cred:
            # The broker goes down while the activity holds its credential: the revocation on the way out fails.
            await asyncio.to_thread(broker.stop)
        assert client.retries.pending == [cred.grant_id]

        await asyncio.sleep(2.0)  # a few retries against a broker that is still down
        assert client.retries.pending == [cred.grant_id]

        broker = await asyncio.to_thread(start_broker, broker_files, port)  # same port, same state
        assert await client.retries.drain(15.0) == []
        assert client.retries.landed == [cred.grant_id]
        async with httpx.AsyncClient() as http:
            revoked = (await http.get(f"{broker.url}/v1/revoked")).json()["revoked"]
        assert cred.grant_id in revoked
        record = next(r for r in reversed(audit_events(broker)) if r["event"] == "revoke")
        assert record["grant_id"] == cred.grant_id and record["decision"] == "revoked"

        # And the target refuses the token from then on.
        verifier = await asyncio.to_thread(TargetVerifier.from_broker, broker.url, "fleet")
        try:
            with pytest.raises(TokenRejected, match="revoked"):
                verifier.verify(cred.token, verb="fleet.read", resource="service/checkout")
        finally:
            verifier.close()
    finally:
        await client.aclose()
        await asyncio.to_thread(broker.stop)


async def test_a_target_that_cannot_check_revocations_answers_503_and_takes_the_token_once_it_can(
    broker_files: dict[str, Path]
) -> None:
    """Fails closed, but retryably: a broker that is slow or restarting must not fail an incident.
    The refused attempt does not use the token up: the retry carries the same one."""
    broker = start_broker(broker_files)
    port = broker.port
    client = BrokerClient(broker.url, broker.agent_token)
    verifier = await asyncio.to_thread(TargetVerifier.from_broker, broker.url, "fleet", max_stale_s=1.0)
    try:
        async with client.credential(**read_fields(ttl_s=300)) as cred:
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(2.5)  # the revocation list is now older than max_stale_s
            with pytest.raises(TokenRejected, match="stale") as refused:
                verifier.verify(cred.token, verb="fleet.read", resource="service/checkout")
            assert refused.value.status == 503
            broker = await asyncio.to_thread(start_broker, broker_files, port)
            for _ in range(50):  # the poller catches up within a few of its 1 s intervals
                try:
                    verifier.verify(cred.token, verb="fleet.read", resource="service/checkout")
                    break
                except TokenRejected as exc:
                    assert exc.status == 503, exc
                    await asyncio.sleep(0.2)
            else:
                raise AssertionError("the target never took the token")
    finally:
        verifier.close()
        await client.aclose()
        await asyncio.to_thread(broker.stop)


async def test_a_revocation_that_lands_at_once_is_not_queued(broker_files: dict[str, Path]) -> None:
    broker = start_broker(broker_files)
    try:
        async with BrokerClient(broker.url, broker.agent_token) as client:
            async with client.credential(**read_fields()) as cred:
                pass
            assert client.retries.pending == []
        assert any(r["event"] == "revoke" and r["grant_id"] == cred.grant_id for r in audit_events(broker))
    finally:
        broker.stop()


async def test_retries_stop_once_the_token_has_expired_anyway() -> None:
    calls: list[str] = []

    async def down(grant_id: str) -> bool:
        calls.append(grant_id)
        raise ConnectionError("broker down")

    now = [1_000.0]
    retries = RevocationRetries(down, initial_delay_s=0.01, max_delay_s=0.02, clock=lambda: now[0])
    retries.submit("g1", expires_at=1_010.0)
    await asyncio.sleep(0.2)
    assert retries.pending == ["g1"] and len(calls) >= 2
    now[0] = 1_010.0 + 31  # past exp and every target's leeway: no target accepts it any more
    assert await retries.drain(2.0) == []
    assert retries.landed == []
    await retries.aclose()


async def test_the_queue_is_bounded_and_gives_up_on_the_token_closest_to_expiring() -> None:
    async def down(grant_id: str) -> bool:
        raise ConnectionError("broker down")

    retries = RevocationRetries(down, capacity=2, initial_delay_s=60)
    retries.submit("soon", expires_at=time.time() + 10)
    retries.submit("later", expires_at=time.time() + 600)
    retries.submit("latest", expires_at=time.time() + 900)
    assert sorted(retries.pending) == ["later", "latest"]
    await retries.aclose()


# -- the target's side: replay protection across a restart ---------------------------------------------


def test_a_token_replayed_after_a_target_restart_is_refused(tmp_path: Path, minter: Minter) -> None:
    path = replay_cache_path(tmp_path / "fleet")
    token = minter("fleet.read", "service/checkout")

    def serve(port: int = 0) -> FleetServer:
        verifier = TargetVerifier("fleet", {minter.kid: minter.key.public_key()}, replay_cache_path=path)
        return FleetServer(verifier=verifier, fleet=Fleet(), port=port, close_verifier=True).start()

    server = serve()
    port = server.port
    try:
        with httpx.Client(base_url=server.url, timeout=5) as http:
            assert http.get("/services/checkout", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            again = http.get("/services/checkout", headers={"Authorization": f"Bearer {token}"})
            assert again.status_code == 401 and "replayed" in again.json()["reason"]
    finally:
        server.stop()

    server = serve(port)  # a new process would start from the same file: nothing else carries over
    try:
        with httpx.Client(base_url=server.url, timeout=5) as http:
            replayed = http.get("/services/checkout", headers={"Authorization": f"Bearer {token}"})
            assert replayed.status_code == 401 and replayed.json()["reason"] == "token already used (replayed jti)"
            fresh = http.get("/services/checkout", headers=minter.headers("fleet.read", "service/checkout"))
            assert fresh.status_code == 200
    finally:
        server.stop()
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_the_fleet_process_keeps_its_jtis_in_its_state_dir(tmp_path: Path, broker_files: dict[str, Path]) -> None:
    """The real thing: `python -m demo.fleet --state-dir`, killed and started again, against a real broker."""
    broker = start_broker(broker_files)

    async def mint() -> str:
        async with BrokerClient(broker.url, broker.agent_token) as client:
            return (await client.mint(**read_fields())).token

    token = asyncio.run(mint())
    state, port = tmp_path / "fleet-state", free_port()

    def run_fleet() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "demo.fleet", "--port", str(port), "--broker-url", broker.url,
             "--state-dir", str(state), "--log-level", "warning"],
            cwd=REPO, env={k: v for k, v in os.environ.items() if k != "FIREBREAK_FLEET_STATE_DIR"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.poll() is None, "the fleet exited at start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    return process
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("the fleet did not start")

    def get(headers: dict[str, str]) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{port}/services/checkout", headers=headers, timeout=5)

    try:
        process = run_fleet()
        try:
            assert get({"Authorization": f"Bearer {token}"}).status_code == 200
        finally:
            process.kill()  # a crash, not a clean shutdown
            process.wait(10)
        process = run_fleet()
        try:
            replayed = get({"Authorization": f"Bearer {token}"})
            assert replayed.status_code == 401 and "replayed" in replayed.json()["reason"]
        finally:
            process.terminate()
            process.wait(10)
    finally:
        broker.stop()


# -- the replay file itself ----------------------------------------------------------------------------


def test_the_replay_file_forgets_only_expired_tokens_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "jtis.jsonl"
    now = time.time()
    cache = ReplayCache(path)
    assert cache.check_and_add("live", now + 300, now, leeway=5)
    assert cache.check_and_add("dead", now - 60, now - 120, leeway=5)
    cache.close()
    with path.open("a") as handle:
        handle.write('["torn", 12')  # a crash mid-write: that request was never served
    cache = ReplayCache(path)
    assert not cache.check_and_add("live", now + 300, now, leeway=5)
    assert cache.check_and_add("dead", now + 300, now, leeway=5)  # its token expired: refused as expired anyway
    assert cache.check_and_add("torn", now + 300, now, leeway=5)
    cache.close()


def test_the_replay_file_is_compacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("firebreak.replay_cache.PRUNE_AT", 10)
    path = tmp_path / "jtis.jsonl"
    cache = ReplayCache(path)
    now = time.time()
    for i in range(200):
        assert cache.check_and_add(f"old-{i}", now - 100, now, leeway=5)  # already dead
    assert cache.check_and_add("live", now + 300, now, leeway=5)
    cache.close()
    lines = path.read_text().splitlines()
    assert len(lines) < 50 and '["live", ' in path.read_text()
    assert not ReplayCache(path).check_and_add("live", now + 300, now, leeway=5)


@pytest.fixture(autouse=True)
def _no_inherited_fleet_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("FIREBREAK_FLEET_STATE_DIR", raising=False)
    yield
