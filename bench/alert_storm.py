"""Alert storm: the intake API against bare Temporal, in the same run, on the same server.

    python -m bench.alert_storm            # 10,000 alerts over 100 incidents
    python -m bench.alert_storm --quick    # 1,000 alerts over 10 incidents

Starts everything itself, as child processes on free ports: the Temporal dev
server from the venv (SQLite with WAL, no UI), the credential broker, the demo
fleet (a recent deploy on every service, so each incident reaches
``awaiting_approval`` and stays open), ``python -m firebreak.api`` and
``worker.py`` with the real IncidentWorkflow and activities. Then:

1. **API**: the alerts go as Alertmanager webhook batches from concurrent
   senders. A batch holds alerts of several incidents (as an Alertmanager
   route grouped by team would send them); the API routes them and sends one
   signal-with-start per incident per batch (coalescing).
2. **Bare Temporal**: the same number of alerts, over the same number of other
   incidents, one signal-with-start per alert straight from a client, with the
   same concurrency: what an intake without coalescing costs at best.

Afterwards each side must have exactly its incidents, one run each, and
every alert counted in its incident (``alerts_received`` of the ``status``
query). Prints a table with alerts/s, p50/p99 response times and the ratio.
Exit code 1 when a check fails or the ratio is below ``--target``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy

ROOT = Path(__file__).resolve().parent.parent

from firebreak.api import stack_info  # noqa: E402
from firebreak.config import TemporalSettings  # noqa: E402
from firebreak.contracts import Alert, AlertSignal, IncidentInput, IncidentStatus  # noqa: E402
from firebreak.intake import ALERT_SIGNAL, WORKFLOW, route_alerts  # noqa: E402
from firebreak.runbook import default_runbook_dir, load_runbooks  # noqa: E402
from firebreak.stack import Stack, ensure_demo_roster, temporal_binary, wait_http, wait_port  # noqa: E402
from firebreak.temporal import SEARCH_ATTRIBUTES, connect  # noqa: E402

SERVICES = ("checkout", "payments", "inventory")  # the demo fleet's services
CHAOS_TOKEN = "bench-chaos-" + uuid.uuid4().hex

# Incidents are {run}.{service}.{shard}: many incidents over the fleet's three services, each of
# which had a recent deploy, so every incident proposes a rollback and waits for approval (stays open).
STORM_RUNBOOK = """\
apiVersion: firebreak/v1
name: storm
version: 1
description: "Benchmark runbook, one incident per (run, service, shard)"
match:
  alertnames: [StormAlert]
  incident_key: "{run}.{service}.{shard}"
params:
  run: {label: run, pattern: "^[a-z]{1,10}$"}
  service: {label: service, pattern: "^[a-z][a-z0-9-]{0,30}$"}
  shard: {label: shard, pattern: "^s[0-9]{1,5}$"}
investigate:
  - {id: changes, kind: change_log, lookback: 30m, target: fleet, scope: fleet.read, resource: "service/{service}"}
diagnose:
  - id: bad_deploy
    title: A recent deploy
    conditions:
      - {evidence: changes, test: recent_change, within: 30m}
    actions: [rollback]
remediate:
  windows: {escalate_after: 30m, expire_after: 2h}
  approval:
    medium: {approvers: 1, groups: [oncall]}
  actions:
    rollback:
      target: fleet
      verb: fleet.rollback
      resource: "service/{service}"
      risk: medium
      blast_radius: "{service}"
      timeout: 30s
"""


# -- the storm ----------------------------------------------------------------------------


@dataclass
class Storm:
    alerts: int
    incidents: int
    batch_size: int
    incidents_per_batch: int
    senders: int

    @property
    def per_incident(self) -> int:
        return self.alerts // self.incidents

    def incident_labels(self, run: str, j: int) -> dict[str, str]:
        return {"alertname": "StormAlert", "run": run, "service": SERVICES[j % len(SERVICES)], "shard": f"s{j:05d}",
                "namespace": "shop", "severity": "critical", "team": f"team-{j // self.incidents_per_batch}"}

    def incident_id(self, run: str, j: int) -> str:
        labels = self.incident_labels(run, j)
        return f"{run}.{labels['service']}.{labels['shard']}"

    def alert(self, run: str, j: int, k: int, starts_at: str) -> dict:
        """Alert k of incident j: a distinct fingerprint each (e.g. one per pod)."""
        return {"status": "firing", "labels": self.incident_labels(run, j) | {"pod": f"pod-{k}"}, "annotations": {},
                "startsAt": starts_at, "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "",
                "fingerprint": f"{j:06x}{k:010x}"}

    def batches(self, run: str) -> list[bytes]:
        """Alertmanager bodies: each carries alerts of ``incidents_per_batch`` incidents of one team."""
        starts_at = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        per_batch_each = max(1, self.batch_size // self.incidents_per_batch)
        by_team: list[list[bytes]] = []
        for team_start in range(0, self.incidents, self.incidents_per_batch):
            team = range(team_start, min(team_start + self.incidents_per_batch, self.incidents))
            group_key = f'{{}}:{{team="team-{team_start // self.incidents_per_batch}"}}'
            bodies = []
            for k0 in range(0, self.per_incident, per_batch_each):
                alerts = [self.alert(run, j, k, starts_at) for j in team
                          for k in range(k0, min(k0 + per_batch_each, self.per_incident))]
                bodies.append(json.dumps({
                    "receiver": "firebreak", "status": "firing", "version": "4", "groupKey": group_key,
                    "truncatedAlerts": 0, "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
                    "externalURL": "http://alertmanager", "alerts": alerts,
                }).encode())
            by_team.append(bodies)
        # Round-robin over teams, as concurrent Alertmanager groups would arrive.
        return [body for round_ in zip(*by_team) for body in round_]


@dataclass
class Result:
    name: str
    alerts: int = 0
    calls: int = 0
    signals: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    retries: int = 0

    @property
    def rate(self) -> float:
        return self.alerts / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def run_api(storm: Storm, api_url: str, token: str) -> Result:
    bodies = storm.batches("api")
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    result = Result("API, Alertmanager batches")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def sender(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            while True:
                started = time.perf_counter()
                response = await http.post(f"{api_url}/v1/alerts/alertmanager", content=body, headers=headers)
                result.latencies_ms.append((time.perf_counter() - started) * 1000)
                if response.status_code == 503:  # as Alertmanager would: retry the same batch
                    result.retries += 1
                    await asyncio.sleep(0.5)
                    continue
                if response.status_code != 202:
                    raise RuntimeError(f"API answered {response.status_code}: {response.text[:300]}")
                answer = response.json()
                result.alerts += answer["counts"]["routed"]
                result.signals += len(answer["incident_ids"])
                result.calls += 1
                break

    limits = httpx.Limits(max_connections=storm.senders, max_keepalive_connections=storm.senders)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*[sender(http) for _ in range(storm.senders)])
        result.seconds = time.perf_counter() - started
    return result


async def run_bare(storm: Storm, client: Client, runbooks_dir: Path, task_queue: str) -> Result:
    """One signal-with-start per alert, straight from a client; inputs prepared before the clock starts."""
    runbooks = load_runbooks(runbooks_dir)
    starts_at = datetime.now(timezone.utc)
    calls: list[tuple[str, IncidentInput, AlertSignal]] = []
    for k in range(storm.per_incident):
        for j in range(storm.incidents):
            raw = storm.alert("bare", j, k, starts_at.isoformat())
            alert = Alert(source="bench", fingerprint=raw["fingerprint"], labels=raw["labels"], starts_at=starts_at)
            [routed] = route_alerts(runbooks, [alert]).routed
            incident = IncidentInput(incident_id=routed.incident_id, runbook=routed.runbook, params=routed.params)
            calls.append((routed.incident_id, incident, AlertSignal(alerts=[alert], received_at=starts_at)))
    queue: asyncio.Queue[tuple[str, IncidentInput, AlertSignal]] = asyncio.Queue()
    for call in calls:
        queue.put_nowait(call)
    result = Result("bare Temporal, 1 signal-with-start per alert")

    async def sender() -> None:
        while not queue.empty():
            incident_id, incident, signal = queue.get_nowait()
            started = time.perf_counter()
            await client.start_workflow(
                WORKFLOW, incident, id=incident_id, task_queue=task_queue, start_signal=ALERT_SIGNAL,
                start_signal_args=[signal], id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            )
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            result.alerts += 1
            result.signals += 1
            result.calls += 1

    started = time.perf_counter()
    await asyncio.gather(*[sender() for _ in range(storm.senders)])
    result.seconds = time.perf_counter() - started
    return result


# -- checks -------------------------------------------------------------------------------


async def wait_counted(client: Client, storm: Storm, run: str, timeout: float) -> list[str]:
    """Every incident of ``run`` has exactly one run and counts all its alerts; returns the problems."""
    ids = [storm.incident_id(run, j) for j in range(storm.incidents)]
    deadline = time.monotonic() + timeout
    problems: list[str] = []
    while time.monotonic() < deadline:
        problems = []
        statuses = await asyncio.gather(*[_status(client, i) for i in ids])
        for incident_id, status in zip(ids, statuses):
            if status is None:
                problems.append(f"{incident_id}: no status")
            elif status.alerts_received != storm.per_incident:
                problems.append(f"{incident_id}: {status.alerts_received} of {storm.per_incident} alerts counted")
            elif status.phase.closed:
                problems.append(f"{incident_id}: closed ({status.phase.value}) during the storm")
        runs = [wf async for wf in client.list_workflows(
            f"WorkflowType = '{WORKFLOW}' AND WorkflowId STARTS_WITH '{run}.'")]
        if len(runs) != storm.incidents or len({wf.id for wf in runs}) != storm.incidents:
            problems.append(f"{run}: {len({wf.id for wf in runs})} incidents in {len(runs)} runs, "
                            f"expected {storm.incidents} in {storm.incidents}")
        if not problems:
            return []
        await asyncio.sleep(1.0)
    return problems


async def _status(client: Client, incident_id: str) -> IncidentStatus | None:
    try:
        return await client.get_workflow_handle(incident_id).query("status", result_type=IncidentStatus)
    except Exception:  # noqa: BLE001 - not started yet, or its first task not run: asked again
        return None


# -- the stack ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_stack(state: Path) -> tuple[Stack, dict[str, str]]:
    """Child processes on free ports; settings in STATE/stack.json, as ``firebreak up`` writes them."""
    stack = Stack(state_dir=state)
    try:
        return _start(stack, state)
    except BaseException:
        stack.stop()
        raise


def _start(stack: Stack, state: Path) -> tuple[Stack, dict[str, str]]:
    py = sys.executable
    ports = {name: free_port() for name in ("temporal", "broker", "fleet", "api")}
    runbooks = state / "runbooks"
    runbooks.mkdir(parents=True, exist_ok=True)
    for source in default_runbook_dir().glob("*.yaml"):
        shutil.copy(source, runbooks / source.name)
    (runbooks / "storm.yaml").write_text(STORM_RUNBOOK)
    roster = ensure_demo_roster(state)
    temporal = stack.spawn("temporal", [
        temporal_binary(), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(ports["temporal"]), "--headless",
        "--db-filename", str(state / "temporal.db"), "--log-level", "warn",
        "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal",
        *[arg for key in SEARCH_ATTRIBUTES for arg in ("--search-attribute", f"{key.name}=Keyword")],
    ])
    broker_url = f"http://127.0.0.1:{ports['broker']}"
    broker = stack.spawn("broker", [py, "-m", "firebreak.broker", "--host", "127.0.0.1", "--port",
                                    str(ports["broker"]), "--state-dir", str(state), "--roster", str(roster),
                                    "--runbooks-dir", str(runbooks)])
    wait_http(f"{broker_url}/healthz", proc=broker)
    fleet_url = f"http://127.0.0.1:{ports['fleet']}"
    fleet = stack.spawn("fleet", [py, "-m", "demo.fleet", "--host", "127.0.0.1", "--port", str(ports["fleet"]),
                                  "--broker-url", broker_url, "--chaos-token", CHAOS_TOKEN])
    wait_http(f"{fleet_url}/healthz", proc=fleet)
    for service in SERVICES:
        httpx.post(f"{fleet_url}/demo/faults", json={"service": service, "kind": "bad_deploy"},
                   headers={"Authorization": f"Bearer {CHAOS_TOKEN}"}, timeout=10).raise_for_status()
    wait_port(ports["temporal"], timeout=60, proc=temporal)
    api_url = f"http://127.0.0.1:{ports['api']}"
    temporal_address = f"127.0.0.1:{ports['temporal']}"
    settings: dict[str, object] = {
        "temporal": {"address": temporal_address, "namespace": "default", "task_queue": "firebreak-bench"},
        "roster": str(roster), "runbooks_dir": str(runbooks), "broker_url": broker_url, "api_url": api_url,
        "targets": {"fleet": fleet_url, "prometheus": "http://127.0.0.1:9"},
    }
    (state / "stack.json").write_text(json.dumps({"settings": settings}))
    api = stack.spawn("api", [py, "-m", "firebreak.api", "--host", "127.0.0.1", "--port", str(ports["api"]),
                              "--state-dir", str(state), "--log-level", "warning"])
    stack.spawn("worker", [py, str(ROOT / "worker.py"), "--state-dir", str(state)])
    wait_http(f"{api_url}/healthz", proc=api)
    return stack, {"api_url": api_url, "temporal": temporal_address, "runbooks": str(runbooks)}


# -- report -------------------------------------------------------------------------------


def table(api: Result, bare: Result, storm: Storm) -> str:
    rows = [("", "alerts", "calls", "signals", "seconds", "alerts/s", "p50 ms", "p99 ms", "retries")]
    for r in (api, bare):
        rows.append((r.name, str(r.alerts), str(r.calls), str(r.signals), f"{r.seconds:.2f}", f"{r.rate:.0f}",
                     f"{r.percentile(50):.1f}", f"{r.percentile(99):.1f}", str(r.retries)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    ratio = api.rate / bare.rate if bare.rate else float("inf")
    lines.append("")
    lines.append(f"ratio API / bare: {ratio:.2f}x   "
                 f"(each side: {storm.alerts} alerts over {storm.incidents} incidents; "
                 f"batches of {storm.batch_size} alerts over {storm.incidents_per_batch} incidents; "
                 f"{storm.senders} concurrent senders)")
    return "\n".join(lines)


async def bench(storm: Storm, state: Path, target: float) -> int:
    stack, info = start_stack(state)
    try:
        client = await connect(TemporalSettings(address=info["temporal"], task_queue="firebreak-bench"))
        token = stack_info(state, info["api_url"])["intake_token"]
        print(f"state {state}; Temporal {info['temporal']}; API {info['api_url']}", flush=True)
        # Warm up both paths (worker sandbox, HTTP connections) on incidents outside the counted ones.
        await _warm_up(client, info, token)

        print(f"API: {storm.alerts} alerts ...", flush=True)
        api = await run_api(storm, info["api_url"], token)
        api_problems = await wait_counted(client, storm, "api", timeout=120)
        print(f"bare Temporal: {storm.alerts} alerts ...", flush=True)
        bare = await run_bare(storm, client, Path(info["runbooks"]), "firebreak-bench")
        bare_problems = await wait_counted(client, storm, "bare", timeout=120)

        print()
        print(table(api, bare, storm))
        ratio = api.rate / bare.rate if bare.rate else float("inf")
        problems = api_problems + bare_problems
        for problem in problems[:20]:
            print(f"CHECK FAILED: {problem}")
        if not problems:
            print(f"checks: {storm.incidents} incidents per side, one run each, every alert counted "
                  f"({storm.per_incident} per incident)")
        verdict = "meets" if ratio >= target else "BELOW"
        print(f"target {target:.1f}x: {verdict}")
        return 0 if not problems and ratio >= target else 1
    finally:
        stack.stop()


async def _warm_up(client: Client, info: dict[str, str], token: str) -> None:
    body = json.dumps({
        "receiver": "firebreak", "status": "firing", "version": "4", "groupKey": "warm", "alerts": [{
            "status": "firing", "labels": {"alertname": "StormAlert", "run": "warm", "service": "checkout",
                                           "shard": "s0"},
            "startsAt": datetime.now(timezone.utc).isoformat(), "fingerprint": "warm"}],
    }).encode()
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{info['api_url']}/v1/alerts/alertmanager", content=body,
                                   headers={"Authorization": f"Bearer {token}"})
        response.raise_for_status()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and await _status(client, "warm.checkout.s0") is None:
        await asyncio.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alerts", type=int, default=10_000)
    parser.add_argument("--incidents", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100, help="alerts per webhook")
    parser.add_argument("--incidents-per-batch", type=int, default=10, help="incidents one webhook's alerts span")
    parser.add_argument("--senders", type=int, default=8, help="concurrent senders, on both sides")
    parser.add_argument("--quick", action="store_true", help="1,000 alerts over 10 incidents")
    parser.add_argument("--target", type=float, default=2.0, help="minimum API/bare ratio")
    parser.add_argument("--state-dir", type=Path, default=None, help="kept afterwards (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    if args.quick:
        args.alerts, args.incidents = 1_000, 10
    if args.alerts % args.incidents:
        parser.error("--alerts must be a multiple of --incidents")
    storm = Storm(args.alerts, args.incidents, args.batch_size, min(args.incidents_per_batch, args.incidents),
                  args.senders)
    if args.state_dir:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(bench(storm, args.state_dir, args.target))
    with tempfile.TemporaryDirectory(prefix="firebreak-storm-") as tmp:
        return asyncio.run(bench(storm, Path(tmp), args.target))


if __name__ == "__main__":
    raise SystemExit(main())
