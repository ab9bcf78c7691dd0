"""Nothing secret in history: tokens and a canary never reach history, logs or search attributes."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import uuid

import jwt
import pytest
from temporalio.testing import WorkflowEnvironment

from conftest import temporal_bin
from demo.fleet import FleetServer
from firebreak import signing
from firebreak.contracts import ApprovalOutcome, Phase
from incidents import inject, make_alert, open_incident, report_of, submit, wait_for_phase
from worker import build_worker

CANARY = f"CANARY-{uuid.uuid4().hex}"


def readable(exported: str) -> str:
    """The exported history with every payload's base64 data decoded next to it, so a search sees inside."""
    parts = [exported]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "data" and isinstance(value, str):
                    try:
                        parts.append(base64.b64decode(value).decode("utf-8", "replace"))
                    except ValueError:
                        pass
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(exported))
    return "\n".join(parts)


class RecordingVerifier:
    """The real target verifier, remembering every token it was shown (so the test knows them)."""

    def __init__(self, inner: signing.TargetVerifier) -> None:
        self.inner = inner
        self.tokens: list[str] = []

    def verify(self, token: str, *, verb: str, resource: str) -> dict:
        self.tokens.append(token)
        return self.inner.verify(token, verb=verb, resource=resource)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def recording_fleet(broker):
    verifier = RecordingVerifier(signing.TargetVerifier.from_broker(broker.url, "fleet"))
    with FleetServer(verifier=verifier, chaos_token="test-chaos", close_verifier=True) as server:
        server.fleet.response_extras = {"session_secret": CANARY}
        yield server, verifier


async def test_no_token_or_canary_in_history_logs_or_search_attributes(
    dev_env: WorkflowEnvironment, settings, broker, recording_fleet, approvers, caplog, capfd
):
    fleet, verifier = recording_fleet
    settings.targets["fleet"] = fleet.url
    caplog.set_level(logging.DEBUG)
    issuer = broker.broker.config.issuer
    broker.broker.config.issuer = CANARY  # the canary rides inside every token the broker issues
    try:
        inject(fleet.url, "checkout", "bad_deploy")
        async with build_worker(dev_env.client, settings):
            handle = await open_incident(dev_env.client, settings, make_alert("DrillRollback"))
            waiting = await wait_for_phase(handle, Phase.awaiting_approval)
            outcome = await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))
            assert outcome.counted
            report = await report_of(handle)
            description = await handle.describe()
    finally:
        broker.broker.config.issuer = issuer

    # The run used real credentials: a read, the write, the undo; and the target did answer with the canary.
    assert report.phase == Phase.rolled_back
    assert len(verifier.tokens) >= 3
    assert any(CANARY in json.dumps(jwt.decode(t, options={"verify_signature": False})) for t in verifier.tokens)
    grants = [report.status.steps[0].grant.grant_id, report.status.steps[0].rollback.grant.grant_id]

    exported = subprocess.run(
        [temporal_bin(), "workflow", "show", "--address", dev_env.client.service_client.config.target_host,
         "--workflow-id", handle.id, "--output", "json"],
        check=True, capture_output=True, text=True,
    ).stdout
    exported = readable(exported)
    assert all(g in exported for g in grants), "history should hold the grant ids"
    logs = caplog.text + "".join(capfd.readouterr())
    search_attributes = str(description.typed_search_attributes) + str(description.raw_description)
    for place, text in {"history": exported, "logs": logs, "search attributes": search_attributes}.items():
        assert CANARY not in text, f"canary found in {place}"
        for token in verifier.tokens:
            for part in token.split("."):
                assert part not in text, f"a token (or part of one) found in {place}"
