"""The stack ``bench/pipeline.py`` measures: every component as a child process on free ports.

The Temporal dev server (SQLite file in WAL mode, no UI), the credential broker, the demo fleet with
synthetic services (one incident each), Prometheus when installed, the intake API, ``worker.py``, the
bare-Temporal baseline's worker (``bench/pipeline_bare.py``) and the hand-rolled pipeline's worker
(``bench/handrolled.py``, with the fleet's standing token), all exporting spans to the bench.
Built from the pieces ``firebreak.stack`` and ``bench/chaos_stack.py`` use; settings go to
``STATE/stack.json`` as ``firebreak up`` writes them, which the API and the worker read.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.chaos_stack import free_port
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from demo.prom import PrometheusProcess, find_binary
from firebreak import signing
from firebreak.codec import PayloadAuthCodec, ensure_key_file
from firebreak.roster import entry_yaml
from firebreak.runbook import default_runbook_dir
from firebreak.stack import Stack, ensure_demo_roster, temporal_binary, wait_http, wait_port
from firebreak.temporal import SEARCH_ATTRIBUTES
from worker import WORKFLOW_TASK_SLOTS

ROOT = Path(__file__).resolve().parent.parent
TASK_QUEUE = "firebreak-pipeline"
BARE_QUEUE = "bare-pipeline"
HAND_QUEUE = "handrolled-pipeline"
STANDING_TOKEN_ENV = "FIREBREAK_FLEET_STANDING_TOKEN"  # the fleet reads it from here (never from its argv)
APPROVER = "bench-approver"  # on call, in the bench's own roster; alerts from Alertmanager name no requester


def _otel_env(endpoint: str) -> dict[str, str]:
    # Spans leave twice a second and none are dropped at the bench's rates.
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "500",
            "OTEL_BSP_MAX_QUEUE_SIZE": "65536", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2048"}


@dataclass
class PipelineStack:
    state: Path
    runbook: str  # the bench's runbook (YAML), installed beside the shipped ones
    synthetic: int
    otlp_endpoint: str
    with_prometheus: bool = True
    worker_env: dict[str, str] = field(default_factory=dict)
    profile: dict[str, Path] = field(default_factory=dict)  # "worker"/"broker" -> sample its Python stacks into
    bare_cache: int = 1000  # the bare worker's workflow cache, the same as the worker's
    bare_task_slots: int = WORKFLOW_TASK_SLOTS  # workflow tasks at once, as worker.py's
    stack: Stack = field(init=False)
    ports: dict[str, int] = field(default_factory=dict)
    prometheus: PrometheusProcess | None = None
    approver_key: Ed25519PrivateKey | None = None
    workers: int = 0
    # The hand-rolled side's one standing credential at the fleet, made for this run.
    standing_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    def __post_init__(self) -> None:
        self.stack = Stack(state_dir=self.state)

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.ports['temporal']}"

    @property
    def fleet_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['fleet']}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        py, state = sys.executable, self.state
        self.ports = {name: free_port() for name in ("temporal", "broker", "fleet", "api", "prometheus")}
        runbooks = state / "runbooks"
        runbooks.mkdir(parents=True, exist_ok=True)
        for source in default_runbook_dir().glob("*.yaml"):
            shutil.copy(source, runbooks / source.name)
        (runbooks / "pipeline.yaml").write_text(self.runbook)
        roster = self._roster()
        payload_key = ensure_key_file(state / "payload.key", PayloadAuthCodec)
        temporal = self.stack.spawn("temporal", [
            temporal_binary(), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(self.ports["temporal"]),
            "--headless", "--db-filename", str(state / "temporal.db"), "--log-level", "error",
            "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal",
            *[arg for key in SEARCH_ATTRIBUTES for arg in ("--search-attribute", f"{key.name}=Keyword")],
        ])
        broker_url = f"http://127.0.0.1:{self.ports['broker']}"
        broker = self.stack.spawn("broker", [
            py, *self._profiler("broker"), "-m", "firebreak.broker", "--host", "127.0.0.1", "--port", str(self.ports["broker"]),
            "--state-dir", str(state), "--roster", str(roster), "--runbooks-dir", str(runbooks)])
        wait_http(f"{broker_url}/healthz", proc=broker)
        fleet = self.stack.spawn("fleet", [
            py, "-m", "demo.fleet", "--host", "127.0.0.1", "--port", str(self.ports["fleet"]),
            "--broker-url", broker_url, "--state-dir", str(state / "fleet"), "--log-level", "warning",
            "--synthetic-services", str(self.synthetic), "--standing-token-env", STANDING_TOKEN_ENV],
            env={STANDING_TOKEN_ENV: self.standing_token})
        wait_http(f"{self.fleet_url}/healthz", proc=fleet)
        prometheus_url = "http://127.0.0.1:9"  # nothing listens: the investigation records a gap
        if self.with_prometheus:
            self.prometheus = PrometheusProcess(state / "prometheus", self.ports["prometheus"],
                                                f"127.0.0.1:{self.ports['fleet']}")
            self.prometheus.start()
            self.prometheus.wait_ready()
            prometheus_url = f"http://127.0.0.1:{self.ports['prometheus']}"
        wait_port(self.ports["temporal"], timeout=60, proc=temporal)
        settings = {
            "temporal": {"address": self.temporal_address, "namespace": "default", "task_queue": TASK_QUEUE,
                         "payload_key_file": str(payload_key)},
            "roster": str(roster), "runbooks_dir": str(runbooks), "broker_url": broker_url,
            "api_url": self.api_url, "targets": {"fleet": self.fleet_url, "prometheus": prometheus_url},
            "ticket_dir": str(state / "tickets"),
        }
        (state / "stack.json").write_text(json.dumps({"settings": settings}))
        api = self.stack.spawn("api", [py, "-m", "firebreak.api", "--host", "127.0.0.1", "--port",
                                       str(self.ports["api"]), "--state-dir", str(state), "--log-level", "warning"])
        self.spawn_worker()
        self.stack.spawn("bare-worker", [py, "-m", "bench.pipeline_bare", "--address",
                                         self.temporal_address, "--task-queue", BARE_QUEUE,
                                         "--workflow-cache", str(self.bare_cache),
                                         "--workflow-task-slots", str(self.bare_task_slots)],
                         env=_otel_env(self.otlp_endpoint))
        from bench.handrolled import TOKEN_ENV

        self.stack.spawn("handrolled-worker", [py, "-m", "bench.handrolled", "--address", self.temporal_address,
                                               "--task-queue", HAND_QUEUE, "--fleet-url", self.fleet_url,
                                               "--prometheus-url", prometheus_url,
                                               "--ticket-dir", str(state / "handrolled-tickets"),
                                               "--workflow-cache", str(self.bare_cache),
                                               "--workflow-task-slots", str(self.bare_task_slots)],
                         env={**_otel_env(self.otlp_endpoint), TOKEN_ENV: self.standing_token})
        wait_http(f"{self.api_url}/healthz", proc=api)
        for name in ("worker", "bare-worker", "handrolled-worker"):
            self.wait_logged(name, "worker on ")

    def _roster(self) -> Path:
        """The demo roster plus the bench's approver, whose key stays with the bench."""
        roster = ensure_demo_roster(self.state)
        self.approver_key = signing.generate_key()
        signing.write_private_key(self.state / "keys" / f"{APPROVER}.pem", self.approver_key)
        with roster.open("a") as out:
            out.write(entry_yaml(APPROVER, ["oncall"], signing.public_pem(self.approver_key)))
        return roster

    def spawn_worker(self) -> subprocess.Popen[bytes]:
        """``worker.py`` as ``firebreak up`` runs it (a restart replaces the one before)."""
        self.workers += 1
        log = self.state / "logs" / "worker.log"
        if log.exists():
            log.rename(log.with_name(f"worker.{self.workers - 1}.log"))
        return self.stack.spawn("worker", [sys.executable, *self._profiler("worker"), str(ROOT / "worker.py"), "--state-dir",
                                           str(self.state)], env={**_otel_env(self.otlp_endpoint), **self.worker_env})

    def _profiler(self, name: str) -> list[str]:
        out = self.profile.get(name)
        return ["-m", "bench.pipeline_profile", str(out)] if out else []

    def stop_worker(self) -> None:
        process = self.stack.processes.pop("worker")
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def wait_logged(self, name: str, text: str, timeout: float = 60.0) -> None:
        process, log = self.stack.processes[name], self.state / "logs" / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {log}")
            if log.exists() and text in log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready after {timeout:.0f}s; see {log}")

    def slow_workflow_tasks(self) -> dict[str, int]:
        """Per side, the workflow tasks its worker's SDK warned ran over 5 s (TMPRL1104, in its log): a worker
        past what it can hold, whose tasks near their 10 s timeout."""
        logs = {"firebreak": sorted((self.state / "logs").glob("worker*.log")),
                "bare": [self.state / "logs" / "bare-worker.log"],
                "hand-rolled": [self.state / "logs" / "handrolled-worker.log"]}
        return {side: sum(path.read_text(errors="replace").count("TMPRL1104") for path in paths if path.exists())
                for side, paths in logs.items()}

    def rss_mb(self, name: str) -> float:
        """Resident memory of a child process, from /proc."""
        pid = self.stack.processes[name].pid
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each component has used so far, from /proc."""
        pids = {name: proc.pid for name, proc in self.stack.processes.items()}
        if self.prometheus is not None and self.prometheus.process is not None:
            pids["prometheus"] = self.prometheus.process.pid
        out = {}
        for name, pid in pids.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return out

    def stop(self) -> None:
        if self.prometheus is not None:
            self.prometheus.stop()
        self.stack.stop()


def has_prometheus() -> bool:
    return find_binary("prometheus") is not None
