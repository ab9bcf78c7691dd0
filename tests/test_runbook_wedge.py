"""A runbook that cannot run is refused at load, and an incident that still meets one ends, escalated.

The wedge: a verification that queries Prometheus in a runbook that declares no Prometheus read. No
plan can be built from it (the verification read is the runbook's declared Prometheus read); before,
every incident failed its workflow task, retried forever and sat in ``diagnosing``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from temporalio.testing import WorkflowEnvironment

from firebreak.broker.runbooks import RunbookArchive
from firebreak.cli import main
from firebreak.contracts import Phase
from firebreak.intake import deliver_routed, route_alerts
from firebreak.runbook import Runbook, RunbookError, cannot_run, load_runbook
from incidents import inject, make_alert, receipt_signer, report_of
from worker import build_worker

TESTS = Path(__file__).resolve().parent
# The deadline drill (whose reads the broker declares) with a verification added: the broker's copy
# issues its reads, so the incident gets as far as building the plan.
WEDGE = (TESTS / "data" / "runbooks" / "drill-deadline.yaml").read_text().replace(
    'blast_radius: "{service}", timeout: 30s}',
    'blast_radius: "{service}", timeout: 30s,\n'
    '              verify: {query: \'rate(http_requests_total{service="{service}"}[1m])\', test: below, threshold: 1}}',
)
VERIFY_LINE = next(n for n, line in enumerate(WEDGE.splitlines(), start=1) if "verify:" in line)


def test_the_wedge_is_what_this_file_stages() -> None:
    book = Runbook.model_validate(yaml.safe_load(WEDGE))
    assert book.remediate.actions["restart"].verify is not None
    assert not any(spec.kind.startswith("prometheus") for spec in book.investigate)


def test_runbook_check_refuses_it_naming_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "wedge.yaml"
    path.write_text(WEDGE)
    assert main(["runbook", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:{VERIFY_LINE}: remediate.actions.restart.verify.query: " in err, err
    assert "declares no Prometheus read" in err
    with pytest.raises(RunbookError) as refused:
        load_runbook(path)
    assert (refused.value.line, refused.value.field) == (VERIFY_LINE, "remediate.actions.restart.verify.query")


def test_the_broker_refuses_to_load_it(tmp_path: Path) -> None:
    source = tmp_path / "runbooks"
    source.mkdir()
    (source / "wedge.yaml").write_text(WEDGE)
    with pytest.raises(RunbookError, match="verify.query"):
        RunbookArchive.load(source, tmp_path / "archive")


def test_a_metric_condition_on_evidence_that_is_not_a_metric_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "condition.yaml"
    drill = (TESTS / "data" / "runbooks" / "drill-deadline.yaml").read_text()
    path.write_text(drill.replace("{evidence: changes, test: recent_change, within: 30m}",
                                  "{evidence: changes, test: above, threshold: 1}"))
    with pytest.raises(RunbookError) as refused:
        load_runbook(path)
    assert refused.value.field == "diagnose.0.conditions.0.evidence"
    assert "not a Prometheus read" in refused.value.problem


async def test_forced_past_the_check_it_fails_the_incident_and_escalates(
    dev_env: WorkflowEnvironment, settings, fleet
):
    book = Runbook.model_validate(yaml.safe_load(WEDGE))  # the model alone: no load-time check
    assert cannot_run(book) is not None
    inject(fleet.url, "checkout", "bad_deploy")
    routing = route_alerts([book], [make_alert("DrillDeadline", "checkout")])
    [routed] = routing.routed
    routed.incident_id = f"{routed.incident_id}-wedge-{id(routed) % 100000}"
    async with build_worker(dev_env.client, settings):
        delivered = await deliver_routed(dev_env.client, routed, task_queue=settings.temporal.task_queue,
                                         receipt=receipt_signer(settings.state_dir, None))
        assert delivered.handle is not None
        report = await asyncio.wait_for(report_of(delivered.handle), 60)
    assert report.phase == Phase.failed, report.outcome
    assert "the runbook cannot run" in report.outcome and "remediate.actions.restart.verify.query" in report.outcome
    assert report.status.plan is None and report.status.steps == []
    path = settings.state_dir / "notifications.jsonl"
    sent = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    escalations = [n for n in sent if n["incident_id"] == delivered.handle.id and n["kind"] == "escalation"]
    assert escalations and "the runbook cannot run" in escalations[0]["summary"]


@pytest.mark.integration
def test_the_worker_refuses_to_start_with_it(tmp_path: Path) -> None:
    runbooks = tmp_path / "runbooks"
    runbooks.mkdir()
    (runbooks / "wedge.yaml").write_text(WEDGE)
    env = {**os.environ, "FIREBREAK_RUNBOOKS_DIR": str(runbooks), "FIREBREAK_STATE_DIR": str(tmp_path / "state"),
           "FIREBREAK_TEMPORAL_ADDRESS": "127.0.0.1:9"}  # nothing listens: it must stop before connecting
    done = subprocess.run([sys.executable, str(TESTS.parent / "worker.py")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert f"worker refused to start: {runbooks / 'wedge.yaml'}:{VERIFY_LINE}: " \
           "remediate.actions.restart.verify.query: " in done.stderr, done.stderr
