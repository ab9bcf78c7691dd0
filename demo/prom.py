"""Real Prometheus and Alertmanager for the demo, run as child processes.

Both use the binaries installed on the machine (Debian: ``prometheus`` and
``prometheus-alertmanager``). Configs are rendered from the YAML templates next
to this file into a state directory, together with each process's data dir and
log, so several demos (or tests) can run side by side on different ports.

Templates are filled structurally: the YAML is loaded, every string that is
exactly ``${name}`` is replaced by its value, and the result is dumped again.
A value can therefore never add keys or break the YAML, whatever it contains.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
import yaml

DEMO_DIR = Path(__file__).resolve().parent
PROMETHEUS_TEMPLATE = DEMO_DIR / "prometheus.tmpl.yml"
ALERTMANAGER_TEMPLATE = DEMO_DIR / "alertmanager.tmpl.yml"
ALERT_RULES = DEMO_DIR / "alert_rules.yml"
# Firebreak's own misuse and lifecycle rules, on the broker's /metrics (not the demo's: shipped for any deployment).
SECURITY_RULES = DEMO_DIR.parent / "firebreak" / "security_rules.yml"

# Names each binary goes by: Debian ships Alertmanager as prometheus-alertmanager,
# upstream tarballs as alertmanager. An environment variable wins over PATH.
_BINARIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "prometheus": ("FIREBREAK_PROMETHEUS_BIN", ("prometheus",)),
    "alertmanager": ("FIREBREAK_ALERTMANAGER_BIN", ("prometheus-alertmanager", "alertmanager")),
}


def find_binary(name: str) -> str | None:
    """Path of ``prometheus`` or ``alertmanager`` (any of its names), or None if not installed."""
    if name == "prometheus-alertmanager":
        name = "alertmanager"
    env_var, candidates = _BINARIES.get(name, ("", (name,)))
    override = os.environ.get(env_var) if env_var else None
    if override:
        return override if os.access(override, os.X_OK) else None
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now. A child process binds it later, so a rare race is possible."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class TemplateValueMissing(KeyError):
    pass


def fill_placeholders(node: Any, values: dict[str, str], source: str = "template") -> Any:
    """Replace each string that is exactly ``"${name}"`` by ``values[name]``, recursively."""
    if isinstance(node, dict):
        return {key: fill_placeholders(value, values, source) for key, value in node.items()}
    if isinstance(node, list):
        return [fill_placeholders(item, values, source) for item in node]
    if isinstance(node, str) and node.startswith("${") and node.endswith("}"):
        name = node[2:-1]
        if name not in values:
            raise TemplateValueMissing(f"{source}: no value for ${{{name}}}")
        return values[name]
    return node


def render_template(template: Path, values: dict[str, str]) -> dict[str, Any]:
    """Load a YAML template and fill its placeholders (see :func:`fill_placeholders`)."""
    return fill_placeholders(yaml.safe_load(template.read_text()), values, template.name)


def _write_private(path: Path, text: str) -> None:
    """Write with mode 0600 from creation: the file may hold a credential."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


# How long Prometheus waits before sending a still-firing alert to Alertmanager again. Its default (1m)
# is also how late an alert that fired while Alertmanager was down reaches it once it is back: a
# notification that fails is not retried, the next resend is the retry. At demo speed, a few seconds.
RESEND_DELAY = "5s"
WEB_USER = "firebreak"


@dataclass(frozen=True)
class WebAuth:
    """Basic-auth credentials of an Alertmanager's API: the user and the file holding the password (0600)."""

    username: str
    password_file: Path

    def httpx(self) -> tuple[str, str]:
        """For ``httpx``'s ``auth=``."""
        return self.username, self.password_file.read_text().strip()


def _bcrypt(password: str) -> str:
    # The stdlib's crypt (libxcrypt) does bcrypt: no new dependency. Deprecated in 3.11, gone in 3.13,
    # where the `bcrypt` package takes its place.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 10))
    if not hashed or not hashed.startswith("$2"):
        raise RuntimeError("this system's crypt() cannot make a bcrypt hash")
    return hashed


def ensure_web_credentials(directory: str | Path, name: str = "alertmanager") -> tuple[WebAuth, Path]:
    """Basic-auth credentials for a process's web API, made once per directory: a random password in
    ``NAME-web.password`` and its bcrypt hash in ``NAME-web.yml`` (``--web.config.file``), both 0600.
    Returns the credentials and the web config's path."""
    directory = Path(directory)
    password_file = directory / f"{name}-web.password"
    web_config = directory / f"{name}-web.yml"
    if not password_file.exists():
        _write_private(password_file, secrets.token_urlsafe(24))
    os.chmod(password_file, 0o600)
    password = password_file.read_text().strip()
    if not web_config.exists() or not _hash_matches(web_config, password):
        _write_private(web_config, yaml.safe_dump({"basic_auth_users": {WEB_USER: _bcrypt(password)}}))
    os.chmod(web_config, 0o600)
    return WebAuth(WEB_USER, password_file), web_config


def _hash_matches(web_config: Path, password: str) -> bool:
    try:
        hashed = yaml.safe_load(web_config.read_text())["basic_auth_users"][WEB_USER]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
        return crypt.crypt(password, hashed) == hashed
    except (OSError, TypeError, KeyError, yaml.YAMLError):
        return False


class ProcessNotReady(RuntimeError):
    pass


class _ManagedProcess:
    """A child process with a config in ``state_dir``, a log file and a readiness probe."""

    name = "process"

    def __init__(self, state_dir: str | Path, port: int, binary: str | None, host: str = "127.0.0.1") -> None:
        self.state_dir = Path(state_dir)
        self.port = port
        self.host = host
        self.binary = binary or find_binary(self.name)
        self.log_path = self.state_dir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.web_auth: WebAuth | None = None  # set where the process's API requires credentials

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The running child (None before ``start()`` and after ``stop()``)."""
        return self._process

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def render(self) -> Path:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Self:
        if self._process is not None:
            raise RuntimeError(f"{self.name} already started")
        if self.binary is None:
            raise FileNotFoundError(f"{self.name} is not installed (apt-get install {self.name})")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.render()
        # Logs are the owner's alone (0600), and so is what the process writes (umask 077).
        with os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
            # A session of its own, like the stack's other processes: `firebreak down`
            # stops each by process group, and a Ctrl-C meant for a CLI does not reach it.
            self._process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.state_dir,
                start_new_session=True, umask=0o077,
            )
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``/-/ready`` until 200; fail at once if the process has exited."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0, auth=self.web_auth.httpx() if self.web_auth else None) as client:
            while True:
                if self._process is None:
                    raise ProcessNotReady(f"{self.name} was not started")
                code = self._process.poll()
                if code is not None:
                    raise ProcessNotReady(f"{self.name} exited with {code}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/-/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise ProcessNotReady(f"{self.name} not ready at {self.url} after {timeout}s:\n{self.log_tail()}")
                time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``. Safe to call twice."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PrometheusProcess(_ManagedProcess):
    """Prometheus scraping the fleet every second, with the demo alert rules.

    ``alertmanager_url`` (e.g. ``http://127.0.0.1:9093``) wires alerts to an
    Alertmanager; None leaves alerting out (rules are still evaluated).

    Each start begins with no metrics (``keep_data`` False): the demo fleet it scrapes starts anew
    on every ``firebreak up``, so series kept from an earlier run would be evidence of faults this run
    never had (a range query's lookback reaching into the last demo).
    """

    name = "prometheus"

    def __init__(self, state_dir: str | Path, port: int, fleet_target: str, alertmanager_url: str | None = None,
                 *, binary: str | None = None, rules_file: str | Path | None = None, host: str = "127.0.0.1",
                 broker_target: str | None = None, alertmanager_auth: WebAuth | None = None,
                 security_receiver_target: str | None = None, keep_data: bool = False) -> None:
        """``broker_target`` (``host:port``): also scrape the credential broker and evaluate
        Firebreak's security rules on it. ``alertmanager_auth``: the credentials Alertmanager's API
        requires (an :class:`AlertmanagerProcess`'s ``web_auth``). ``security_receiver_target``
        (``host:port``): also scrape the security receiver (its dropped alerts and watched silences).
        ``keep_data``: keep the metrics of an earlier start."""
        super().__init__(state_dir, port, binary, host)
        self.keep_data = keep_data
        self.fleet_target = fleet_target
        self.alertmanager_url = alertmanager_url
        self.alertmanager_auth = alertmanager_auth
        self.broker_target = broker_target
        self.security_receiver_target = security_receiver_target
        self.rules_source = Path(rules_file) if rules_file else ALERT_RULES
        self.config_path = self.state_dir / "prometheus.yml"
        self.data_dir = self.state_dir / "prometheus-data"

    def render(self) -> Path:
        # A copy of the rules sits next to the config, so the state dir alone
        # says exactly what this Prometheus evaluated.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)  # this run's metrics only (see the class)
        rules = self.state_dir / "alert_rules.yml"
        shutil.copyfile(self.rules_source, rules)
        values = {"rules_file": str(rules), "fleet_target": self.fleet_target}
        if self.broker_target:
            security_rules = self.state_dir / "security_rules.yml"
            shutil.copyfile(SECURITY_RULES, security_rules)
            values |= {"security_rules_file": str(security_rules), "broker_target": self.broker_target}
        if self.security_receiver_target:
            values |= {"security_receiver_target": self.security_receiver_target}
        if self.alertmanager_url:
            parts = urlsplit(self.alertmanager_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"alertmanager_url must be an http(s) URL, got {self.alertmanager_url!r}")
            values |= {
                "alertmanager_scheme": parts.scheme,
                "alertmanager_target": parts.netloc,
                "alertmanager_path_prefix": parts.path or "/",
            }
            if self.alertmanager_auth:
                values |= {"alertmanager_username": self.alertmanager_auth.username,
                           "alertmanager_password_file": str(self.alertmanager_auth.password_file)}
        template = yaml.safe_load(PROMETHEUS_TEMPLATE.read_text())
        if not self.alertmanager_url:
            template.pop("alerting", None)
        elif not self.alertmanager_auth:
            for alertmanager in template["alerting"]["alertmanagers"]:
                alertmanager.pop("basic_auth", None)
        if not self.broker_target:
            template["rule_files"] = [f for f in template["rule_files"] if f != "${security_rules_file}"]
            template["scrape_configs"] = [c for c in template["scrape_configs"] if c["job_name"] != "firebreak-broker"]
        if not self.security_receiver_target:
            template["scrape_configs"] = [c for c in template["scrape_configs"]
                                          if c["job_name"] != "firebreak-security-receiver"]
        # Fill after pruning, so the placeholders of an absent Alertmanager need no values.
        config = fill_placeholders(template, values, PROMETHEUS_TEMPLATE.name)
        _write_private(self.config_path, yaml.safe_dump(config, sort_keys=False))
        return self.config_path

    def command(self) -> list[str]:
        assert self.binary is not None
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address={self.host}:{self.port}",
            "--storage.tsdb.retention.time=1d",
            f"--rules.alert.resend-delay={RESEND_DELAY}",
            # Neither --web.enable-admin-api (delete series, snapshot) nor --web.enable-lifecycle (reload,
            # quit): nobody, with or without credentials, can erase the broker's counters or stop the
            # watcher through its API. tests/test_watchers.py checks both are refused.
            "--log.level=warn",
        ]

    def query(self, promql: str, *, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Instant query; returns the ``data.result`` vector (empty if no series)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=timeout)
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"query failed: {body.get('error')}")
        return list(body["data"]["result"])

    def query_value(self, promql: str) -> float | None:
        """The single value of an instant query, or None if it has no (or a NaN) result."""
        result = self.query(promql)
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if value != value else value  # NaN (0/0) means "no traffic", not a number

    def alerts(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/alerts", timeout=5.0)
        response.raise_for_status()
        return list(response.json()["data"]["alerts"])


class AlertmanagerProcess(_ManagedProcess):
    """Alertmanager sending every alert (and its resolution) to ``webhook_url``
    with ``Authorization: Bearer <bearer_token>``. Clustering is off, so no gossip port.

    Its API requires basic auth (``--web.config.file``): whoever can reach the port could otherwise
    silence Firebreak's security alerts. The credentials are made once per state dir
    (:func:`ensure_web_credentials`); ``web_auth`` says where the password is, for every client
    (Prometheus's ``alerting`` config, the security receiver's silence watch, ``amtool``)."""

    name = "alertmanager"

    def __init__(self, state_dir: str | Path, port: int, webhook_url: str, bearer_token: str,
                 *, binary: str | None = None, host: str = "127.0.0.1",
                 security_webhook_url: str | None = None, security_bearer_token: str | None = None) -> None:
        """``security_webhook_url``: where Firebreak's own security alerts go (with their own bearer
        token); without it they are dropped, never sent to the intake."""
        super().__init__(state_dir, port, binary, host)
        if not bearer_token:
            raise ValueError("bearer_token is required: the webhook intake authenticates its sources")
        if security_webhook_url and not security_bearer_token:
            raise ValueError("security_bearer_token is required with security_webhook_url")
        self.webhook_url = webhook_url
        self._bearer_token = bearer_token
        self.security_webhook_url = security_webhook_url
        self._security_bearer_token = security_bearer_token or ""
        self.config_path = self.state_dir / "alertmanager.yml"
        self.data_dir = self.state_dir / "alertmanager-data"
        self.web_auth, self.web_config_path = ensure_web_credentials(self.state_dir)

    def __repr__(self) -> str:  # never show the token
        return f"AlertmanagerProcess(url={self.url!r}, webhook_url={self.webhook_url!r})"

    def render(self) -> Path:
        template = yaml.safe_load(ALERTMANAGER_TEMPLATE.read_text())
        values = {"webhook_url": self.webhook_url, "bearer_token": self._bearer_token}
        if self.security_webhook_url:
            values |= {"security_webhook_url": self.security_webhook_url,
                       "security_bearer_token": self._security_bearer_token}
        else:
            for receiver in template["receivers"]:
                if receiver["name"] in ("security", "availability"):
                    receiver.pop("webhook_configs", None)
        config = fill_placeholders(template, values, ALERTMANAGER_TEMPLATE.name)
        _write_private(self.config_path, yaml.safe_dump(config, sort_keys=False))
        return self.config_path

    def command(self) -> list[str]:
        assert self.binary is not None
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.path={self.data_dir}",
            f"--web.listen-address={self.host}:{self.port}",
            f"--web.config.file={self.web_config_path}",
            "--cluster.listen-address=",  # a single instance: no HA gossip port to collide on
            "--log.level=warn",
        ]

    def alerts(self) -> list[dict[str, Any]]:
        assert self.web_auth is not None
        response = httpx.get(f"{self.url}/api/v2/alerts", timeout=5.0, auth=self.web_auth.httpx())
        response.raise_for_status()
        return list(response.json())
