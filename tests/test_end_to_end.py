"""End to end on the real dev server, with real Prometheus scraping the demo fleet.

A bad deploy is injected; the incident must name the deploy, propose the
rollback, execute it on approval, see the error rate recover and resolve. Its
history must then replay without nondeterminism.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from conftest import needs, poll_until
from firebreak.contracts import ApprovalOutcome, Phase
from firebreak.history import history_rows
from incidents import inject, make_alert, open_incident, report_of, submit, wait_for_phase
from worker import build_worker
from workflows.incident import IncidentWorkflow

ERROR_RATIO = ('sum(rate(http_requests_total{namespace="shop",service="checkout",code=~"5.."}[1m])) / '
               'sum(rate(http_requests_total{namespace="shop",service="checkout"}[1m]))')

pytestmark = needs("prometheus")


async def test_bad_deploy_is_diagnosed_rolled_back_verified_and_replays(
    dev_env: WorkflowEnvironment, settings, fleet, scraped_prometheus, approvers, tmp_path: Path
):
    settings.targets["prometheus"] = scraped_prometheus.url
    healthy = fleet.fleet.service_state("checkout")["version"]
    bad = inject(fleet.url, "checkout", "bad_deploy")["version"]
    await asyncio.to_thread(poll_until, lambda: (scraped_prometheus.query_value(ERROR_RATIO) or 0) > 0.05, 60, "5xx > 5%")

    client = dev_env.client
    async with build_worker(client, settings):
        alert_sent = time.monotonic()
        handle = await open_incident(client, settings, make_alert("HighErrorRate"), requested_by="bob")
        waiting = await wait_for_phase(handle, Phase.awaiting_approval, timeout=15)
        assert time.monotonic() - alert_sent < 15

        top = waiting.hypotheses[0]
        assert top.id == "bad_deploy", [(h.id, h.score) for h in waiting.hypotheses]
        jump = next(f for f in top.findings if f.test == "rose_after_change")
        assert jump.held and bad in jump.detail, jump.detail
        assert [(s.action, s.verb, s.resource) for s in waiting.plan.steps] == [
            ("rollback", "fleet.rollback", "service/checkout")]
        assert not waiting.gaps
        assert all(e.grant is not None for e in waiting.evidence)

        refused = await submit(handle, approvers.approval("bob", handle.id, waiting.plan_hash))
        assert not refused.counted and "requested this incident" in refused.reason
        outcome = await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))
        assert outcome.counted, outcome.reason
        report = await asyncio.wait_for(report_of(handle), timeout=240)

        assert report.phase == Phase.resolved, report.outcome
        [step] = report.status.steps
        assert step.status == "succeeded" and step.verified is True, step
        assert fleet.fleet.service_state("checkout")["version"] == healthy

        async def resolved_ids() -> list[str]:
            return [w.id async for w in client.list_workflows('FirebreakPhase="resolved"')]

        for _ in range(50):
            if handle.id in await resolved_ids():
                break
            await asyncio.sleep(0.2)
        assert handle.id in await resolved_ids()

        history = await handle.fetch_history()

    # Read and replayed with the converter it was written with: the MACs are checked too.
    rows = await history_rows(history, client.data_converter)
    details = "\n".join(r[3] for r in rows)
    assert "investigate error_rate" in details and "execute s1: fleet.rollback on service/checkout" in details
    assert "grant " in details and "REFUSED: bob requested this incident" in details

    replayer = Replayer(workflows=[IncidentWorkflow], data_converter=client.data_converter)
    await replayer.replay_workflow(WorkflowHistory.from_json(handle.id, history.to_json()))

    # `firebreak privileges --usage` after the incident: what it used, with counts, and the never-used flagged.
    # The session's other tests may have used every shipped privilege by now: one runbook grants a
    # privilege nothing ever uses.
    runbooks = tmp_path / "runbooks"
    shutil.copytree(settings.runbooks_dir, runbooks)
    (runbooks / "drill-unused.yaml").write_text(
        (Path(settings.runbooks_dir) / "drill-pair.yaml").read_text()
        .replace("name: drill-pair", "name: drill-unused").replace("DrillPair", "DrillUnused")
        .replace("{service}.drill-pair", "{service}.drill-unused")
        .replace('verb: fleet.scale, resource: "service/{service}"', 'verb: fleet.scale, resource: "replicaset/{service}"'))
    usage = await asyncio.to_thread(
        privileges_usage, "--state-dir", str(settings.state_dir), "--runbooks-dir", str(runbooks))
    rows = {f"{r['kind']} {r['target']} {r['verb']} {r['resource']}": r for r in usage["privileges"]}
    for used in ("write fleet fleet.rollback service/{service}", "read fleet fleet.read service/{service}",
                 "read prometheus metrics.read namespace/{namespace}"):
        assert rows[used]["uses"] >= 1 and rows[used]["last_used"], (used, rows[used])
    assert "write fleet fleet.scale replicaset/{service}" in usage["never_used"], usage["never_used"]
    assert set(usage["never_used"]) == {k for k, r in rows.items() if r["uses"] == 0}
    text = await asyncio.to_thread(
        privileges_usage, "--state-dir", str(settings.state_dir), "--runbooks-dir", str(runbooks), as_json=False)
    assert f"unused: {usage['never_used'][0]} (a candidate for removal)" in text
    assert any(line.split()[0].isdigit() and int(line.split()[0]) >= 1 and "fleet.rollback" in line
               for line in text.splitlines() if line.strip())


def privileges_usage(*args: str, as_json: bool = True) -> Any:
    """`firebreak privileges --usage` as an operator runs it (the console script's module)."""
    result = subprocess.run([sys.executable, "-m", "firebreak.cli", "privileges", "--usage",
                             *(["--json"] if as_json else []), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if as_json else result.stdout
