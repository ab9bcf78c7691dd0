"""The credential broker at its limit: mint and release (revoke) pairs from concurrent clients, beside the floor.

    python -m bench.broker            # 4,000 read pairs and 2,000 write pairs, 16 clients
    python -m bench.broker --quick    # a smoke run in well under a minute
    python -m bench.broker --reads-only
    python -m bench.broker --profile OUT.txt   # the broker's Python stacks, sampled (written every 5 s)

Starts the real broker as its own process (``python -m firebreak.broker``, as ``bench/pipeline_stack.py``
does) on a free port, with the shipped bad-deploy runbook, a roster of one approver, and the demo's catalog (the broker checks
each write's blast radius against its own catalog read), and nothing else.
Several clients (each its own connection) take pairs from one queue: a mint, then the revoke of what it
issued, as an activity does. Two kinds of pair:

* read: a declared read of the runbook (``metrics.read`` at Prometheus);
* write: the rollback step, with its plan, one signed approval and the intake's signed receipt, each
  write for its own incident and run (the broker records each plan's authorization at its first
  write, and spends an approval once per step and run). Plans,
  approvals and receipts are made before the clock starts: they are the approver's and the intake's
  work, not the broker's.

Printed per kind: pairs/s, pair p50 and p99 (mint and revoke apart too), and CPU per pair in the broker
(from /proc) and in the bench's clients. Beside them, measured in the same run by the same number of
threads in this process: the floor, one Ed25519 signature (``signing.mint_token``) plus one group-committed
journal append (``DurableState``, the broker's own storage) per operation. A pair is two such appends
at the broker (the grant, its revocation). Goal: at least 2,000 pairs/s on one core, p99 under 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from bench.chaos_stack import free_port
from demo.catalog import add_routes as add_catalog_routes
from firebreak import signing
from firebreak.blast_radius import BlastRadius
from firebreak.broker.client import BrokerClient, TokenFile
from firebreak.broker.state import DurableState, GrantRecord
from firebreak.contracts import Approval, Hypothesis
from firebreak.plan import build_plan
from firebreak.receipts import ensure_intake_key, intake_signer
from firebreak.roster import entry_yaml
from firebreak.runbook import Runbook, default_runbook_dir, load_runbooks
from firebreak.serving import ThreadedServer
from firebreak.stack import Stack, wait_http

APPROVER = "bench-approver"
PARAMS = {"namespace": "shop", "service": "checkout"}
GOAL_PAIRS_S, GOAL_P99_S = 2000.0, 0.010


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds == seconds else "-"  # noqa: PLR0124 - NaN check


@dataclass
class Figures:
    name: str
    count: int = 0
    seconds: float = 0.0
    pair_s: list[float] = field(default_factory=list)
    mint_s: list[float] = field(default_factory=list)
    revoke_s: list[float] = field(default_factory=list)
    server_cpu_s: float = float("nan")  # the broker's (the floor: this process's)
    client_cpu_s: float = float("nan")
    failures: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else float("nan")


def cpu_of(pid: int) -> float:
    """CPU time (user + system) of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the broker, alone ------------------------------------------------------------------------


class BrokerUnderTest:
    def __init__(self, state: Path, profile: Path | None = None) -> None:
        self.state, self.profile = state, profile
        self.stack = Stack(state_dir=state)
        self.url = ""
        self.catalog: ThreadedServer | None = None
        runbooks = state / "runbooks"
        runbooks.mkdir(parents=True, exist_ok=True)
        shutil.copy(default_runbook_dir() / "bad-deploy.yaml", runbooks)
        self.runbooks = runbooks
        self.runbook: Runbook = load_runbooks(runbooks)[0]
        groups = self.runbook.remediate.policy_for(self.runbook.remediate.actions["rollback"]).groups
        self.approver_key = signing.generate_key()
        self.roster = state / "roster.yaml"
        self.roster.write_text("people:\n" + entry_yaml(APPROVER, list(groups), signing.public_pem(self.approver_key)))

    def start(self) -> None:
        port, catalog_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        profiler = ["-m", "bench.pipeline_profile", str(self.profile)] if self.profile else []
        proc = self.stack.spawn("broker", [sys.executable, *profiler, "-m", "firebreak.broker", "--host", "127.0.0.1", "--port",
                                           str(port), "--state-dir", str(self.state), "--roster", str(self.roster),
                                           "--runbooks-dir", str(self.runbooks),
                                           "--catalog-url", f"http://127.0.0.1:{catalog_port}"])
        wait_http(f"{self.url}/healthz", proc=proc)
        # The demo's catalog, verifying the broker's own catalog tokens, where the broker was told it is.
        app = FastAPI()
        self.catalog_verifier = signing.TargetVerifier.from_broker(self.url, "catalog")
        add_catalog_routes(app, self.catalog_verifier)
        self.catalog = ThreadedServer(app, port=catalog_port, name="bench-catalog")
        self.catalog.start()

    @property
    def pid(self) -> int:
        return self.stack.processes["broker"].pid

    def client(self) -> BrokerClient:
        return BrokerClient(self.url, TokenFile(self.state / "broker" / "agent-token"))

    def read_pair(self, i: int) -> dict[str, Any]:
        return dict(audience="prometheus", verb="metrics.read", resource="namespace/shop", ttl_s=60,
                    workflow_id=f"bench.read-{i // 1000}", run_id="run-1", activity_id=f"r{i}", step_id="error_rate",
                    runbook=self.runbook.name, params=PARAMS)

    def write_pair(self, i: int) -> dict[str, Any]:
        """A rollback for its own incident: its plan, the approver's signature on it, the intake's receipt."""
        incident = f"shop.bench-{i}.error-rate"
        hypothesis = Hypothesis(id="bad_deploy", title="bad deploy", score=0.9, findings=[], actions=["rollback"])
        plan = build_plan(self.runbook, PARAMS, hypothesis, incident_id=incident, run_id=f"run-{i}")
        assert plan is not None, "the bad-deploy runbook proposes no rollback"
        # The blast radius the demo catalog gives (nothing depends on checkout), as the worker's walk finds it.
        plan = plan.model_copy(update={"impact": {s.id: BlastRadius(target="checkout") for s in plan.steps}})
        approval = signing.sign_approval(Approval(
            workflow_id=incident, plan_hash=plan.hash, decision="approve", nonce=uuid.uuid4().hex,
            expires_at=(datetime.now(UTC) + timedelta(minutes=30)).isoformat(), approver=APPROVER,
        ), self.approver_key)
        step = plan.steps[0]
        receipt = intake_signer(ensure_intake_key(self.state))(incident)
        return dict(audience=step.target, verb=step.verb, resource=step.resource, ttl_s=60, workflow_id=incident,
                    run_id=plan.run_id, activity_id="9", step_id=step.id, runbook=self.runbook.name, params=PARAMS,
                    plan=plan, approvals=[approval], receipts=[receipt])

    def stop(self) -> None:
        if self.catalog is not None:
            self.catalog.stop()
            self.catalog_verifier.close()  # its revocation poll would outlive the broker
        self.stack.stop()


async def drive(broker: BrokerUnderTest, name: str, requests: list[dict[str, Any]], clients: int) -> Figures:
    """Every request minted then revoked, by ``clients`` concurrent clients taking them from one queue."""
    figures = Figures(name)
    queue = list(reversed(requests))
    sessions = [broker.client() for _ in range(clients)]

    async def client(session: BrokerClient) -> None:
        while queue:
            fields = queue.pop()
            started = time.perf_counter()
            try:
                credential = await session.mint(**fields)
                minted = time.perf_counter()
                revoked = await session.revoke(credential.grant_id)
            except Exception as exc:  # noqa: BLE001 - reported with the figures, and the run fails
                figures.failures.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            done = time.perf_counter()
            if not revoked:
                figures.failures.append(f"{credential.grant_id}: the broker no longer knew it at its revoke")
            figures.pair_s.append(done - started)
            figures.mint_s.append(minted - started)
            figures.revoke_s.append(done - minted)

    try:
        server_before, client_before = cpu_of(broker.pid), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*[client(s) for s in sessions])
        figures.seconds = time.perf_counter() - started
        figures.server_cpu_s = cpu_of(broker.pid) - server_before
        figures.client_cpu_s = time.process_time() - client_before
    finally:
        for session in sessions:
            await session.aclose()
    figures.count = len(figures.pair_s)
    return figures


# -- the floor --------------------------------------------------------------------------------


def floor(directory: Path, operations: int, threads: int) -> Figures:
    """One Ed25519 signature plus one group-committed journal append per operation, ``threads`` at once:
    the least a mint costs, with the broker's own storage and none of its checks or HTTP."""
    figures = Figures("floor: Ed25519 signature + group-committed append")
    lock = threading.Lock()
    state = DurableState(directory, lock)
    key = signing.generate_key()
    kid = signing.key_id(key)
    latencies: list[float] = []
    remaining = iter(range(operations))
    take = threading.Lock()

    def one(i: int) -> float:
        started = time.perf_counter()
        _, claims = signing.mint_token(key, kid, issuer="bench", subject="bench", audience="prometheus@demo",
                                       verb="metrics.read", resource="namespace/shop", ttl_s=60, workflow_id="bench",
                                       run_id="run-1", activity_id=f"f{i}", step_id="error_rate", plan_hash="")
        with lock:
            state.add_grant(GrantRecord(grant_id=claims["jti"], exp=claims["exp"], audience="prometheus",
                                        verb="metrics.read", resource="namespace/shop", workflow_id="bench",
                                        run_id="run-1", step_id="error_rate", subject="bench", approvers=[]))
        state.sync()
        return time.perf_counter() - started

    def worker() -> None:
        while True:
            with take:
                i = next(remaining, None)
            if i is None:
                return
            latencies.append(one(i))

    cpu_before, started = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()
    figures.seconds = time.perf_counter() - started
    figures.server_cpu_s = time.process_time() - cpu_before
    figures.pair_s = latencies
    figures.count = len(latencies)
    return figures


# -- the report -------------------------------------------------------------------------------


def table(rows: list[Figures], clients: int) -> str:
    lines = [f"{'at the broker alone, ' + str(clients) + ' concurrent clients':<52} {'n':>6} {'per s':>9} "
             f"{'p50':>10} {'p99':>10} {'mint p50':>10} {'revoke p50':>10} {'CPU/pair':>10} {'client CPU':>10}"]
    for f in rows:
        per = f.server_cpu_s / f.count if f.count else float("nan")
        client = f.client_cpu_s / f.count if f.count else float("nan")
        lines.append(f"{f.name:<52} {f.count:>6} {f.rate:>9.0f} {ms(pct(f.pair_s, 50)):>10} {ms(pct(f.pair_s, 99)):>10} "
                     f"{ms(pct(f.mint_s, 50)):>10} {ms(pct(f.revoke_s, 50)):>10} {ms(per):>10} {ms(client):>10}")
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def goal_lines(pairs: list[Figures], floor_figures: Figures) -> list[str]:
    out = []
    for f in pairs:
        per = f.server_cpu_s / f.count if f.count else float("nan")
        one_core = 1 / per if per else float("nan")  # pairs/s the broker's CPU per pair allows on one core
        met = f.rate >= GOAL_PAIRS_S and pct(f.pair_s, 99) < GOAL_P99_S
        out.append(f"goal ({f.name}): >= {GOAL_PAIRS_S:,.0f} pairs/s on one core, p99 < {GOAL_P99_S * 1000:.0f} ms: "
                   f"{f.rate:,.0f} pairs/s measured ({one_core:,.0f}/s on one core at its CPU per pair), "
                   f"p99 {ms(pct(f.pair_s, 99))}: {'met' if met else 'NOT met'}")
    # A pair at the broker is two appends (the grant, its revocation) and one signature.
    per_op = floor_figures.server_cpu_s / floor_figures.count if floor_figures.count else float("nan")
    out.append(f"floor: {floor_figures.rate:,.0f} operations/s, CPU {ms(per_op)} each; a pair needs one signature "
               f"and two appends, so the floor for a pair is about {ms(2 * per_op)} of CPU")
    return out


async def bench(state: Path, reads: int, writes: int, clients: int, warmup: int, profile: Path | None = None) -> int:
    broker = BrokerUnderTest(state, profile)
    broker.start()
    print(f"[{time.strftime('%H:%M:%S')}] broker up at {broker.url}; {clients} clients", flush=True)
    rows: list[Figures] = []
    try:
        await drive(broker, "warm-up", [broker.read_pair(-1 - i) for i in range(warmup)], clients)
        rows.append(await drive(broker, "read pairs (mint + revoke)", [broker.read_pair(i) for i in range(reads)],
                                clients))
        if writes:
            requests = [broker.write_pair(i) for i in range(writes)]
            rows.append(await drive(broker, "write pairs (plan, approval, receipt)", requests, clients))
    finally:
        broker.stop()
    floor_figures = floor(state / "floor", max(reads, writes), clients)
    print()
    print(table([*rows, floor_figures], clients))
    print()
    for line in goal_lines(rows, floor_figures):
        print(line)
    failures = [f"{f.name}: {failure}" for f in rows for failure in f.failures]
    for failure in failures[:20]:
        print(f"CHECK FAILED: {failure}")
    if len(failures) > 20:
        print(f"CHECK FAILED: {len(failures) - 20} more")
    if not failures:
        print(f"checks: every pair minted and revoked ({sum(f.count for f in rows)} pairs)")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=4000, help="read pairs")
    parser.add_argument("--writes", type=int, default=2000, help="write pairs (each its own incident and plan)")
    parser.add_argument("--reads-only", action="store_true", help="no write pairs")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients, each its own connection")
    parser.add_argument("--warmup", type=int, default=100, help="read pairs before anything is measured")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 400 reads, 200 writes, 8 clients")
    parser.add_argument("--state-dir", type=Path, default=None, help="kept afterwards (default: a temp dir, removed)")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="sample the broker's Python stacks into FILE (its CPU, not its waits)")
    args = parser.parse_args(argv)
    reads, writes, clients, warmup = args.reads, args.writes, args.clients, args.warmup
    if args.quick:
        reads, writes, clients, warmup = 400, 200, 8, 20
    if args.reads_only:
        writes = 0

    def run(state: Path) -> int:
        return asyncio.run(bench(state, reads, writes, clients, warmup, args.profile and args.profile.resolve()))

    if args.state_dir:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        return run(args.state_dir)
    with tempfile.TemporaryDirectory(prefix="firebreak-broker-bench-") as tmp:
        return run(Path(tmp))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
