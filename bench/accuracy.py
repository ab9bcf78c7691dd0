"""Diagnosis accuracy on the real pipeline: faults go in, incidents open by themselves.

    python -m bench.accuracy                 # 21 trials of each fault kind (63 in all)
    python -m bench.accuracy --quick         # one trial of each fault kind
    python -m bench.accuracy --propose-only  # stop at the proposal: no approval, no remediation

Starts its own stack with ``firebreak.stack.up`` in a state dir of its own, on free ports: the
Temporal dev server, the broker, the demo fleet, Prometheus and Alertmanager with the demo rules,
the intake API and a worker. No ``firebreak alert``: each fault is injected with
``POST /demo/faults``, Prometheus evaluates the rules, Alertmanager posts to the API, and the API
opens the incident, with the alert's real ``startsAt``.

Each round injects one fault on each demo service at the same time, rotating the kinds (a Latin
square: every service gets every kind in turn). A trial:

1. waits until the service has no pending or firing alert, so the alert it causes is a new one
   with its own ``startsAt`` (not the tail of the last trial's);
2. injects the fault and waits for the incident: time to open, time to the proposal, top hypothesis;
3. approves as ``alice`` (on call) and waits for the incident to close, or with
   ``--propose-only`` clears the fault at once and lets the incident resolve itself;
4. clears the fault, waits until the service's alerts are inactive and every other run for it
   has closed (a follow-up alert after the fix, or a wrong runbook, is recorded against the trial);
5. resets the service (``kind: reset``): its initial version and replicas, and a change log with
   only its original deploy, so the next trial's 30-minute change lookback sees nothing of this one.

Prints the confusion matrix (fault injected against top hypothesis), the outcomes with false
escalations, and the seconds to open and to propose; writes every trial to ``accuracy.json`` in the
state dir (and ``--json PATH``). Exit code 0 when every trial is right, 1 when one is not, 2 when
the pipeline cannot run here (Prometheus or Alertmanager missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

ROOT = Path(__file__).resolve().parent.parent

from bench.accuracy_report import EXPECTED, FAULTS, Run, Trial, incident_id, render  # noqa: E402
from demo.prom import free_port  # noqa: E402
from firebreak import signing, stack  # noqa: E402
from firebreak.config import load_settings  # noqa: E402
from firebreak.contracts import Approval, ApprovalOutcome, IncidentReport, IncidentStatus, Phase  # noqa: E402
from firebreak.incidents import approval_outcome, final_report  # noqa: E402
from firebreak.temporal import connect  # noqa: E402

SERVICES = ("checkout", "payments", "inventory")  # the demo fleet's services
APPROVER = "alice"  # on call; alerts from Alertmanager name no person, so she may approve


class Pipeline:
    """The running stack as a trial sees it: the fleet's demo control, Prometheus, Temporal."""

    def __init__(self, info: dict[str, Any], client: Client, http: httpx.AsyncClient) -> None:
        self.client = client
        self.http = http
        self.fleet_url = info["components"]["fleet"]
        self.prometheus_url = info["components"]["prometheus"]
        self.chaos_token = info["demo"]["chaos_token"]
        self.approver_key = signing.load_private_key(info["demo"]["keys"][APPROVER])

    async def fault(self, service: str, kind: str) -> dict[str, Any]:
        response = await self.http.post(f"{self.fleet_url}/demo/faults", json={"service": service, "kind": kind},
                                        headers={"Authorization": f"Bearer {self.chaos_token}"})
        response.raise_for_status()
        return dict(response.json())

    async def active_alerts(self, service: str) -> list[str]:
        """Prometheus's pending and firing alerts for this service (resolved ones are inactive)."""
        response = await self.http.get(f"{self.prometheus_url}/api/v1/alerts")
        response.raise_for_status()
        return [f"{a['labels'].get('alertname')} {a['state']}" for a in response.json()["data"]["alerts"]
                if a["labels"].get("service") == service and a["state"] in ("pending", "firing")]

    async def wait_quiet(self, service: str, timeout: float) -> list[str]:
        """Until the service has had no active alert for two checks in a row; what is still active."""
        deadline, calm = time.monotonic() + timeout, 0
        active: list[str] = []
        while time.monotonic() < deadline:
            active = await self.active_alerts(service)
            calm = 0 if active else calm + 1
            if calm >= 2:
                return []
            await asyncio.sleep(1.0)
        return active

    async def scrapes(self) -> float:
        response = await self.http.get(f"{self.prometheus_url}/api/v1/query", params={"query": "count_over_time(up[1m])"})
        result = response.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    async def new_run(self, incident: str, since: datetime, timeout: float) -> tuple[WorkflowHandle, datetime] | None:
        """The run of ``incident`` that started after ``since``, once the API has opened it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                description = await self.client.get_workflow_handle(incident).describe()
                if description.start_time >= since - timedelta(seconds=1):
                    handle = self.client.get_workflow_handle(incident, run_id=description.run_id,
                                                             result_type=IncidentReport)
                    return handle, description.start_time
            except Exception:  # noqa: BLE001 - not found yet: Alertmanager has not sent the alert
                pass
            await asyncio.sleep(0.25)
        return None

    async def status(self, handle: WorkflowHandle) -> IncidentStatus | None:
        try:
            return await handle.query("status", result_type=IncidentStatus)
        except Exception:  # noqa: BLE001 - the first workflow task may not have run yet
            return None

    async def approve(self, handle: WorkflowHandle, plan_hash: str) -> ApprovalOutcome:
        approval = signing.sign_approval(Approval(
            workflow_id=handle.id, plan_hash=plan_hash, decision="approve", nonce=uuid.uuid4().hex,
            expires_at=(datetime.now(UTC) + timedelta(minutes=15)).isoformat(timespec="seconds"),
            approver=APPROVER, comment="bench/accuracy.py",
        ), self.approver_key)
        return await approval_outcome(handle, approval)  # a refused approval fails its update

    async def report(self, handle: WorkflowHandle, timeout: float) -> IncidentReport | None:
        try:
            return await asyncio.wait_for(final_report(handle), timeout=timeout)  # endings needing a human fail the run
        except TimeoutError:
            return None

    async def runs_since(self, service: str, since: datetime) -> list[tuple[str, str, bool]]:
        """(incident id, run id, running) of every incident of this service started after ``since``."""
        ids = ", ".join(f"'{incident_id(f, service)}'" for f in FAULTS)
        query = f"WorkflowId IN ({ids}) AND StartTime >= '{since.isoformat().replace('+00:00', 'Z')}'"
        return [(wf.id, wf.run_id, wf.status == WorkflowExecutionStatus.RUNNING)
                async for wf in self.client.list_workflows(query)]


def _top(status: IncidentStatus | None) -> tuple[str | None, float | None, dict[str, float]]:
    if status is None or not status.hypotheses:
        return None, None, {}
    return status.hypotheses[0].id, status.hypotheses[0].score, {h.id: h.score for h in status.hypotheses}


async def run_trial(p: Pipeline, trial: Trial, *, open_timeout: float, close_timeout: float) -> None:
    try:
        await _run_trial(p, trial, open_timeout=open_timeout, close_timeout=close_timeout)
    except Exception as exc:  # noqa: BLE001 - a broken trial is reported, and the next one still runs
        trial.error = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            await p.fault(trial.service, "clear")
            await p.wait_quiet(trial.service, 120)
            await p.fault(trial.service, "reset")
        except Exception as exc:  # noqa: BLE001
            trial.error = trial.error or f"cleanup: {type(exc).__name__}: {exc}"


async def _run_trial(p: Pipeline, trial: Trial, *, open_timeout: float, close_timeout: float) -> None:
    leftover = await p.wait_quiet(trial.service, 120)
    if leftover:
        raise RuntimeError(f"{trial.service} still alerting before the fault: {leftover}")
    trial.incident_id = incident_id(trial.fault, trial.service)
    injected, clock = datetime.now(UTC), time.monotonic()
    await p.fault(trial.service, trial.fault)

    found = await p.new_run(trial.incident_id, injected, open_timeout)
    if found is not None:
        handle, started = found
        trial.run_id, trial.opened_s = handle.run_id, max(0.0, (started - injected).total_seconds())
        await _follow(p, trial, handle, clock, close_timeout)

    # Whatever else the fault (or its fix) opened for this service, once the dust has settled.
    await p.fault(trial.service, "clear")
    await p.wait_quiet(trial.service, 120)
    await asyncio.sleep(3.0)  # Alertmanager's last notifications, and visibility's lag
    deadline = time.monotonic() + close_timeout
    while True:
        runs = [r for r in await p.runs_since(trial.service, injected) if r[1] != trial.run_id]
        if not any(running for *_, running in runs) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    for other_id, run_id, running in runs:
        handle = p.client.get_workflow_handle(other_id, run_id=run_id)
        status = await p.status(handle)
        if running:
            await handle.terminate("bench/accuracy.py: still open after the trial")
        phase = status.phase.value if status else "unknown"
        trial.other_runs.append(Run(other_id, run_id, "open" if running else phase, _top(status)[0]))


async def _follow(p: Pipeline, trial: Trial, handle: WorkflowHandle, clock: float, close_timeout: float) -> None:
    """From the open incident to its end: the proposal, the approval, the outcome."""
    status: IncidentStatus | None = None
    deadline = time.monotonic() + close_timeout
    while time.monotonic() < deadline:
        status = await p.status(handle)
        if status is not None and status.plan is not None and status.phase == Phase.awaiting_approval:
            trial.proposed_s = time.monotonic() - clock
            break
        if status is not None and status.phase.closed:
            break
        await asyncio.sleep(0.25)
    trial.runbook = status.runbook if status else None
    trial.top, trial.top_score, trial.scores = _top(status)
    if trial.proposed_s is not None and status is not None and status.plan_hash:
        if trial.approve:
            outcome = await p.approve(handle, status.plan_hash)
            if not outcome.counted:
                trial.error = f"approval refused: {outcome.reason}"
        else:
            await p.fault(trial.service, "clear")  # the incident should resolve itself
    report = await p.report(handle, max(1.0, deadline - time.monotonic()))
    if report is None:
        await handle.terminate("bench/accuracy.py: not closed in time")
        final = await p.status(handle)
        trial.phase, trial.outcome = "open", f"not closed within {close_timeout:.0f}s; last phase " + (
            final.phase.value if final else "unknown")
        return
    trial.phase, trial.outcome = report.phase.value, report.outcome
    # The last diagnosis is what the workflow acted on (after any second look).
    trial.runbook = report.status.runbook
    trial.top, trial.top_score, trial.scores = _top(report.status)


def _line(t: Trial) -> str:
    verdict = "right" if t.right else "WRONG: " + "; ".join(t.problems)
    timing = (f"opened {t.opened_s:.1f}s" if t.opened_s is not None else "not opened") + (
        f", proposed {t.proposed_s:.1f}s" if t.proposed_s is not None else "")
    return (f"round {t.round:>2} {t.fault:<11} on {t.service:<9} top {t.top or '-':<11} "
            f"{'' if t.top_score is None else f'{t.top_score:.2f}':<5} {timing:<32} {t.phase or '-':<14} {verdict}")


async def bench(args: argparse.Namespace, state_dir: Path) -> list[Trial]:
    ports = stack.Ports(**{name: free_port() for name in vars(stack.Ports())})
    # The fleet keeps the jtis it accepted here, so a restart would still refuse a replayed token.
    os.environ["FIREBREAK_FLEET_STATE_DIR"] = str(state_dir / "fleet")
    started = time.monotonic()
    info = await asyncio.to_thread(stack.up, state_dir, ports)
    if not info["components"].get("prometheus") or not info["components"].get("alertmanager"):
        raise PipelineMissing("Prometheus and Alertmanager are needed (bash scripts/setup installs them): "
                              + "; ".join(info.get("notes", [])))
    print(f"stack up in {time.monotonic() - started:.0f}s (state {state_dir})", flush=True)
    client = await connect(load_settings(state_dir).temporal)
    trials: list[Trial] = []
    async with httpx.AsyncClient(timeout=10.0) as http:
        p = Pipeline(info, client, http)
        # History before the first fault: rose_after_change compares with the time before the change.
        deadline = time.monotonic() + 120
        while await p.scrapes() < args.warmup and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
        for r in range(args.trials):
            round_trials = [Trial(round=r + 1, fault=FAULTS[(i + r) % len(FAULTS)], service=service,
                                  approve=not args.propose_only) for i, service in enumerate(SERVICES)]
            await asyncio.gather(*(run_trial(p, t, open_timeout=args.open_timeout, close_timeout=args.close_timeout)
                                   for t in round_trials))
            for t in round_trials:
                print(_line(t), flush=True)
            trials += round_trials
    return trials


class PipelineMissing(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=21, help="trials of each fault kind (default 21)")
    parser.add_argument("--quick", action="store_true", help="one trial of each fault kind")
    parser.add_argument("--propose-only", action="store_true", help="stop at the proposal: no approval or remediation")
    parser.add_argument("--state-dir", help="default: a new temporary directory, removed when every trial is right")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state dir")
    parser.add_argument("--json", help="also write the trials to this file")
    parser.add_argument("--warmup", type=float, default=20, help="seconds of scrapes before the first fault")
    parser.add_argument("--open-timeout", type=float, default=90, help="seconds for an incident to open")
    parser.add_argument("--close-timeout", type=float, default=240, help="seconds for an incident to close")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials = 1
    return args


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temporary = args.state_dir is None
    state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="firebreak-accuracy-"))
    trials: list[Trial] = []
    try:
        trials = await bench(args, state_dir)
    except PipelineMissing as exc:
        print(f"cannot run: {exc}", file=sys.stderr)
        return 2
    finally:
        await asyncio.to_thread(stack.down, state_dir)
    print()
    print(render(trials))
    payload = json.dumps({"trials": [t.as_json() for t in trials], "expected": EXPECTED}, indent=2, default=str)
    (state_dir / "accuracy.json").write_text(payload)
    if args.json:
        Path(args.json).write_text(payload)
    ok = bool(trials) and all(t.right for t in trials)
    if temporary and ok and not args.keep:
        shutil.rmtree(state_dir, ignore_errors=True)
    elif not ok:
        print(f"state, logs and accuracy.json kept in {state_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    code = asyncio.run(main())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a Temporal client can abort the interpreter at exit (sdk-python#300)
