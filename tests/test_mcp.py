"""`firebreak mcp` (issue 31): AI agents read and propose over MCP; only people approve.

Driven with the mcp SDK's own client, over stdio (the real `firebreak mcp` command in a subprocess)
and over streamable HTTP (the real app under uvicorn), on the real dev server, worker, broker and fleet.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from conftest import Approvers
from incidents import inject, report_of, submit, wait_for_phase
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from temporalio.testing import WorkflowEnvironment

from firebreak import signing
from firebreak.contracts import Phase, Receipt
from firebreak.mcp.cli import components, http_app
from firebreak.mcp.identity import (
    AuditLog,
    audit_path,
    create_agent,
    ensure_demo_agent,
    read_token_file,
    revoke_agent,
)
from firebreak.mcp.server import build_server
from firebreak.receipts import agent_signer
from firebreak.roster import Roster
from firebreak.stack import ensure_demo_roster
from worker import build_worker

SHARED_FIXTURES = Path("/work/shared/fixtures")
HOSTILE = json.loads((SHARED_FIXTURES / "hostile_promql_breakout.json").read_text())["alerts"][0]["labels"] \
    if (SHARED_FIXTURES / "hostile_promql_breakout.json").exists() else {
        "alertname": "HighErrorRate", "namespace": "shop", "service": 'checkout"} or vector(1) or {a="'}


@pytest.fixture
def mcp_state(tmp_path: Path, dev_env: WorkflowEnvironment, settings) -> Path:
    """A state dir whose stack.json points `firebreak mcp` at the test servers and the session's roster."""
    stack = {"settings": {
        "temporal": {"address": dev_env.client.service_client.config.target_host,
                     "task_queue": settings.temporal.task_queue,
                     "payload_key_file": settings.temporal.payload_key_file},
        "roster": str(settings.resolved_roster()),
        "runbooks_dir": str(settings.resolved_runbooks_dir()),
        "targets": settings.targets,
    }}
    (tmp_path / "stack.json").write_text(json.dumps(stack))
    return tmp_path


def _agent(mcp_state: Path, settings, **kw: Any) -> tuple[str, str]:
    name = f"assistant-{uuid.uuid4().hex[:6]}"
    return name, read_token_file(create_agent(mcp_state, settings.resolved_roster(), name, "bob", **kw))


def _stdio(mcp_state: Path, token_file: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "firebreak.cli", "mcp", "--token-file", str(token_file),
                                     "--state-dir", str(mcp_state)],
        env={"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "FIREBREAK_STATE_DIR": str(mcp_state)},
    )


def _data(result: Any) -> Any:
    assert not result.is_error, result.content
    if result.structured_content is not None:
        content = result.structured_content
        return content.get("result", content) if set(content) == {"result"} else content
    return json.loads(result.content[0].text)


def _error(result: Any) -> str:
    assert result.is_error, result
    return result.content[0].text


def _audit(mcp_state: Path, agent: str) -> list[dict[str, Any]]:
    return [e for e in AuditLog(audit_path(mcp_state)).entries() if e["agent"] == agent]


async def _no_open_incident(env: WorkflowEnvironment, incident_id: str) -> None:
    from temporalio.client import WorkflowExecutionStatus
    from temporalio.service import RPCError

    handle = env.client.get_workflow_handle(incident_id)
    try:
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("another test's incident: test_mcp proposes this one anew")
    except RPCError:
        pass  # none yet


# -- the whole path, over stdio --------------------------------------------------------------


async def test_agent_proposes_owner_cannot_approve_another_approver_resolves_over_stdio(
    dev_env: WorkflowEnvironment, settings, fleet, mcp_state: Path, approvers: Approvers,
) -> None:
    inject(fleet.url, "checkout", "bad_deploy")
    await _no_open_incident(dev_env, "checkout.drill-pair")  # the id is the runbook's: the session's servers are shared
    agent, _ = _agent(mcp_state, settings)
    hypothesis = "the 14:02 deploy broke checkout <img src=x onerror=alert(1)> [see](http://evil.example)"
    async with build_worker(dev_env.client, settings):
        async with Client(_stdio(mcp_state, mcp_state / "agents" / f"{agent}.token")) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert tools == {"list_incidents", "get_incident", "get_history", "privileges", "propose_remediation"}
            mine = _data(await client.call_tool("privileges", {}))
            assert mine["agent"] == agent and mine["owner"] == "bob"
            proposed = _data(await client.call_tool("propose_remediation", {
                "runbook": "drill-pair", "labels": {"alertname": "DrillPair", "service": "checkout"},
                "hypothesis": hypothesis}))
            incident = proposed["incident_id"]
            assert incident == "checkout.drill-pair" and proposed["requester"] == "bob"
            handle = dev_env.client.get_workflow_handle(incident)
            try:
                waiting = await wait_for_phase(handle, Phase.awaiting_approval)
                # The runbook chose the plan: its own actions, whatever the hypothesis said.
                assert [s.verb for s in waiting.plan.steps] == ["fleet.restart", "fleet.scale"]
                assert waiting.plan.requesters == ["bob"] and waiting.requested_by == "bob"
                assert waiting.steps == []  # nothing ran: no write without a human approval
                card = _data(await client.call_tool("get_incident", {"incident_id": incident}))
                assert card["phase"] == "awaiting_approval" and card["requested_by"] == "bob"

                # The agent's owner raised it through the agent: separation of duties refuses bob.
                refused = await submit(handle, approvers.approval("bob", incident, waiting.plan_hash))
                assert not refused.counted and "bob requested this incident and cannot approve it" in refused.reason
                counted = await submit(handle, approvers.approval("alice", incident, waiting.plan_hash, steps=["s2"]))
                assert counted.counted, counted.reason
                report = await report_of(handle)
                assert report.phase == Phase.resolved, report.status.outcome
            finally:
                if (await handle.describe()).status.name == "RUNNING":  # only when a check above failed
                    await handle.terminate("test over")

            history = _data(await client.call_tool("get_history", {"incident_id": incident}))
            text = json.dumps(history)
            assert f"signal alert: 1 firing (raised for bob by agent {agent})" in [row["detail"] for row in history]
            assert "execute s2: fleet.scale on service/checkout" in text
    # The UI's static details show the hypothesis escaped into inert markdown.
    details = await (await handle.describe()).static_details() or ""
    assert "\\<img src=x onerror=alert(1)\\>" in details and "\\[see\\](http://evil.example)" in details
    calls = _audit(mcp_state, agent)
    assert [(c["tool"], c["outcome"]) for c in calls] == [
        ("privileges", "ok"), ("propose_remediation", "ok"), ("get_incident", "ok"), ("get_history", "ok")]
    assert all(c["owner"] == "bob" and c["transport"] == "stdio" and len(c["arguments_sha256"]) == 64 for c in calls)
    assert hypothesis not in (audit_path(mcp_state)).read_text()  # digests only, never the arguments


# -- HTTP: reads, hostile arguments, tokens ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def http_mcp(mcp_state: Path, settings) -> AsyncIterator[tuple[str, Any]]:
    from firebreak.config import load_settings

    fb = components(load_settings(mcp_state))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(http_app(build_server(fb), fb), host="127.0.0.1", port=port,
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/mcp", fb
    finally:
        server.should_exit = True
        await task


def _http(url: str, token: str | None) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Client(streamable_http_client(url, http_client=create_mcp_http_client(headers=headers)))


async def _workflow_count(env: WorkflowEnvironment) -> int:
    return (await env.client.count_workflows("WorkflowType = 'IncidentWorkflow'")).count


async def test_hostile_arguments_are_refused_naming_the_field_and_change_nothing_over_http(
    dev_env: WorkflowEnvironment, settings, mcp_state: Path, http_mcp: tuple[str, Any],
) -> None:
    url, _ = http_mcp
    agent, token = _agent(mcp_state, settings)
    before = await _workflow_count(dev_env)
    async with _http(url, token) as client:
        names = [t.name for t in (await client.list_tools()).tools]
        assert not [n for n in names if any(w in n for w in ("approve", "reject", "mint", "thaw", "grant"))]
        breakout = _error(await client.call_tool("propose_remediation", {
            "runbook": "bad-deploy", "labels": HOSTILE, "hypothesis": "checkout is down"}))
        assert breakout.startswith("Error executing tool") and "labels.service" in breakout
        huge = _error(await client.call_tool("propose_remediation", {
            "runbook": "bad-deploy", "labels": {"service": "checkout", "namespace": "shop"},
            "hypothesis": "x" * (1 << 20)}))
        assert huge == "refused: hypothesis: String should have at most 1500 characters"
        unknown = _error(await client.call_tool("propose_remediation", {
            "runbook": "drop-database", "labels": {"service": "checkout"}, "hypothesis": "h"}))
        assert "runbook: no runbook named 'drop-database'" in unknown
        for bad_id in ("*", "checkout.drill-pair' OR 1=1", "../../other-agent"):
            assert _error(await client.call_tool("get_incident", {"incident_id": bad_id})).startswith(
                "refused: incident_id: String should match pattern")
        with pytest.raises(MCPError, match="no tool 'approve'"):
            await client.call_tool("approve", {"incident_id": "checkout.drill-pair"})
        # What an agent may read before it proposes: the runbooks and their schema.
        uris = {str(r.uri) for r in (await client.list_resources()).resources}
        assert {"firebreak://runbooks/schema.json", "firebreak://runbooks/bad-deploy"} <= uris
        schema = json.loads((await client.read_resource("firebreak://runbooks/schema.json")).contents[0].text)
        assert "remediate" in schema["properties"]
    assert await _workflow_count(dev_env) == before
    outcomes = [(c["tool"], c["outcome"], c["transport"]) for c in _audit(mcp_state, agent)]
    assert outcomes[:3] == [("propose_remediation", "refused", "http")] * 3
    assert ("approve", "refused", "http") in outcomes and len(outcomes) == 7


async def test_expired_revoked_and_missing_tokens_are_refused_and_recorded(
    dev_env: WorkflowEnvironment, settings, mcp_state: Path, http_mcp: tuple[str, Any],
) -> None:
    url, _ = http_mcp
    expired, expired_token = _agent(mcp_state, settings, expires=datetime.now(UTC) - timedelta(minutes=1))
    with pytest.raises(Exception):  # noqa: B017 - 401: the SDK's client raises, whatever the class
        async with _http(url, expired_token) as client:
            await client.list_tools()
    with pytest.raises(Exception):  # noqa: B017
        async with _http(url, None) as client:
            await client.list_tools()
    # Over stdio the command refuses to start for an expired agent.
    with pytest.raises(Exception):  # noqa: B017
        async with Client(_stdio(mcp_state, mcp_state / "agents" / f"{expired}.token")) as client:
            await client.list_tools()

    revoked, token = _agent(mcp_state, settings)
    async with _http(url, token) as client:
        assert _data(await client.call_tool("privileges", {}))["agent"] == revoked
        revoke_agent(settings.resolved_roster(), revoked)
        with pytest.raises(Exception):  # noqa: B017 - 401 on the next request of the same session
            await client.call_tool("privileges", {})
    # Each refused request is recorded (the SDK's client may try more than one request before it gives up).
    assert {(e["tool"], e["outcome"], e["transport"]) for e in _audit(mcp_state, expired)} == {
        ("connect", "refused", "http"), ("connect", "refused", "stdio")}
    assert all("expired at" in e["detail"] for e in _audit(mcp_state, expired))
    assert [(e["tool"], e["outcome"], e["detail"]) for e in _audit(mcp_state, revoked)] == [
        ("privileges", "ok", ""), ("connect", "refused", f"agent '{revoked}' is revoked")]
    anonymous = [e for e in AuditLog(audit_path(mcp_state)).entries() if e["agent"] is None]
    assert anonymous and "no agent token" in anonymous[-1]["detail"]


# -- without servers: rate limits, receipts, the roster ------------------------------------------


async def test_rate_limit_per_agent_refuses_and_records(tmp_path: Path) -> None:
    from firebreak.config import Settings

    roster = ensure_demo_roster(tmp_path)
    token = read_token_file(create_agent(tmp_path, roster, "one", "bob"))
    fb = components(Settings(state_dir=tmp_path, roster=roster), calls_per_minute=2, stdio_token=token)
    async with Client(build_server(fb)) as client:
        for _ in range(2):
            assert _data(await client.call_tool("privileges", {}))["agent"] == "one"
        with pytest.raises(MCPError, match="rate limit: agent 'one' made 2 calls in the last minute"):
            await client.call_tool("privileges", {})
    assert [e["outcome"] for e in AuditLog(audit_path(tmp_path)).entries() if e["agent"] == "one"] == [
        "ok", "ok", "refused"]
    # Every call authenticates again: a token revoked mid-session is refused at its next call, and recorded.
    fb = components(Settings(state_dir=tmp_path, roster=roster), stdio_token=token)
    async with Client(build_server(fb)) as client:
        assert _data(await client.call_tool("privileges", {}))["agent"] == "one"
        revoke_agent(roster, "one")
        with pytest.raises(MCPError, match="refused: agent 'one' is revoked"):
            await client.call_tool("list_incidents", {})
    assert AuditLog(audit_path(tmp_path)).entries()[-1] | {"at": "", "arguments_sha256": ""} == {
        "at": "", "agent": "one", "owner": "bob", "tool": "list_incidents", "arguments_sha256": "",
        "outcome": "refused", "detail": "agent 'one' is revoked", "transport": "stdio"}
    # Per agent: another agent is not held back by the first one's calls; proposals have their own window.
    limits = fb.gate.limits
    assert limits.admit("two", proposal=False) is None
    limits.proposals_per_hour = 1
    assert limits.admit("three", proposal=True, now=0.0) is None
    assert "proposals in the last hour" in (limits.admit("three", proposal=True, now=1.0) or "")
    assert limits.admit("three", proposal=True, now=3601.0) is None


def test_agent_receipts_name_the_owner_and_agents_never_approve(tmp_path: Path) -> None:
    roster_path = ensure_demo_roster(tmp_path)
    create_agent(tmp_path, roster_path, "assistant", "bob")
    roster = Roster.load(roster_path)
    key = signing.load_private_key(tmp_path / "mcp" / "keys" / "assistant.pem")
    receipt = agent_signer("assistant", "bob", key)("checkout.drill-pair")
    assert (receipt.signer, receipt.requested_by) == ("assistant", "bob")
    assert signing.verify_receipt(receipt, roster, []) is None
    # Naming anyone but its owner, or signed with another key, does not verify.
    forged = signing.sign_receipt(Receipt(incident_id="x", requested_by="alice", signer="assistant",
                                          issued_at=receipt.issued_at), key)
    assert "signs only for its owner 'bob'" in (signing.verify_receipt(forged, roster, []) or "")
    other = agent_signer("assistant", "bob", signing.generate_key())("checkout.drill-pair")
    assert "does not verify" in (signing.verify_receipt(other, roster, []) or "")
    # An agent is not a person: no approval can be verified in its name.
    assert roster.get("assistant") is None and roster.agent("assistant") is not None
    revoke_agent(roster_path, "assistant")
    assert "is revoked" in (signing.verify_receipt(receipt, Roster.load(roster_path), []) or "")
    # Appending a `firebreak keys new` entry still adds a person.
    with roster_path.open("a") as f:
        f.write('  - name: "dave"\n    groups: ["oncall"]\n    public_key: |\n      '
                + signing.public_pem(signing.generate_key()).strip().replace("\n", "\n      ") + "\n")
    assert Roster.load(roster_path).get("dave") is not None
    assert not (tmp_path / "agents" / "assistant.token").stat().st_mode & 0o077
    assert "fbagent_" not in roster_path.read_text()


def test_the_stack_creates_one_demo_agent_owned_by_bob(tmp_path: Path) -> None:
    roster = ensure_demo_roster(tmp_path)
    first = ensure_demo_agent(tmp_path, roster)
    token = read_token_file(first)
    assert ensure_demo_agent(tmp_path, roster) == first == tmp_path / "agents" / "assistant.token"
    assert read_token_file(first) == token  # not rotated by a second `up`
    loaded = Roster.load(roster)
    assert [(a.name, a.owner) for a in loaded.agents] == [("assistant", "bob")]
    assert loaded.agent_by_token(token) == loaded.agent("assistant") and loaded.agent_by_token(token + "x") is None
    assert first.stat().st_mode & 0o777 == 0o600


def test_a_flood_of_refusals_is_counted_not_written_line_by_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from firebreak.mcp import identity

    roster = ensure_demo_roster(tmp_path)
    gate = identity.AgentGate(roster, AuditLog(audit_path(tmp_path)))
    clock = [1000.0]
    monkeypatch.setattr(identity.time, "monotonic", lambda: clock[0])
    for _ in range(gate.REFUSALS_RECORDED_PER_MINUTE + 5):
        gate.refuse("fbagent_guessed", "connect", None, "agent token: not a token of any agent in the roster", "http")
    assert len(AuditLog(audit_path(tmp_path)).entries()) == gate.REFUSALS_RECORDED_PER_MINUTE
    clock[0] += 61
    gate.refuse(None, "connect", None, "no agent token", "http")
    last = AuditLog(audit_path(tmp_path)).entries()[-1]
    assert last["agent"] is None and last["detail"] == (
        "no agent token (and 5 earlier refusal(s) over the recording limit, not recorded one by one)")


def test_mcp_agent_command_adds_and_revokes_agents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from firebreak.cli import main

    roster = ensure_demo_roster(tmp_path)
    sd = ["--state-dir", str(tmp_path)]
    assert main(["mcp-agent", "add", "helper", "--owner", "carol", "--tool", "privileges", *sd]) == 0
    helper = Roster.load(roster).agent("helper")
    assert helper is not None and helper.owner == "carol" and helper.tools == ["privileges"] and not helper.revoked
    assert helper.token_sha256 == hashlib.sha256(read_token_file(tmp_path / "agents" / "helper.token").encode()).hexdigest()
    assert main(["mcp-agent", "add", "alice", "--owner", "bob", *sd]) == 1  # a person's name
    assert main(["mcp-agent", "add", "other", "--owner", "nobody", *sd]) == 1
    assert main(["mcp-agent", "add", "other", "--owner", "bob", "--tool", "approve", *sd]) == 2
    assert "no tool ['approve']" in capsys.readouterr().err
    assert main(["mcp-agent", "revoke", "helper", *sd]) == 0
    assert Roster.load(roster).agent("helper").refusal() == "agent 'helper' is revoked"  # type: ignore[union-attr]
    assert [a.name for a in Roster.load(roster).agents] == ["helper"]


def test_privileges_lock_the_mcp_tools_and_diff_fails_on_a_new_write_capable_tool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from firebreak import privileges
    from firebreak.cli import main
    from firebreak.mcp.tools import tools_report
    from firebreak.runbook import default_runbook_dir, load_runbooks

    lock = Path(__file__).resolve().parent.parent / privileges.LOCK_FILE
    baseline = privileges.load_lock(lock)
    assert baseline["mcp_tools"] == tools_report() and not any(t["writes"] for t in baseline["mcp_tools"])
    current = privileges.report(load_runbooks(default_runbook_dir()))
    assert privileges.diff(baseline, current) == ([], [])
    wider = {**current, "mcp_tools": [*current["mcp_tools"],
                                      {"name": "approve", "kind": "write", "does": "x", "writes": True}]}
    assert privileges.diff(baseline, wider)[0] == ["new MCP tool for AI agents: approve (write, WRITE-CAPABLE)"]
    flipped = {**current, "mcp_tools": [t | {"writes": True} if t["name"] == "get_incident" else t
                                        for t in current["mcp_tools"]]}
    assert privileges.diff(baseline, flipped)[0] == ["MCP tool get_incident: read -> read, now WRITE-CAPABLE"]
    # `firebreak privileges` lists each agent's tools.
    roster = ensure_demo_roster(tmp_path)
    create_agent(tmp_path, roster, "reader", "bob", tools=["get_incident"])
    assert main(["privileges", "--json", "--state-dir", str(tmp_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(a["name"], a["owner"], a["tools"]) for a in shown["agents"]] == [("reader", "bob", ["get_incident"])]
