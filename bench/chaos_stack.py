"""The real stack the chaos suite runs and breaks: processes it can SIGKILL and start again.

Child processes on free ports, each in its own session (a SIGKILL takes its whole group): the
Temporal dev server on a SQLite file in WAL mode (restarted on the same file and port), the broker
(restarted on the same state and port), the demo fleet (never restarted: it is the record of every
write), Prometheus when installed, and ``worker.py`` processes on one task queue. Workers reach the
fleet and Prometheus through the fault proxies (``bench/chaos_proxy.py``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from demo.prom import PrometheusProcess, find_binary
from firebreak.codec import PayloadAuthCodec, ensure_key_file
from firebreak.stack import ensure_demo_roster, temporal_binary, wait_http, wait_port
from firebreak.temporal import SEARCH_ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent
TASK_QUEUE = "firebreak-chaos"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@dataclass
class ChaosStack:
    state: Path
    runbooks: Path
    chaos_token: str
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    workers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)  # pid -> live worker
    worker_logs: dict[int, Path] = field(default_factory=dict)
    prometheus: PrometheusProcess | None = None
    worker_count: int = 0

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        logs = self.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{name}.log").open("ab") as log:
            return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.ports['temporal']}"

    @property
    def broker_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['broker']}"

    @property
    def fleet_url(self) -> str:
        """The fleet itself, not the proxy: where the suite reads the record of writes."""
        return f"http://127.0.0.1:{self.ports['fleet']}"

    def start(self, with_prometheus: bool) -> None:
        self.ports = {name: free_port() for name in ("temporal", "broker", "fleet", "prometheus")}
        self.roster = ensure_demo_roster(self.state)
        self.payload_key = ensure_key_file(self.state / "payload.key", PayloadAuthCodec)
        self.start_temporal()
        self.start_broker()
        fleet = self._spawn("fleet", [sys.executable, "-m", "demo.fleet", "--host", "127.0.0.1", "--port",
                                      str(self.ports["fleet"]), "--broker-url", self.broker_url,
                                      "--log-level", "warning"], env={"FIREBREAK_CHAOS_TOKEN": self.chaos_token})
        self.processes["fleet"] = fleet
        wait_http(f"{self.fleet_url}/healthz", proc=fleet)
        if with_prometheus and find_binary("prometheus"):
            self.prometheus = PrometheusProcess(self.state / "prometheus", self.ports["prometheus"],
                                                f"127.0.0.1:{self.ports['fleet']}")
            self.prometheus.start()
            self.prometheus.wait_ready()

    def start_temporal(self) -> None:
        process = self._spawn("temporal", [
            temporal_binary(), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(self.ports["temporal"]),
            "--headless", "--db-filename", str(self.state / "temporal.db"), "--log-level", "error",
            "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal",
            *[arg for key in SEARCH_ATTRIBUTES for arg in ("--search-attribute", f"{key.name}=Keyword")],
        ])
        self.processes["temporal"] = process
        wait_port(self.ports["temporal"], timeout=60, proc=process)

    def kill_temporal(self) -> None:
        _kill_group(self.processes.pop("temporal"))

    def start_broker(self) -> None:
        process = self._spawn("broker", [
            sys.executable, "-m", "firebreak.broker", "--host", "127.0.0.1", "--port", str(self.ports["broker"]),
            "--state-dir", str(self.state), "--roster", str(self.roster), "--runbooks-dir", str(self.runbooks)])
        self.processes["broker"] = process
        wait_http(f"{self.broker_url}/healthz", proc=process)

    def kill_broker(self) -> None:
        _kill_group(self.processes.pop("broker"))

    def write_worker_settings(self, fleet_proxy_port: int, prometheus_proxy_port: int) -> None:
        """stack.json as `firebreak up` writes it; the worker processes read their settings from it."""
        settings = {
            "temporal": {"address": self.temporal_address, "namespace": "default", "task_queue": TASK_QUEUE,
                         "payload_key_file": str(self.payload_key)},
            "roster": str(self.roster), "runbooks_dir": str(self.runbooks), "broker_url": self.broker_url,
            "targets": {"fleet": f"http://127.0.0.1:{fleet_proxy_port}",
                        "prometheus": f"http://127.0.0.1:{prometheus_proxy_port}"},
            "ticket_dir": str(self.state / "tickets"),
        }
        (self.state / "stack.json").write_text(json.dumps({"settings": settings}))

    def spawn_worker(self) -> subprocess.Popen[bytes]:
        self.worker_count += 1
        name = f"worker-{self.worker_count}"
        process = self._spawn(name, [sys.executable, str(ROOT / "worker.py"), "--state-dir", str(self.state)])
        self.workers[process.pid] = process
        self.worker_logs[process.pid] = self.state / "logs" / f"{name}.log"
        return process

    def wait_worker_ready(self, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        """Until the worker logged that it polls (it connected and built its worker)."""
        log = self.worker_logs[process.pid]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker {process.pid} exited with {process.returncode}; see {log}")
            if log.exists() and "worker on " in log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker {process.pid} not ready after {timeout:.0f}s; see {log}")

    def kill_worker(self, pid: int) -> None:
        process = self.workers.pop(pid)
        _kill_group(process)

    def fleet_state(self) -> dict:
        response = httpx.get(f"{self.fleet_url}/demo/state", timeout=10)
        response.raise_for_status()
        return response.json()

    def inject(self, service: str, kind: str) -> dict:
        response = httpx.post(f"{self.fleet_url}/demo/faults", json={"service": service, "kind": kind},
                              headers={"Authorization": f"Bearer {self.chaos_token}"}, timeout=10)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        for process in list(self.workers.values()):
            _kill_group(process)
        self.workers.clear()
        if self.prometheus is not None:
            self.prometheus.stop()
        for process in reversed(list(self.processes.values())):
            _kill_group(process)
        self.processes.clear()
