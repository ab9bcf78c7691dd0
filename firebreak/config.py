"""Configuration: where Temporal, the broker and the targets are.

Read from ``STATE_DIR/stack.json`` (written by ``firebreak up``), then from an
optional TOML-free JSON/YAML file named by ``FIREBREAK_CONFIG``, then from
``FIREBREAK_*`` environment variables; later sources win. Pointing at a real
Temporal cluster or Temporal Cloud is a change here, never in code.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from firebreak.identity import AgentIdentity

TASK_QUEUE = "firebreak"
AGENT = "firebreak-agent"


def default_state_dir() -> Path:
    return Path(os.environ.get("FIREBREAK_STATE_DIR", Path.home() / ".firebreak"))


class TemporalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str = "127.0.0.1:7233"
    namespace: str = "default"
    ui_url: str = "http://127.0.0.1:8233"
    task_queue: str = TASK_QUEUE
    tls_cert: str | None = Field(default=None, description="client certificate (PEM path) for mTLS")
    tls_key: str | None = Field(default=None, description="client private key (PEM path) for mTLS")
    tls_ca: str | None = Field(default=None, description="server CA (PEM path), if not a public CA")
    api_key: str | None = Field(default=None, description="Temporal Cloud API key")
    encrypt_key: str | None = Field(default=None, description="base64 AES-256 key(s), current first: encrypts payloads")
    encrypt_key_file: str | None = Field(default=None, description="file of base64 keys, one a line, current first")
    payload_key_file: str | None = Field(
        default=None, description="file of base64 HMAC keys, one a line, current first: authenticates payloads "
        "(ignored when encryption is on, which authenticates already)")
    deployment: str | None = Field(default=None, description=(
        "Worker Deployment name: with build_id, this worker is one version of it, and every incident stays "
        "PINNED to the build that started it (firebreak/deployments.py)"))
    build_id: str | None = Field(default=None, description="this worker's build within the deployment")


class Settings(BaseModel):
    model_config = ConfigDict(extra="ignore")

    state_dir: Path = Field(default_factory=default_state_dir)
    temporal: TemporalSettings = TemporalSettings()
    runbooks_dir: Path | None = None
    roster: Path | None = None
    broker_url: str = "http://127.0.0.1:8350"
    broker_token: str | None = Field(default=None, description="the agent's bootstrap credential")
    broker_admin_token: str | None = None
    api_url: str = "http://127.0.0.1:8340"
    intake_token: str | None = None
    targets: dict[str, str] = Field(
        default_factory=lambda: {"prometheus": "http://127.0.0.1:9090", "fleet": "http://127.0.0.1:9300"}
    )
    ticket_dir: Path | None = None
    ticket_webhook: str | None = None
    notify_webhook: str | None = None
    prometheus_url_for_links: str | None = None
    identity: AgentIdentity = Field(default_factory=AgentIdentity,
                                    description="the agent's owner, environment and credential max age")
    # How long a source that is down or restarting is asked again before the investigation records it
    # as a gap. The workflow's own budget (a minute) caps it; 0 makes an unreachable source a gap at once.
    source_retry_s: float = Field(default=60.0, ge=0)
    # How long a `firebreak` command waits for the incident's worker to answer a status query or an
    # approval before it reads the memo instead, or records the approval as a signal to be judged
    # later. A busy worker and a down one look alike from outside: raise it for a slow link to
    # Temporal or a worker under load. (The API waits 2 s, inside its own Temporal timeout.)
    worker_wait_s: float = Field(default=2.0, gt=0)

    @property
    def worker_wait(self) -> timedelta:
        return timedelta(seconds=self.worker_wait_s)

    @property
    def stack_file(self) -> Path:
        return self.state_dir / "stack.json"

    def resolved_runbooks_dir(self) -> Path:
        from firebreak.runbook import default_runbook_dir

        return self.runbooks_dir or default_runbook_dir()

    def resolved_roster(self) -> Path:
        return self.roster or (self.state_dir / "roster.yaml")

    def resolved_ticket_dir(self) -> Path:
        return self.ticket_dir or (self.state_dir / "tickets")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is not None:
            out[key] = value
    return out


_ENV = {
    "FIREBREAK_TEMPORAL_ADDRESS": ("temporal", "address"),
    "FIREBREAK_TEMPORAL_NAMESPACE": ("temporal", "namespace"),
    "FIREBREAK_TEMPORAL_UI_URL": ("temporal", "ui_url"),
    "FIREBREAK_TEMPORAL_TASK_QUEUE": ("temporal", "task_queue"),
    "FIREBREAK_TEMPORAL_TLS_CERT": ("temporal", "tls_cert"),
    "FIREBREAK_TEMPORAL_TLS_KEY": ("temporal", "tls_key"),
    "FIREBREAK_TEMPORAL_TLS_CA": ("temporal", "tls_ca"),
    "FIREBREAK_TEMPORAL_API_KEY": ("temporal", "api_key"),
    "FIREBREAK_ENCRYPT_KEY": ("temporal", "encrypt_key"),
    "FIREBREAK_ENCRYPT_KEY_FILE": ("temporal", "encrypt_key_file"),
    "FIREBREAK_PAYLOAD_KEY_FILE": ("temporal", "payload_key_file"),
    "FIREBREAK_TEMPORAL_DEPLOYMENT": ("temporal", "deployment"),
    "FIREBREAK_TEMPORAL_BUILD_ID": ("temporal", "build_id"),
    "FIREBREAK_RUNBOOKS_DIR": ("runbooks_dir",),
    "FIREBREAK_ROSTER": ("roster",),
    "FIREBREAK_BROKER_URL": ("broker_url",),
    "FIREBREAK_BROKER_TOKEN": ("broker_token",),
    "FIREBREAK_API_URL": ("api_url",),
    "FIREBREAK_TICKET_WEBHOOK": ("ticket_webhook",),
    "FIREBREAK_NOTIFY_WEBHOOK": ("notify_webhook",),
    "FIREBREAK_AGENT_OWNER": ("identity", "owner"),
    "FIREBREAK_ENVIRONMENT": ("identity", "environment"),
    "FIREBREAK_CREDENTIAL_MAX_AGE": ("identity", "credential_max_age"),
    "FIREBREAK_WORKER_WAIT_S": ("worker_wait_s",),
}


def load_settings(state_dir: str | Path | None = None) -> Settings:
    """Stack file, then config file, then environment."""
    state = Path(state_dir) if state_dir else default_state_dir()
    data: dict[str, Any] = {"state_dir": str(state)}
    stack_file = state / "stack.json"
    if stack_file.exists():
        data = _merge(data, json.loads(stack_file.read_text()).get("settings", {}))
    config_file = os.environ.get("FIREBREAK_CONFIG")
    if config_file:
        import yaml  # only here: every `firebreak` command loads settings, few have a config file

        data = _merge(data, yaml.safe_load(Path(config_file).read_text()) or {})
    for var, path in _ENV.items():
        if var in os.environ:
            node = data
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = os.environ[var]
    data["state_dir"] = str(state)
    return Settings.model_validate(data)
