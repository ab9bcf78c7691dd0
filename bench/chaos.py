"""Chaos suite: remediation survives crashes and restarts, and never acts twice.

    python -m bench.chaos                # 72 incidents (+6 rollbacks): >=50 worker kills, 5+ server and broker restarts
    python -m bench.chaos --quick        # 16 incidents (+2 rollbacks): >=10 worker kills, 1+ server restart
    python -m bench.chaos --workers 3    # three workers on one task queue, killed one at a time

Starts its own real stack on free ports (``bench/chaos_stack.py``): the Temporal dev server on a
SQLite file in WAL mode, the broker, the demo fleet, Prometheus when installed, and ``worker.py``
processes. Workers reach the fleet and Prometheus through fault proxies (``bench/chaos_proxy.py``).

First, one undisturbed incident of each kind (``bench/chaos_scenarios.py``) gives the ending and the
writes every other incident of that kind must reach. Then incidents run concurrently, each with one
fault at its own point of the incident's life: worker SIGKILL (during investigation, awaiting
approval, between approval and the write, inside the write, during verification, and the replacement
again right after it started), dev-server SIGKILL and restart on the same SQLite file, broker SIGKILL
and restart while a step holds its credential, the target refusing a write or losing its answer, and
Prometheus unreachable during investigation or verification. Kills happen one at a time.

Writes are counted from the fleet's own change log, never by asking Firebreak. Prints the faults
injected by kind with the time each took to recover (the incident's next phase), the incidents with
the expected ending, a wrong one, or stuck, and duplicate and missing writes. Exit code 1 unless all
of those are zero.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent

from temporalio.api.enums.v1 import PendingActivityState  # noqa: E402
from temporalio.client import Client, WorkflowExecutionStatus  # noqa: E402
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter  # noqa: E402
from temporalio.service import RPCError  # noqa: E402

from bench.chaos_ledger import Expected, Outcome, judge, table, writes_by_incident  # noqa: E402
from bench.chaos_proxy import FleetProxy, Rule, TcpSwitch  # noqa: E402
from bench.chaos_scenarios import Fault, Kind, Planned, plan, write_runbooks  # noqa: E402
from bench.chaos_stack import TASK_QUEUE, ChaosStack  # noqa: E402
from firebreak import signing  # noqa: E402
from firebreak.config import TemporalSettings  # noqa: E402
from firebreak.contracts import Alert, Approval  # noqa: E402
from firebreak.incidents import MEMO_KEY  # noqa: E402
from firebreak.intake import deliver_routed, route_alerts  # noqa: E402
from firebreak.receipts import ensure_intake_key, intake_signer  # noqa: E402
from firebreak.runbook import load_runbooks  # noqa: E402
from firebreak.temporal import PHASE, connect  # noqa: E402

T = TypeVar("T")
STARTED = PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
HOLD_S = 4.0  # how long the fleet proxy holds a request: the window in which its worker is killed


@dataclass
class Snapshot:
    running: bool
    phase: str
    plan_hash: str | None
    started: list[tuple[str, str]]  # (activity type, worker identity) of activities running now
    outcome: str = ""  # the incident's own account of its ending (from its memo)


class Chaos:
    """The stack, the proxies and the fault injectors, shared by every incident's driver."""

    def __init__(self, stack: ChaosStack, workers: int, rng: random.Random) -> None:
        self.stack = stack
        self.worker_target = workers
        self.rng = rng
        self.fleet_proxy = FleetProxy(stack.ports["fleet"])
        self.prometheus = TcpSwitch(stack.ports["prometheus"])
        self.client: Client | None = None
        self.kill_lock = asyncio.Lock()  # one kill (of anything) at a time
        self.prometheus_down_by = 0
        self.injected: Counter[str] = Counter()
        self.recoveries: dict[str, list[float]] = defaultdict(list)
        self.watchers: list[asyncio.Task[None]] = []
        self.not_injected: list[str] = []
        self.key = signing.load_private_key(stack.state / "keys" / "alice.pem")
        self.receipts = intake_signer(ensure_intake_key(stack.state))
        self.runbooks = load_runbooks(stack.runbooks)
        self.run = uuid.uuid4().hex[:6]

    async def start(self) -> None:
        await self.fleet_proxy.start()
        await self.prometheus.start()
        self.stack.write_worker_settings(self.fleet_proxy.port, self.prometheus.port)
        self.client = await connect(TemporalSettings(address=self.stack.temporal_address, task_queue=TASK_QUEUE,
                                                     payload_key_file=str(self.stack.payload_key)))
        for _ in range(self.worker_target):
            await self._replace_worker()

    # -- talking to Temporal through restarts -------------------------------------------------

    async def retrying(self, call: Callable[[], Awaitable[T]], what: str, timeout: float = 90.0) -> T:
        """``call``, again and again while the server is away (it restarts within seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await call()
            except (RPCError, ConnectionError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what}: Temporal did not answer for {timeout:.0f}s ({exc})") from exc
                await asyncio.sleep(0.5)

    async def snapshot(self, incident_id: str) -> Snapshot:
        assert self.client is not None
        description = await self.retrying(lambda: self.client.get_workflow_handle(incident_id).describe(),
                                          f"describe {incident_id}")
        memo = await description.memo_value(MEMO_KEY, None)
        started = [(p.activity_type.name, p.last_worker_identity)
                   for p in description.raw_description.pending_activities if p.state == STARTED]
        return Snapshot(running=description.status == WorkflowExecutionStatus.RUNNING,
                        phase=description.typed_search_attributes.get(PHASE) or "",
                        plan_hash=(memo or {}).get("plan_hash"), started=started,
                        outcome=str((memo or {}).get("outcome") or ""))

    async def wait_for(self, incident_id: str, predicate: Callable[[Snapshot], bool], timeout: float,
                       interval: float = 0.2) -> Snapshot:
        deadline = time.monotonic() + timeout
        while True:
            snap = await self.snapshot(incident_id)
            if predicate(snap) or time.monotonic() > deadline:
                return snap
            await asyncio.sleep(interval)

    # -- faults ----------------------------------------------------------------------------

    def record(self, fault: Fault, incident_id: str, phase: str) -> None:
        """Count the fault and time the incident's recovery: until its next phase, or its end."""
        self.injected[fault.value] += 1
        began = time.monotonic()

        async def watch() -> None:
            snap = await self.wait_for(incident_id, lambda s: not s.running or s.phase != phase, timeout=600,
                                       interval=0.5)
            if not snap.running or snap.phase != phase:
                self.recoveries[fault.value].append(time.monotonic() - began)

        self.watchers.append(asyncio.create_task(watch()))

    async def _replace_worker(self, again: tuple[str, str] | None = None) -> None:
        """Start a worker; ``again`` (incident, phase): kill it while it starts up, and start another."""
        process = self.stack.spawn_worker()
        if again is not None:
            await asyncio.sleep(self.rng.uniform(0.3, 1.5))  # while it connects, builds and replays
            self.stack.kill_worker(process.pid)
            self.record(Fault.kill_after_restart, *again)
            process = self.stack.spawn_worker()
        await asyncio.to_thread(self.stack.wait_worker_ready, process)

    async def kill_worker(self, fault: Fault, incident_id: str, phase: str, identity: str | None,
                          then_kill_replacement: bool) -> None:
        """SIGKILL the worker with this identity (``pid@host``), or any, then start its replacement."""
        async with self.kill_lock:
            pid = int(identity.split("@", 1)[0]) if identity and identity.split("@", 1)[0].isdigit() else None
            if pid not in self.stack.workers:
                pid = self.rng.choice(sorted(self.stack.workers))
            self.stack.kill_worker(pid)
            self.record(fault, incident_id, phase)
            await self._replace_worker(again=(incident_id, phase) if then_kill_replacement else None)

    async def restart_server(self, incident_id: str, phase: str) -> None:
        async with self.kill_lock:
            self.stack.kill_temporal()
            self.record(Fault.server_restart, incident_id, phase)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.stack.start_temporal)

    async def restart_broker(self, incident_id: str, phase: str) -> None:
        async with self.kill_lock:
            self.stack.kill_broker()
            self.record(Fault.broker_restart, incident_id, phase)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.stack.start_broker)

    async def prometheus_away(self, seconds: float, counted: tuple[Fault, str, str] | None = None) -> None:
        """Prometheus unreachable for ``seconds``; ``counted`` (fault, incident, phase) records it as that
        fault, else it only opens a window for another fault."""
        self.prometheus_down_by += 1
        self.prometheus.set_up(False)
        if counted is not None:
            self.record(*counted)
        await asyncio.sleep(seconds)
        self.prometheus_down_by -= 1
        if not self.prometheus_down_by:
            self.prometheus.set_up(True)

    async def _running(self, incident_id: str, activity: str, timeout: float) -> tuple[bool, str | None]:
        """Wait until ``activity`` runs in a worker: (seen, that worker's identity); not seen if the
        incident ended first or it did not start in time."""
        snap = await self.wait_for(incident_id, lambda s: any(a == activity for a, _ in s.started) or not s.running,
                                   timeout, interval=0.1)
        identity = next((w for a, w in snap.started if a == activity), None)
        return identity is not None, identity

    async def _hit(self, rule: Rule, incident_id: str, timeout: float) -> bool:
        """Whether the incident's request reached the proxy in time: if not, the fault is not injected
        (the incident went another way, which its ending will show)."""
        try:
            await asyncio.wait_for(rule.hit.wait(), timeout)
            return True
        except TimeoutError:
            self.not_injected.append(f"{incident_id}: its {rule.method} never reached the fleet proxy")
            return False

    # -- one incident ----------------------------------------------------------------------

    async def incident(self, planned: Planned | None, kind: Kind, service: str, index: int,
                       deadline_s: float) -> Outcome:
        """Open an incident, approve its plan when proposed, inject its fault, and read how it ended."""
        fault = planned.fault if planned else None
        again = bool(planned and planned.then_kill_replacement)
        incident_id = f"chaos.{service}.{self.run}{index:03d}"
        background: list[asyncio.Task[None]] = []
        if fault is Fault.prometheus_investigating:
            background.append(asyncio.create_task(self.prometheus_away(5.0, (fault, incident_id, "investigating"))))
        held = self.fleet_proxy.add(Rule(incident_id, "GET", "hold", hold_s=HOLD_S)) \
            if fault is Fault.kill_investigating else None
        await self.open(kind, service, incident_id)
        if held is not None and await self._hit(held, incident_id, 30):
            # Its change-log read is held at the proxy: the investigation is running in a worker.
            _, identity = await self._running(incident_id, "investigate", 10)
            await self.kill_worker(Fault.kill_investigating, incident_id, "investigating", identity, again)

        snap = await self.wait_for(incident_id, lambda s: s.phase == "awaiting_approval" and bool(s.plan_hash)
                                   or not s.running, deadline_s)
        if not snap.running or snap.phase != "awaiting_approval" or snap.plan_hash is None:
            outcome = await self.ending(incident_id, kind, fault, deadline_s)
            await asyncio.gather(*background)
            return outcome
        if fault is Fault.kill_awaiting:
            await self.kill_worker(fault, incident_id, "awaiting_approval", None, again)
        if fault is Fault.server_restart and not index % 2:
            await self.restart_server(incident_id, "awaiting_approval")
        write = self._arm_write_fault(incident_id, fault, index)
        await self.approve(incident_id, snap.plan_hash)
        if fault is Fault.kill_after_approval:
            await self.kill_worker(fault, incident_id, "awaiting_approval", None, again)
        if write is not None and fault is not None and await self._hit(write, incident_id, 60):
            await self._at_the_write(incident_id, fault, write, again)
        if fault in (Fault.kill_verifying, Fault.prometheus_verifying):
            # A verification that holds is over in one poll. Prometheus unreachable from the write on keeps it
            # polling: the fault itself, or the window in which to kill the worker running it.
            background.append(asyncio.create_task(self.prometheus_away(10.0)))
            seen, identity = await self._running(incident_id, "verify_step", 30)
            if not seen:
                self.not_injected.append(f"{incident_id}: ended before its verification was seen running")
            elif fault is Fault.prometheus_verifying:
                self.record(fault, incident_id, "verifying")
            else:
                await self.kill_worker(fault, incident_id, "verifying", identity, again)
        outcome = await self.ending(incident_id, kind, fault, deadline_s)
        await asyncio.gather(*background)
        return outcome

    def _arm_write_fault(self, incident_id: str, fault: Fault | None, index: int) -> Rule | None:
        """Before the approval: what the fleet proxy does to this incident's first write."""
        if fault in (Fault.kill_in_write, Fault.broker_restart) or (fault is Fault.server_restart and index % 2):
            return self.fleet_proxy.add(Rule(incident_id, "POST", "hold", hold_s=HOLD_S))
        if fault is Fault.target_refused:
            # Refused from the first write on; once it arrives, for 6 s more: its retries meet the outage too.
            return self.fleet_proxy.add(Rule(incident_id, "POST", "refuse", until=time.monotonic() + 1e9))
        if fault is Fault.target_lost_answer:
            return self.fleet_proxy.add(Rule(incident_id, "POST", "lose_response"))
        return None

    async def _at_the_write(self, incident_id: str, fault: Fault, write: Rule, again: bool) -> None:
        """The write reached the proxy (held, refused or about to lose its answer): strike now."""
        if fault in (Fault.target_refused, Fault.target_lost_answer):
            self.record(fault, incident_id, "executing")
            write.until = time.monotonic() + 6.0
        elif fault is Fault.kill_in_write:
            _, identity = await self._running(incident_id, "execute_step", 10)
            await self.kill_worker(fault, incident_id, "executing", identity, again)
        elif fault is Fault.broker_restart:
            await self.restart_broker(incident_id, "executing")
        elif fault is Fault.server_restart:
            await self.restart_server(incident_id, "executing")

    async def open(self, kind: Kind, service: str, incident_id: str) -> None:
        shard = incident_id.rsplit(".", 1)[1]
        alert = Alert(source="chaos", fingerprint=uuid.uuid4().hex[:16], starts_at=datetime.now(timezone.utc),
                      labels={"alertname": kind.alertname, "namespace": "shop", "service": service, "shard": shard,
                              "severity": "critical"})
        [routed] = route_alerts(self.runbooks, [alert]).routed
        assert routed.incident_id == incident_id, routed.incident_id
        assert self.client is not None
        await self.retrying(lambda: deliver_routed(self.client, routed, task_queue=TASK_QUEUE, receipt=self.receipts),
                            f"open {incident_id}")

    async def approve(self, incident_id: str, plan_hash: str) -> None:
        approval = signing.sign_approval(Approval(
            workflow_id=incident_id, plan_hash=plan_hash, decision="approve", nonce=uuid.uuid4().hex,
            expires_at=(datetime.now(timezone.utc) + timedelta(minutes=30)).isoformat(timespec="seconds"),
            approver="alice"), self.key)
        assert self.client is not None
        # The signal: recorded in history at once, whether or not a worker is up to answer an update.
        await self.retrying(lambda: self.client.get_workflow_handle(incident_id).signal(
            "approval", approval.model_dump(mode="json")), f"approve {incident_id}")

    async def ending(self, incident_id: str, kind: Kind, fault: Fault | None, deadline_s: float) -> Outcome:
        snap = await self.wait_for(incident_id, lambda s: not s.running, deadline_s, interval=0.5)
        detail = (f"last phase {snap.phase}, running {', '.join(a for a, _ in snap.started) or 'nothing'}"
                  if snap.running else snap.outcome)
        return Outcome(incident_id, kind.value, fault.value if fault else "none",
                       None if snap.running else snap.phase, [], detail)


# -- the run --------------------------------------------------------------------------------


@dataclass
class Options:
    incidents: int
    rollbacks: int
    workers: int
    stagger_s: float
    deadline_s: float
    seed: int
    with_prometheus: bool = True
    only: frozenset[Fault] | None = None
    state: Path | None = None
    log: Callable[[str], None] = field(default=print)


async def baseline(chaos: Chaos, deadline_s: float) -> dict[str, Expected]:
    """One undisturbed incident of each kind: the ending and writes every disturbed one must match."""
    outcomes = await asyncio.gather(
        chaos.incident(None, Kind.restart, "checkout", 900, deadline_s),
        chaos.incident(None, Kind.rollback, "inventory", 901, deadline_s))
    writes = writes_by_incident(await asyncio.to_thread(chaos.stack.fleet_state))
    expected = {}
    for outcome in outcomes:
        made = writes.get(outcome.incident_id, [])
        # Nothing to measure against unless the undisturbed incident remediated: each kind acts at least once
        # and ends on its own (a plan that can never write would make every disturbed twin look right).
        if outcome.ending not in REMEDIATED or not made:
            raise BaselineFailed(f"the undisturbed {outcome.kind} incident ended {outcome.ending} with writes "
                                 f"{made}: {outcome.detail}")
        expected[outcome.kind] = Expected(outcome.ending, made)
    return expected


REMEDIATED = ("resolved", "rolled_back")


class BaselineFailed(RuntimeError):
    """The undisturbed incidents did not remediate: the stack is broken before any fault."""


async def run(options: Options) -> int:
    state = options.state or Path(tempfile.mkdtemp(prefix="firebreak-chaos-"))
    stack = ChaosStack(state=state, runbooks=write_runbooks(state / "runbooks"), chaos_token=uuid.uuid4().hex)
    rng = random.Random(options.seed)
    chaos: Chaos | None = None
    try:
        started = time.monotonic()
        await asyncio.to_thread(stack.start, options.with_prometheus)
        for service in ("checkout", "payments", "inventory"):
            stack.inject(service, "bad_deploy")  # a recent change to find, and a version to roll back
        chaos = Chaos(stack, options.workers, rng)
        await chaos.start()
        options.log(f"stack up in {time.monotonic() - started:.0f}s ({state}); Prometheus: "
                    f"{'yes' if stack.prometheus else 'not installed'}; workers: {options.workers}")
        try:
            expected = await baseline(chaos, options.deadline_s)
        except BaselineFailed as exc:
            options.log(f"BASELINE FAILED: {exc}")
            return 1
        options.log("undisturbed: " + "; ".join(f"{k} -> {e.ending}, writes {e.writes}" for k, e in expected.items()))

        planned = plan(options.incidents, options.rollbacks, only=options.only)

        async def restart_incident(p: Planned) -> Outcome:
            await asyncio.sleep(p.index * options.stagger_s)
            return await chaos.incident(p, p.kind, p.service, p.index, options.deadline_s)

        async def rollbacks_in_turn() -> list[Outcome]:
            outcomes = []
            for p in (p for p in planned if p.kind is Kind.rollback):
                outcomes.append(await chaos.incident(p, p.kind, p.service, p.index, options.deadline_s))
            return outcomes

        chaos_started = time.monotonic()
        results = await asyncio.gather(rollbacks_in_turn(),
                                       *[restart_incident(p) for p in planned if p.kind is Kind.restart])
        outcomes = [*results[0], *results[1:]]
        await asyncio.gather(*chaos.watchers)
        writes = writes_by_incident(await asyncio.to_thread(stack.fleet_state))
        for outcome in outcomes:
            outcome.writes = writes.get(outcome.incident_id, [])
        verdict = judge(outcomes, expected)
        options.log("")
        options.log(table(chaos.injected, chaos.recoveries, outcomes, expected, verdict, options.workers))
        options.log(f"chaos phase {time.monotonic() - chaos_started:.0f}s, whole run {time.monotonic() - started:.0f}s")
        for problem in verdict.problems:
            options.log(f"PROBLEM: {problem}")
        for note in chaos.not_injected:
            options.log(f"not injected: {note}")
        return 0 if verdict.clean else 1
    finally:
        if chaos is not None:
            await chaos.fleet_proxy.stop()
            await chaos.prometheus.stop()
        stack.stop()
        if options.state is None:
            shutil.rmtree(state, ignore_errors=True)


def options_from(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 incidents + 2 rollbacks: the CI variant")
    parser.add_argument("--incidents", type=int, default=None, help="restart incidents (default 72; quick 16)")
    parser.add_argument("--rollbacks", type=int, default=None, help="rollback incidents, one at a time (6; quick 2)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on the one task queue")
    parser.add_argument("--stagger", type=float, default=None, help="seconds between incident starts (4; quick 3)")
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds an incident may take before it is stuck")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus even if installed")
    parser.add_argument("--state-dir", type=Path, default=None, help="kept afterwards (default: a temp dir)")
    parser.add_argument("--only", action="append", choices=[f.name for f in Fault], default=None,
                        help="inject only this fault (repeatable), e.g. --only target_lost_answer")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    return Options(
        incidents=args.incidents if args.incidents is not None else (16 if args.quick else 72),
        rollbacks=args.rollbacks if args.rollbacks is not None else (2 if args.quick else 6),
        workers=args.workers, stagger_s=args.stagger if args.stagger is not None else (3.0 if args.quick else 4.0),
        deadline_s=args.deadline, seed=seed, with_prometheus=not args.no_prometheus, state=args.state_dir,
        only=frozenset(Fault[name] for name in args.only) if args.only else None,
    )


def quiet_temporal_client() -> None:
    """The client's core logs every retried call as a warning; while the suite restarts the server on
    purpose those are expected, so only errors are shown."""
    Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(
        filter=TelemetryFilter(core_level="ERROR", other_level="ERROR")))), error_if_already_set=False)


def main(argv: Sequence[str] | None = None) -> int:
    options = options_from(argv)
    quiet_temporal_client()
    print(f"chaos: seed {options.seed}", flush=True)
    return asyncio.run(run(options))


if __name__ == "__main__":
    raise SystemExit(main())
