"""The whole incident pipeline against bare Temporal and a hand-rolled pipeline, in the same run, on the same server.

    python -m bench.pipeline            # 100 incidents a side, 200 for throughput, 1,000 and 10,000 held open
    python -m bench.pipeline --quick    # a smoke run in under 2 minutes

Starts its own stack on free ports (``bench/pipeline_stack.py``): the dev server with WAL, the broker,
the demo fleet with one synthetic service per incident, Prometheus if installed, the API, ``worker.py``
the bare baseline's worker (``bench/pipeline_bare.py``: the same messages and number of
activities, each a no-op) and the hand-rolled pipeline's worker (``bench/handrolled.py``: the plain
Temporal workflow a team would write, with the same reads, diagnosis, ticket and write, one approval
signal and one standing token at the fleet, no broker). The three sides are driven the same way, with
the same concurrency, in rotating order, so that all see the same machine:

1. engine time to the proposal: webhook 202 (bare: signal-with-start returned) to ``awaiting_approval``
   (from history), minus the longest investigation query (from the worker's spans; hand-rolled: its
   longest read activity); and with the queries, 202 to proposal, against hand-rolled (its proposal:
   the proposal ticket scheduled);
2. approval to first write: ``submit_approval`` accepted (history) to the write arriving at the fleet
   (the fleet's clock); bare: the signal (history) to the next activity starting (history); hand-rolled:
   the signal (history) to its write arriving at the fleet;
3. throughput: complete incidents per second, each approved by the bench's approver as soon as it waits;
4. incidents held open: worker RSS, and approve-to-write of the first incident opened (evicted from the
   workflow cache once more than its size were opened after it) beside the last (cached);
5. a single-alert webhook's latency beside a bare signal-with-start;
6. where the time goes, per incident, from spans and history.

Also per complete incident: each component's CPU (from /proc), and workflow tasks per side.

Checks its own correctness: every approved incident resolved, the fleet's own record holds exactly
one write for each of them and none for the others (Firebreak and hand-rolled), and every measured
history replays on its worker's code. Exit code 1 when a check fails. ``--profile worker=FILE`` (or ``broker=FILE``) samples that process's stacks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
from temporalio.api.enums.v1 import PendingActivityState, PendingWorkflowTaskState
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter

from bench.chaos_ledger import writes_by_incident
from bench.handrolled import WORKFLOW as HAND_WORKFLOW
from bench.handrolled import Alert as HandAlert
from bench.pipeline_bare import WORKFLOW as BARE_WORKFLOW
from bench.pipeline_bare import BareShape
from bench.pipeline_history import Timeline, breakdown, credentials, timeline
from bench.pipeline_otlp import SpanReceiver
from bench.pipeline_stack import APPROVER, BARE_QUEUE, HAND_QUEUE, PipelineStack, has_prometheus
from demo.fleet import STANDING_SUBJECT
from firebreak import signing
from firebreak.api import stack_info
from firebreak.config import load_settings
from firebreak.contracts import Approval, IncidentStatus
from firebreak.incidents import MEMO_KEY, approval_outcome, final_report
from firebreak.temporal import PHASE, connect

ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")
SIDES = ("firebreak", "bare", "hand-rolled")
SHOWN_PROBLEMS = 30  # the first ones in full, then a count: a run with thousands of problems stays readable


def runbook_text(prometheus: bool) -> str:
    """One incident per synthetic service; the shape of bad-deploy (three reads, a rollback with its
    precondition, a verification), with a verification that holds at its first look (no fault model).

    The fleet deploys every synthetic service when it starts, and holding 10,000 incidents open takes the
    best part of an hour: the change window is 12 h, so that the last incident opened still sees its deploy."""
    reads = """\
  - {id: error_rate, kind: prometheus_range, lookback: 15m, step: 5s, target: prometheus, scope: metrics.read,
     resource: "namespace/{namespace}",
     query: 'sum(rate(http_requests_total{namespace="{namespace}",code=~"5.."}[30s])) / sum(rate(http_requests_total{namespace="{namespace}"}[30s]))'}
  - {id: latency_p99, kind: prometheus_instant, target: prometheus, scope: metrics.read, resource: "namespace/{namespace}",
     query: 'histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{namespace="{namespace}"}[30s])))'}
""" if prometheus else ""
    verify = "      verify: {query: 'vector(0)', test: below, threshold: 0.5, within: 30s, interval: 1s}\n" if prometheus else ""
    return f"""\
apiVersion: firebreak/v1
name: pipeline
version: 1
description: "Benchmark runbook: one incident per synthetic service of the demo fleet (bench/pipeline.py)"
match:
  alertnames: [PipelineBench]
  labels: {{namespace: shop}}
  incident_key: "{{run}}.{{service}}"
params:
  run: {{label: run, pattern: "^[a-z0-9]{{1,12}}$"}}
  namespace: {{label: namespace, pattern: "^[a-z][a-z0-9-]{{0,30}}$"}}
  service: {{label: service, pattern: "^[a-z][a-z0-9-]{{0,30}}$"}}
investigate:
{reads}  - {{id: changes, kind: change_log, lookback: 12h, target: fleet, scope: fleet.read, resource: "service/{{service}}"}}
diagnose:
  - id: bad_deploy
    title: A recent deploy
    conditions:
      - {{evidence: changes, test: recent_change, within: 12h}}
    actions: [rollback]
remediate:
  windows: {{escalate_after: 30m, expire_after: 2h}}
  approval:
    medium: {{approvers: 1, groups: [oncall]}}
  actions:
    rollback:
      target: fleet
      verb: fleet.rollback
      resource: "service/{{service}}"
      risk: medium
      blast_radius: "one synthetic service ({{service}})"
      timeout: 60s
      precondition: {{fields: [version, previous_version]}}
{verify}      undo: {{verb: fleet.deploy, params: {{version: "{{result.previous_version}}"}}}}
"""


def bare_shape(prometheus: bool) -> BareShape:
    """The bench incident's activities: reads; diagnose and the precondition read; the proposal's ticket
    in the background; after approval the re-read, the write, the verification, the closing ticket and
    telling the broker the run closed."""
    return BareShape(investigations=3 if prometheus else 1, before_proposal=2, background=1,
                     after_approval=5 if prometheus else 4)


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Opened:
    incident_id: str
    side: str  # "firebreak", "bare" or "hand-rolled"
    accepted_at: float  # wall clock when the 202 (or the start call) returned
    call_s: float


def pct(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def bounded(items: Sequence[T], limit: int, fn: Callable[[T], Awaitable[Any]]) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def one(item: T) -> Any:
        async with semaphore:
            return await fn(item)

    return await asyncio.gather(*[one(i) for i in items])


class Pipeline:
    def __init__(self, stack: PipelineStack, firebreak: Client, bare: Client, http: httpx.AsyncClient,
                 token: str, shape: BareShape) -> None:
        self.stack, self.firebreak, self.bare, self.http = stack, firebreak, bare, http
        self.token, self.shape = token, shape
        self.services = 0
        self.approved: set[str] = set()  # Firebreak incidents the bench approved: each must write once
        self.opened: list[str] = []  # every Firebreak incident opened
        self.closed_early: dict[str, str] = {}  # closed before the bench approved it: id -> phase
        self.approval_sent: dict[str, float] = {}  # wall clock when the bench sent each approval (update or signal)
        self.hand_services: dict[str, str] = {}  # every hand-rolled incident opened -> its synthetic service
        self.hand_approved: set[str] = set()  # hand-rolled incidents the bench approved: each must write once
        self.prometheus = shape.investigations > 1

    def next_service(self) -> str:
        service = f"bench-{self.services:05d}"
        self.services += 1
        return service

    # -- opening --

    async def open(self, side: str, run: str) -> Opened:
        if side == "firebreak":
            return await self.open_firebreak(run)
        return await (self.open_bare(run) if side == "bare" else self.open_hand(run))

    async def open_firebreak(self, run: str) -> Opened:
        service = self.next_service()
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        body = json.dumps({
            "receiver": "firebreak", "status": "firing", "version": "4", "groupKey": f'{{}}:{{service="{service}"}}',
            "truncatedAlerts": 0, "groupLabels": {"service": service}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://alertmanager", "alerts": [{
                "status": "firing", "labels": {"alertname": "PipelineBench", "run": run, "namespace": "shop",
                                               "service": service, "severity": "critical"},
                "annotations": {"summary": f"bench incident on {service}"}, "startsAt": now,
                "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "", "fingerprint": uuid.uuid4().hex[:16]}],
        }).encode()
        for attempt in range(3):
            started = time.perf_counter()
            try:
                response = await self.http.post(f"{self.stack.api_url}/v1/alerts/alertmanager", content=body,
                                                headers={"Authorization": f"Bearer {self.token}",
                                                         "Content-Type": "application/json"})
                break
            except httpx.TransportError:
                # A kept-alive connection the API closed as it was reused (uvicorn's 5 s keep-alive): resend,
                # as Alertmanager would.
                if attempt == 2:
                    raise
        call_s = time.perf_counter() - started
        accepted_at = time.time()
        if response.status_code != 202:
            raise RuntimeError(f"the API answered {response.status_code}: {response.text[:300]}")
        [incident_id] = response.json()["incident_ids"]
        self.opened.append(incident_id)
        return Opened(incident_id, "firebreak", accepted_at, call_s)

    async def open_bare(self, run: str) -> Opened:
        workflow_id = f"{run}.bare-{uuid.uuid4().hex[:10]}"
        started = time.perf_counter()
        await self.bare.start_workflow(BARE_WORKFLOW, self.shape, id=workflow_id, task_queue=BARE_QUEUE,
                                       start_signal="alert", start_signal_args=[{"alerts": 1}])
        call_s = time.perf_counter() - started
        return Opened(workflow_id, "bare", time.time(), call_s)

    async def open_hand(self, run: str) -> Opened:
        """As a team's alert receiver would: start the incident's workflow, keyed by run and service."""
        service = self.next_service()
        workflow_id = f"{run}.{service}"
        alert = HandAlert(service=service, namespace="shop", prometheus=self.prometheus,
                          started_at=datetime.now(UTC).isoformat().replace("+00:00", "Z"))
        started = time.perf_counter()
        await self.bare.start_workflow(HAND_WORKFLOW, alert, id=workflow_id, task_queue=HAND_QUEUE)
        call_s = time.perf_counter() - started
        self.hand_services[workflow_id] = service
        return Opened(workflow_id, "hand-rolled", time.time(), call_s)

    # -- waiting --

    async def phase(self, side: str, workflow_id: str) -> str | None:
        try:
            if side == "firebreak":
                # The phase search attribute, from the run's own state: asks the server, not the worker, so
                # that the bench's polling costs the worker nothing (the status query would).
                described = await self.firebreak.get_workflow_handle(workflow_id).describe()
                phase = described.typed_search_attributes.get(PHASE)
                return phase or ("closed" if described.close_time else None)
            return (await self.bare.get_workflow_handle(workflow_id).query("status"))["phase"]
        except Exception:  # noqa: BLE001 - its first task has not run yet: asked again
            return None

    async def outcome(self, side: str, workflow_id: str) -> str:
        """Why an incident closed, from its memo: what a check failure needs to say."""
        if side != "firebreak":
            return side
        try:
            memo = await (await self.firebreak.get_workflow_handle(workflow_id).describe()).memo_value(MEMO_KEY, {})
        except Exception as exc:  # noqa: BLE001 - the reason is a nicety; the failure is reported regardless
            return f"outcome unreadable: {type(exc).__name__}"
        return str(memo.get("outcome") or "no outcome recorded")[:200]

    async def stuck(self, side: str, workflow_id: str) -> str:
        """What an incident that is late to propose is still doing: its phase, and what it waits on."""
        if side != "firebreak":
            return side
        try:
            described = await self.firebreak.get_workflow_handle(workflow_id).describe()
        except Exception as exc:  # noqa: BLE001 - the reason is a nicety; the failure is reported regardless
            return f"undescribable: {type(exc).__name__}"
        raw = described.raw_description
        waits = [f"{a.activity_type.name} {PendingActivityState.Name(a.state).rsplit('_', 1)[-1].lower()}, "
                 f"attempt {a.attempt}" + (f" ({a.last_failure.message[:80]})" if a.last_failure.message else "")
                 for a in raw.pending_activities]
        if raw.HasField("pending_workflow_task"):
            task = raw.pending_workflow_task
            waits.append(f"workflow task {PendingWorkflowTaskState.Name(task.state).rsplit('_', 1)[-1].lower()} "
                         f"since {task.original_scheduled_time.ToDatetime():%H:%M:%S}, attempt {task.attempt}")
        phase = described.typed_search_attributes.get(PHASE) or "no phase yet"
        return f"still {phase}; waiting on: {'; '.join(waits) or 'nothing pending'}"

    async def wait_awaiting(self, side: str, ids: list[str], timeout: float, poll: float = 0.2) -> list[str]:
        """Until each awaits approval; returns those that closed first instead (recorded as problems)."""
        pending, deadline = list(ids), time.monotonic() + timeout
        while pending:
            phases = await bounded(pending, 20, lambda i: self.phase(side, i))
            for i, phase in zip(pending, phases):
                if phase and phase not in ("investigating", "diagnosing", "proposing", "awaiting_approval"):
                    self.closed_early[i] = f"{phase} ({await self.outcome(side, i)})"
            pending = [i for i, p in zip(pending, phases) if p != "awaiting_approval" and i not in self.closed_early]
            if pending and time.monotonic() > deadline:
                for i in pending:  # stuck: a problem to report, and nothing to approve
                    self.closed_early[i] = f"not awaiting approval after {timeout:.0f}s ({await self.stuck(side, i)})"
                break
            if pending:
                await asyncio.sleep(poll)
        return [i for i in ids if i in self.closed_early]

    # -- approving --

    async def plan_hash(self, incident_id: str) -> str:
        status = await self.firebreak.get_workflow_handle(incident_id).query("status", result_type=IncidentStatus)
        assert status.plan_hash is not None
        return status.plan_hash

    async def approve_firebreak(self, incident_id: str, plan_hash: str | None = None) -> None:
        handle = self.firebreak.get_workflow_handle(incident_id)
        approval = signing.sign_approval(Approval(
            workflow_id=incident_id, plan_hash=plan_hash or await self.plan_hash(incident_id), decision="approve", nonce=uuid.uuid4().hex,
            expires_at=(datetime.now(UTC) + timedelta(minutes=15)).isoformat(timespec="seconds"),
            approver=APPROVER, comment="bench/pipeline.py",
        ), self.stack.approver_key)
        self.approval_sent[incident_id] = time.time()
        outcome = await approval_outcome(handle, approval)
        if not outcome.counted:
            raise RuntimeError(f"{incident_id}: the bench's approval was refused: {outcome.reason}")
        self.approved.add(incident_id)

    async def approve(self, side: str, workflow_id: str, *, update: bool = False) -> None:
        """Firebreak: a signed approval (its plan read first); bare: the signal, or the update; hand-rolled: its signal."""
        if side == "firebreak":
            await self.approve_firebreak(workflow_id)
        elif side == "bare":
            await self.approve_bare(workflow_id, update=update)
        else:
            await self.approve_hand(workflow_id)

    async def approve_hand(self, workflow_id: str) -> None:
        self.approval_sent[workflow_id] = time.time()
        await self.bare.get_workflow_handle(workflow_id).signal("approve", APPROVER)
        self.hand_approved.add(workflow_id)

    async def approve_bare(self, workflow_id: str, *, update: bool) -> None:
        handle = self.bare.get_workflow_handle(workflow_id)
        self.approval_sent[workflow_id] = time.time()
        if update:
            await handle.execute_update("submit_approval", {"approver": APPROVER})
        else:
            await handle.signal("approve", {"approver": APPROVER})

    async def result(self, side: str, workflow_id: str, timeout: float = 300) -> str:
        if side == "firebreak":
            report = await asyncio.wait_for(final_report(self.firebreak.get_workflow_handle(workflow_id)), timeout)
            return report.phase.value
        return str(await asyncio.wait_for(self.bare.get_workflow_handle(workflow_id).result(), timeout))

    async def whole(self, side: str, run: str) -> tuple[str, str]:
        """One incident, start to end, approved the moment it waits: the throughput driver."""
        opened = await self.open(side, run)
        if await self.wait_awaiting(side, [opened.incident_id], timeout=300):
            return opened.incident_id, self.closed_early[opened.incident_id]
        await self.approve(side, opened.incident_id, update=True)
        return opened.incident_id, await self.result(side, opened.incident_id)

    # -- reading what happened --

    async def timelines(self, side: str, ids: list[str]) -> dict[str, Timeline]:
        client = self.firebreak if side == "firebreak" else self.bare
        # Where the others wait for approval: bare's first background activity; hand-rolled's proposal
        # ticket, after its reads and the service read.
        background = {"firebreak": None, "bare": self.shape.investigations + self.shape.before_proposal,
                      "hand-rolled": self.shape.investigations + 1}[side]

        async def one(workflow_id: str) -> Timeline:
            history = await client.get_workflow_handle(workflow_id).fetch_history()
            return timeline(list(history.events), bare_background=background)

        found = await bounded(ids, 10, one)
        return dict(zip(ids, found))

    async def fleet(self) -> tuple[dict[str, list[str]], dict[str, float]]:
        """The fleet's own record: change kinds per incident, and when each incident's first write arrived.

        Hand-rolled writes name no incident (a standing token carries none): theirs are the changes to
        the incident's own synthetic service made with the standing token."""
        state = (await self.http.get(f"{self.stack.fleet_url}/demo/state", timeout=60)).json()
        arrivals = (await self.http.get(f"{self.stack.fleet_url}/demo/requests", timeout=60)).json()["writes"]
        first: dict[str, float] = {}
        for write in arrivals:
            key = write.get("idempotency_key") or ""
            # INCIDENT/RUN/STEP/do: the step itself, not an undo; hand-rolled: INCIDENT/rollback.
            if key.endswith(("/do", "/rollback")):
                first.setdefault(key.split("/", 1)[0], write["at"])
        writes = writes_by_incident(state)
        by_service = {service: incident for incident, service in self.hand_services.items()}
        for change in state.get("changes", []):
            if change.get("author") == STANDING_SUBJECT and change.get("service") in by_service:
                writes.setdefault(by_service[change["service"]], []).append(change["kind"])
        return writes, first


# -- the phases -------------------------------------------------------------------------------


@dataclass
class Config:
    incidents: int = 100
    throughput: int = 200
    held: tuple[int, ...] = (1_000, 10_000)
    concurrency: int = 10
    warmup: int = 3
    cache: int = 1000  # the worker's workflow cache (worker.py's FIREBREAK_WORKFLOW_CACHE; the SDK's default)


@dataclass
class Results:
    opened: dict[str, list[Opened]] = field(default_factory=lambda: {side: [] for side in SIDES})
    timelines: dict[str, dict[str, Timeline]] = field(default_factory=dict)
    engine_s: dict[str, list[float]] = field(default_factory=dict)
    proposal_s: dict[str, list[float]] = field(default_factory=dict)  # 202 to proposal, queries included
    to_write_s: dict[str, list[float]] = field(default_factory=dict)
    sent_to_write_s: dict[str, list[float]] = field(default_factory=dict)  # from the bench's call, its clock
    throughput: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # side -> component -> CPU seconds
    held: list[dict[str, Any]] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    replayed: int = 0
    slow_tasks: dict[str, int] = field(default_factory=dict)  # side -> workflow tasks its worker warned were over 5 s
    seconds: dict[str, float] = field(default_factory=dict)


WORKER = {"firebreak": "worker", "bare": "bare-worker", "hand-rolled": "handrolled-worker"}  # stack process names


def rotated(sides: Sequence[str], k: int) -> list[str]:
    """The sides in an order that starts at a different one each time: none always goes first."""
    k %= len(sides)
    return [*sides[k:], *sides[:k]]


def services_a_side(cfg: Config) -> int:
    """Synthetic services one side's incidents use: one each, the held levels re-filled after two approvals."""
    return cfg.warmup + cfg.incidents + cfg.throughput + max(cfg.held, default=0) + 2 * len(cfg.held)


def note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


async def warm_up(p: Pipeline, cfg: Config, _r: Results) -> None:
    """Every worker's sandbox, connections and caches warm, on incidents outside every figure."""
    for side in SIDES:
        done = await asyncio.gather(*[p.whole(side, "warm") for _ in range(cfg.warmup)])
        bad = [d for d in done if d[1] != "resolved"]
        if bad:
            raise RuntimeError(f"warm-up {side}: {bad}")


async def propose_and_approve(p: Pipeline, cfg: Config, r: Results) -> None:
    """Figures 1, 2 and 5, in rounds: ``concurrency`` incidents a side opened one call at a time, the
    sides interleaved in rotating order (each call sees the same load), then every one waits; the same
    for approvals."""
    rounds = -(-cfg.incidents // cfg.concurrency)
    for k in range(rounds):
        size = min(cfg.concurrency, cfg.incidents - k * cfg.concurrency)
        opened: dict[str, list[Opened]] = {side: [] for side in SIDES}
        for j in range(size):
            for side in rotated(SIDES, j + k):
                opened[side].append(await p.open(side, "lat"))
        for side, ones in opened.items():
            r.opened[side] += ones
        await asyncio.gather(*[p.wait_awaiting(side, [o.incident_id for o in ones], timeout=120)
                               for side, ones in opened.items()])
    for side in r.opened:  # what closed before its approval is a problem already, and has nothing to approve
        r.opened[side] = [o for o in r.opened[side] if o.incident_id not in p.closed_early]
    note(f"proposed: {cfg.incidents} a side; approving")
    for k in range(rounds):
        batch = {side: [o.incident_id for o in r.opened[side][k * cfg.concurrency:(k + 1) * cfg.concurrency]]
                 for side in SIDES}
        plans = {i: await p.plan_hash(i) for i in batch["firebreak"]}  # read first, as an approver's CLI does
        calls = []
        for j, (fb, bare, hand) in enumerate(zip(batch["firebreak"], batch["bare"], batch["hand-rolled"])):
            each = {"firebreak": p.approve_firebreak(fb, plans[fb]), "bare": p.approve_bare(bare, update=False),
                    "hand-rolled": p.approve_hand(hand)}
            calls += [each[side] for side in rotated(SIDES, j + k)]
        for call in calls:  # one at a time, interleaved, without waiting for the incidents to finish
            await call
        for side, ids in batch.items():
            endings = await asyncio.gather(*[p.result(side, i) for i in ids])
            r.problems += [f"{side} {i}: ended {e}" for i, e in zip(ids, endings) if e != "resolved"]


async def throughput(p: Pipeline, cfg: Config, r: Results) -> None:
    """Figure 3: complete incidents per second, ``concurrency`` drivers a side, in halves, the second
    round in reverse order."""
    seconds = {side: 0.0 for side in SIDES}
    half = cfg.throughput // 2
    for side in (*SIDES, *reversed(SIDES)):
        queue = list(range(half))
        cpu_before = p.stack.cpu_seconds()
        started = time.perf_counter()

        async def driver() -> list[tuple[str, str]]:
            done = []
            while queue:
                queue.pop()
                done.append(await p.whole(side, "tput"))
            return done

        batches = await asyncio.gather(*[driver() for _ in range(cfg.concurrency)])
        seconds[side] += time.perf_counter() - started
        spent = r.cpu.setdefault(side, {})
        for name, value in p.stack.cpu_seconds().items():
            spent[name] = spent.get(name, 0.0) + value - cpu_before.get(name, value)
        r.problems += [f"{side} {i}: ended {e}" for b in batches for i, e in b if e != "resolved"]
    r.throughput = {side: 2 * half / s for side, s in seconds.items()}


async def held_open(p: Pipeline, cfg: Config, r: Results) -> None:
    """Figure 4: open incidents awaiting approval, worker RSS, and approve-to-write evicted vs cached."""
    opened: dict[str, list[str]] = {side: [] for side in SIDES}
    for count in cfg.held:
        for side in SIDES:
            more = count - len(opened[side])
            started = time.perf_counter()
            # In chunks, each awaiting approval before the next: a steady arrival, not a flood (a flood of
            # mints starves the broker; see the report).
            for k in range(0, more, cfg.concurrency):
                fresh = await asyncio.gather(*[p.open(side, "held") for _ in range(min(cfg.concurrency, more - k))])
                ids = [o.incident_id for o in fresh]
                closed = await p.wait_awaiting(side, ids, timeout=300, poll=0.5)
                opened[side] += [i for i in ids if i not in closed]
            short = f", {count - len(opened[side])} short: closed before approval" if len(opened[side]) < count else ""
            note(f"held {side}: {len(opened[side])} awaiting approval ({more / (time.perf_counter() - started):.1f}/s{short})")
        await asyncio.sleep(2)  # let the workers settle before reading their memory
        row: dict[str, Any] = {"count": count, "rss_mb": {side: p.stack.rss_mb(WORKER[side]) for side in SIDES}}
        for side in SIDES:
            # The oldest is evicted only once more than the cache holds were opened after it.
            for label, workflow_id in (("evicted" if count > cfg.cache else "oldest", opened[side].pop(0)),
                                       ("cached", opened[side].pop())):
                await p.approve(side, workflow_id)
                ending = await p.result(side, workflow_id)
                if ending != "resolved":
                    r.problems.append(f"held {side} {workflow_id}: ended {ending}")
                row.setdefault("ids", {})[(side, label)] = workflow_id
        r.held.append(row)


# -- the figures ------------------------------------------------------------------------------


async def replay_check(p: Pipeline, r: Results, workflow_class: type) -> None:
    """Every measured incident replays on its worker's code: its commands are deterministic, patches included
    (Firebreak's on ``workflow_class``, hand-rolled ones on ``bench/handrolled.py``).

    ``workflow_class`` was imported when the worker started; the sandbox still reads its module's source
    again, so a tree edited under a running bench can fail here (said as such, not as a replay failure).
    """
    from temporalio.worker import Replayer

    histories = [await p.firebreak.get_workflow_handle(o.incident_id).fetch_history() for o in r.opened["firebreak"]]

    async def each() -> AsyncIterator[WorkflowHistory]:
        for history in histories:
            yield history

    try:
        replayed = await Replayer(workflows=[workflow_class], data_converter=p.firebreak.data_converter
                                  ).replay_workflows(each(), raise_on_replay_failure=False)
    except Exception as exc:  # noqa: BLE001 - the replayer could not even load the workflow
        r.problems.append(f"replay check could not run (workflow code changed under the bench?): {exc!r}"[:500])
        return
    r.problems += [f"{run_id}: does not replay: {failure}" for run_id, failure in replayed.replay_failures.items()]
    from bench.handrolled import HandRolledIncident

    hand = [await p.bare.get_workflow_handle(o.incident_id).fetch_history() for o in r.opened["hand-rolled"]]

    async def each_hand() -> AsyncIterator[WorkflowHistory]:
        for history in hand:
            yield history

    replayed = await Replayer(workflows=[HandRolledIncident]).replay_workflows(each_hand(), raise_on_replay_failure=False)
    r.problems += [f"hand-rolled {run_id}: does not replay: {failure}"
                   for run_id, failure in replayed.replay_failures.items()]
    r.replayed = len(histories) + len(hand)


async def analyse(p: Pipeline, receiver: SpanReceiver, r: Results) -> None:
    await asyncio.sleep(1.5)  # the workers' last span batches
    writes, first_write = await p.fleet()
    fb = [o.incident_id for o in r.opened["firebreak"]]
    r.timelines["firebreak"] = await p.timelines("firebreak", fb)
    for side in ("bare", "hand-rolled"):
        r.timelines[side] = await p.timelines(side, [o.incident_id for o in r.opened[side]])
    spans = receiver.by_workflow(set(fb))
    for side in SIDES:
        engine, proposal, to_write, sent_to_write = [], [], [], []
        for o in r.opened[side]:
            tl = r.timelines[side][o.incident_id]
            if tl.awaiting is None:
                r.problems.append(f"{side} {o.incident_id}: no awaiting_approval in its history")
                continue
            query = 0.0
            if side == "firebreak":
                reads = [c for c in credentials(spans.get(o.incident_id, [])) if c.activity_id in
                         {a.activity_id for a in tl.activities if a.type == "investigate"}]
                query = max((c.use for c in reads), default=0.0)
            elif side == "hand-rolled":  # its reads are the activities before the service read
                query = max((a.ran for a in tl.activities[:p.shape.investigations]), default=0.0)
            engine.append(tl.awaiting - o.accepted_at - query)
            proposal.append(tl.awaiting - o.accepted_at)
            sent = p.approval_sent.get(o.incident_id)
            if side == "firebreak" and tl.update_accepted and o.incident_id in first_write:
                to_write.append(first_write[o.incident_id] - tl.update_accepted)
                if sent:
                    sent_to_write.append(first_write[o.incident_id] - sent)
            elif side == "bare" and "approve" in tl.signaled:
                begun = tl.first_started_after(tl.signaled["approve"])
                if begun:
                    to_write.append(begun - tl.signaled["approve"])
                    if sent:
                        sent_to_write.append(begun - sent)
            elif side == "hand-rolled" and "approve" in tl.signaled and o.incident_id in first_write:
                to_write.append(first_write[o.incident_id] - tl.signaled["approve"])
                if sent:
                    sent_to_write.append(first_write[o.incident_id] - sent)
        r.engine_s[side], r.to_write_s[side], r.sent_to_write_s[side] = engine, to_write, sent_to_write
        r.proposal_s[side] = proposal
    for o in r.opened["firebreak"]:
        tl = r.timelines["firebreak"][o.incident_id]
        r.parts.append(breakdown(tl, spans.get(o.incident_id, []), o.accepted_at, o.call_s,
                                 first_write.get(o.incident_id)))
    # Held incidents: approve-to-write per side and label.
    for row in r.held:
        row["to_write"] = {}
        for (side, label), workflow_id in row.get("ids", {}).items():
            tl = (await p.timelines(side, [workflow_id]))[workflow_id]
            if side == "firebreak":
                value = (first_write[workflow_id] - tl.update_accepted
                         if tl.update_accepted and workflow_id in first_write else float("nan"))
            elif side == "hand-rolled":
                value = (first_write[workflow_id] - tl.signaled["approve"]
                         if "approve" in tl.signaled and workflow_id in first_write else float("nan"))
            else:
                begun = tl.first_started_after(tl.signaled.get("approve", float("inf")))
                value = begun - tl.signaled["approve"] if begun else float("nan")
            row["to_write"][(side, label)] = value
    # The fleet's record: exactly one write for each approved incident, none for any other.
    for incident_id in p.opened:
        kinds = writes.get(incident_id, [])
        want = ["rollback"] if incident_id in p.approved else []
        if kinds != want:
            r.problems.append(f"{incident_id}: the fleet recorded writes {kinds}, expected {want}")
    for incident_id in p.hand_services:
        kinds = writes.get(incident_id, [])
        want = ["rollback"] if incident_id in p.hand_approved else []
        if kinds != want:
            r.problems.append(f"hand-rolled {incident_id}: the fleet recorded writes {kinds}, expected {want}")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds == seconds else "-"


def table(r: Results, cfg: Config) -> str:
    """Each figure for the three sides. Goals against bare are the engine's; against hand-rolled, the price
    of governance (the same reads, write, ticket and approval, without the broker and its checks)."""
    rows: list[tuple[str, ...]] = [("figure", "Firebreak", "bare Temporal", "hand-rolled", "vs bare",
                                    "vs hand-rolled", "goal", "met")]

    def p50(values: dict[str, list[float]], side: str, q: float = 50) -> float:
        return pct(values.get(side, []), q)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b == b and b else "-"

    def plus(a: float, b: float) -> str:
        return f"{'+' if a >= b else '-'}{ms(abs(a - b))}" if a == a and b == b else "-"

    def side_row(name: str, values: dict[str, list[float]], q: float, compare: Callable[[float, float], str],
                 goal: str = "", met: str = "") -> tuple[str, ...]:
        fb, bare, hand = (p50(values, side, q) for side in SIDES)
        return (name, ms(fb), ms(bare), ms(hand), compare(fb, bare), compare(fb, hand), goal, met)

    e = r.engine_s
    n = len(e.get("firebreak", []))
    eng50 = p50(e, "firebreak") / p50(e, "bare") if e.get("bare") else float("nan")
    eng95 = p50(e, "firebreak", 95) / p50(e, "bare", 95) if e.get("bare") else float("nan")
    rows.append(side_row(f"1 engine time to proposal p50 (n={n})", e, 50, ratio, "<= 1.25x bare; p50 < 1 s",
                         _met(eng50 <= 1.25 and p50(e, "firebreak") < 1.0)))
    rows.append(side_row("  engine time to proposal p95", e, 95, ratio, "<= 1.25x bare", _met(eng95 <= 1.25)))
    prop = r.proposal_s
    prop50 = p50(prop, "firebreak") / p50(prop, "hand-rolled") if prop.get("hand-rolled") else float("nan")
    rows.append(side_row("  202 to proposal, queries included, p50", prop, 50, ratio, "<= 1.15x hand-rolled",
                         _met(prop50 <= 1.15)))
    rows.append(side_row("  202 to proposal, queries included, p95", prop, 95, ratio))
    w = r.to_write_s
    gap = p50(w, "firebreak") - p50(w, "hand-rolled")
    rows.append(side_row(f"2 approval to first write p50 (n={len(w.get('firebreak', []))})", w, 50, plus,
                         "p50 <= 100 ms; within 20 ms of hand-rolled",
                         _met(p50(w, "firebreak") <= 0.1) + "; " + _met(gap <= 0.020)))
    rows.append(side_row("  approval to first write p95", w, 95, plus))
    rows.append(side_row("  from the approval call (bench clock) p50", r.sent_to_write_s, 50, plus))
    t = r.throughput
    t_fb, t_bare, t_hand = (t.get(side, 0.0) for side in SIDES)
    vs_bare = t_fb / t_bare if t_bare else float("nan")
    vs_hand = t_fb / t_hand if t_hand else float("nan")
    rows.append((f"3 throughput, incidents/s (n={cfg.throughput} a side)", f"{t_fb:.2f}/s", f"{t_bare:.2f}/s",
                 f"{t_hand:.2f}/s", f"{vs_bare:.2f}x", f"{vs_hand:.2f}x", ">= 0.8x bare; >= 0.85x hand-rolled",
                 _met(vs_bare >= 0.8) + "; " + _met(vs_hand >= 0.85)))
    for row in r.held:
        count, rss = row["count"], row["rss_mb"]
        big = count == max(cfg.held)
        rows.append((f"4 worker RSS, {count:,} awaiting approval", *(f"{rss[side]:.0f} MB" for side in SIDES),
                     f"{rss['firebreak'] / rss['bare']:.1f}x", f"{rss['firebreak'] / rss['hand-rolled']:.1f}x",
                     "< 1 GB at 10,000" if big else "", _met(rss["firebreak"] < 1024) if big else ""))
        tw = row.get("to_write", {})
        for label in ("evicted", "oldest", "cached"):
            if ("firebreak", label) in tw:
                rows.append((f"  approve to write, {label}, cache {cfg.cache:,}",
                             *(ms(tw.get((side, label), float("nan"))) for side in SIDES), "", "", "reported", ""))
    calls = {side: [o.call_s for o in r.opened[side]] for side in SIDES}
    diff = pct(calls["firebreak"], 50) - pct(calls["bare"], 50)
    rows.append(side_row(f"5 single-alert webhook p50 (n={len(calls['firebreak'])})", calls, 50, plus,
                         "within 15 ms of bare", _met(diff <= 0.015)))
    rows.append(side_row("  single-alert webhook p99", calls, 99, plus))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("hand-rolled: the same reads, diagnosis, tickets and write (bench/handrolled.py), one approval signal, "
                 "one standing token at the fleet; its start is a start_workflow call, not a webhook")
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def breakdown_table(parts: list[dict[str, float]]) -> str:
    keys: list[str] = []
    for p in parts:
        keys += [k for k in p if k not in keys]
    lines = [f"{'part (per incident; * off the critical path)':<52} {'p50':>9} {'p95':>9}  n"]
    for k in keys:
        values = [p[k] for p in parts if k in p]
        lines.append(f"{k:<52} {ms(pct(values, 50)):>9} {ms(pct(values, 95)):>9}  {len(values)}")
    return "\n".join(lines)


def cpu_table(r: Results, per_side: int) -> str:
    """CPU per complete incident, by component, over the throughput phase (either side's run shows the
    other side's idle worker too)."""
    names = sorted({n for spent in r.cpu.values() for n in spent}, key=lambda n: -r.cpu.get("firebreak", {}).get(n, 0))
    lines = [f"{'CPU per complete incident (throughput phase)':<52} {'Firebreak':>9} {'bare':>9} {'hand-rolled':>11}"]
    for name in names:
        fb, bare, hand = (r.cpu.get(side, {}).get(name, 0.0) / max(1, per_side) for side in SIDES)
        lines.append(f"{name:<52} {ms(fb):>9} {ms(bare):>9} {ms(hand):>11}")
    total = [sum(r.cpu.get(side, {}).values()) / max(1, per_side) for side in SIDES]
    lines.append(f"{'all components':<52} {ms(total[0]):>9} {ms(total[1]):>9} {ms(total[2]):>11}")
    busy = [t * r.throughput.get(side, 0.0) for t, side in zip(total, SIDES)]
    lines.append(f"{f'cores busy, of {os.cpu_count()} (bench driver not counted)':<52} "
                 f"{busy[0]:>9.2f} {busy[1]:>9.2f} {busy[2]:>11.2f}")
    return "\n".join(lines + goal3_budget(r, per_side))


def goal3_budget(r: Results, per_side: int) -> list[str]:
    """Goal 3 as CPU: when both sides keep the machine busy, throughput goes as 1 / CPU per incident, so
    0.8x bare allows bare's CPU / 0.8. What bare has no counterpart of is spent before Temporal and the
    worker do anything."""
    bare, fb = ({n: v / max(1, per_side) for n, v in r.cpu.get(side, {}).items()} for side in ("bare", "firebreak"))
    if not bare or not fb:
        return []
    engine = ("temporal", "worker", "bare-worker")
    others = [n for n in fb if n not in engine and n != WORKER["hand-rolled"]]  # that one idles in this phase
    bare_all = sum(bare.values())
    allowed, extra = bare_all / 0.8, sum(fb[n] for n in others)
    return ["", f"goal 3 as CPU: 0.8x bare allows {ms(allowed)} per incident (bare's {ms(bare_all)} / 0.8);",
            f"  components bare has no counterpart of ({', '.join(others)}) spend {ms(extra)},",
            f"  which leaves {ms(allowed - extra)} for Temporal and the worker, where bare's spend"
            f" {ms(sum(bare.get(n, 0.0) for n in engine))} on as many no-op activities"
            f" (Firebreak's: {ms(sum(fb.get(n, 0.0) for n in engine))})"]


def task_table(r: Results) -> str:
    """Workflow tasks, scheduled to completed, per side: the first (a new run in the worker) and the rest."""
    lines = [f"{'workflow tasks (history)':<52} {'p50':>9} {'p95':>9}  n"]
    for side in SIDES:
        tls = list(r.timelines.get(side, {}).values())
        first = [t.task_spans[0][1] - t.task_spans[0][0] for t in tls if t.task_spans]
        rest = [b - a for t in tls for a, b in t.task_spans[1:]]
        per_run = [float(t.tasks) for t in tls]
        for name, values in (("first task", first), ("later tasks", rest)):
            lines.append(f"{side + ': ' + name:<52} {ms(pct(values, 50)):>9} {ms(pct(values, 95)):>9}  {len(values)}")
        lines.append(f"{side + ': tasks per run':<52} {pct(per_run, 50):>9.0f} {pct(per_run, 95):>9.0f}  {len(per_run)}")
        lines.append(f"{side + ': tasks over 5 s, all phases (its log)':<52} {r.slow_tasks.get(side, 0):>9}")
    return "\n".join(lines)


def biggest(parts: list[dict[str, float]]) -> str:
    """The costliest single part on the critical path (sums and spans of several parts left out)."""
    leaves = {}
    for k in {k for p in parts for k in p}:
        if (k.endswith("*") or ": 202 to " in k or k.startswith("approval to") or "all (parallel)" in k
                or "(sum)" in k or k.endswith(": activity") or k.startswith("intake")):
            continue
        leaves[k] = pct([p[k] for p in parts if k in p], 50)
    name = max(leaves, key=lambda k: leaves[k]) if leaves else "-"
    return f"{name.strip()} ({ms(leaves.get(name, float('nan')))} at p50)"


# -- running it -------------------------------------------------------------------------------


async def bench(cfg: Config, state: Path, prometheus: bool, profile: dict[str, Path] | None = None) -> int:
    receiver = SpanReceiver().start()
    stack = PipelineStack(state, runbook_text(prometheus),
                          synthetic=2 * services_a_side(cfg) + 10,  # Firebreak's and hand-rolled's incidents
                          otlp_endpoint=receiver.endpoint, with_prometheus=prometheus,
                          profile={name: out.resolve() for name, out in (profile or {}).items()},
                          worker_env={"FIREBREAK_WORKFLOW_CACHE": str(cfg.cache)}, bare_cache=cfg.cache)
    r = Results()
    clock = time.perf_counter()
    from workflows.incident import IncidentWorkflow  # the code the worker starts with, for the replay check

    try:
        stack.start()
        r.seconds["stack"] = time.perf_counter() - clock
        note(f"stack up in {r.seconds['stack']:.0f}s: state {state}; Temporal {stack.temporal_address}; "
             f"Prometheus {'yes' if prometheus else 'no'}")
        firebreak = await connect(load_settings(state).temporal)
        bare = await Client.connect(stack.temporal_address, data_converter=pydantic_data_converter)
        token = stack_info(state, stack.api_url)["intake_token"]
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            p = Pipeline(stack, firebreak, bare, http, token, bare_shape(prometheus))
            for name, phase in (("warm-up", warm_up), ("proposals and approvals", propose_and_approve),
                                ("throughput", throughput), ("held open", held_open)):
                if name == "held open" and not cfg.held:
                    continue
                started = time.perf_counter()
                note(f"{name} ...")
                await phase(p, cfg, r)
                r.seconds[name] = time.perf_counter() - started
            await analyse(p, receiver, r)
            r.slow_tasks = stack.slow_workflow_tasks()
            r.problems += [f"{i}: {phase} before the bench approved it" for i, phase in p.closed_early.items()]
            report(r, cfg)  # the figures first: a failing check below never loses them
            await replay_check(p, r, IncidentWorkflow)
        for problem in r.problems[:SHOWN_PROBLEMS]:
            print(f"CHECK FAILED: {problem}")
        if len(r.problems) > SHOWN_PROBLEMS:
            print(f"CHECK FAILED: {len(r.problems) - SHOWN_PROBLEMS} more problems ({len(r.problems)} in all), "
                  f"of which {len(p.closed_early)} closed before approval")
        if not r.problems:
            print(f"checks: {len(p.approved)} approved incidents resolved, each written exactly once at the fleet; "
                  f"{len(p.opened) - len(p.approved)} left open, none written; {r.replayed} histories replay; "
                  f"hand-rolled: {len(p.hand_approved)} approved, each written exactly once, "
                  f"{len(p.hand_services) - len(p.hand_approved)} left open, none written")
        print(f"total {time.perf_counter() - clock:.0f}s")
        return 1 if r.problems else 0
    finally:
        stack.stop()
        receiver.stop()


def report(r: Results, cfg: Config) -> None:
    print()
    print(table(r, cfg))
    print()
    print(breakdown_table(r.parts))
    print()
    print(task_table(r))
    print()
    print(cpu_table(r, 2 * (cfg.throughput // 2)))
    print(f"\nbiggest cost on the critical path: {biggest(r.parts)}")
    print("phases: " + ", ".join(f"{k} {v:.0f}s" for k, v in r.seconds.items()), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--incidents", type=int, default=100, help="a side, for figures 1, 2 and 5")
    parser.add_argument("--throughput", type=int, default=200, help="a side, for figure 3")
    parser.add_argument("--held", default="1000,10000", help="open incidents for figure 4, comma-separated; '' skips")
    parser.add_argument("--concurrency", type=int, default=10, help="on both sides")
    parser.add_argument("--warmup", type=int, default=3, help="incidents a side before anything is measured")
    parser.add_argument("--workflow-cache", type=int, default=1000, help="the workers' workflow cache size")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 a side, 20 for throughput, 30 and 60 held (cache 20)")
    parser.add_argument("--no-prometheus", action="store_true", help="even if it is installed")
    parser.add_argument("--state-dir", type=Path, default=None, help="kept afterwards (default: a temp dir, removed)")
    parser.add_argument("--profile", action="append", default=[], metavar="NAME=FILE",
                        help="sample the stacks of the worker or the broker into FILE (repeatable)")
    args = parser.parse_args(argv)
    cfg = Config(incidents=args.incidents, throughput=args.throughput, concurrency=args.concurrency,
                 held=tuple(int(n) for n in args.held.split(",") if n.strip()), warmup=args.warmup,
                 cache=args.workflow_cache)
    if args.quick:
        # A cache smaller than what is held, so that the oldest incident is evicted in a smoke run too.
        cfg = Config(incidents=20, throughput=20, held=(30, 60), concurrency=args.concurrency, warmup=2, cache=20)
    prometheus = has_prometheus() and not args.no_prometheus
    profile = {}
    for item in args.profile:
        name, _, out = item.partition("=")
        if name not in ("worker", "broker") or not out:
            parser.error(f"--profile {item!r}: expected worker=FILE or broker=FILE")
        profile[name] = Path(out)
    if args.state_dir:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(bench(cfg, args.state_dir, prometheus, profile))
    with tempfile.TemporaryDirectory(prefix="firebreak-pipeline-") as tmp:
        return asyncio.run(bench(cfg, Path(tmp), prometheus, profile))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    import os

    os._exit(code)  # sdk-python#300: a process that used a client can abort at interpreter shutdown
