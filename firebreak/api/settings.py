"""Settings of the intake API: where it listens, which secrets each source uses.

Built from the shared :class:`firebreak.config.Settings` (stack.json, config
file, environment) plus the API's own secrets. Secrets come, first match wins:

1. environment: ``FIREBREAK_INTAKE_TOKEN``, ``FIREBREAK_PAGERDUTY_SECRET``,
   ``FIREBREAK_GRAFANA_SECRET`` (each may hold several values separated by
   commas, for rotation);
2. ``Settings.intake_token`` (stack.json or the config file);
3. ``STATE_DIR/api/secrets.json``, generated at first start (mode 0600), so the
   embedded stack works without any configuration.

How PagerDuty incidents become labels (see :mod:`firebreak.api.sources`) is read from
``STATE_DIR/api/intake.yaml`` (or the file ``FIREBREAK_INTAKE_CONFIG`` names), if present::

    pagerduty_services:            # PagerDuty service id -> labels
      PNE3JZM: {alertname: HighErrorRate, namespace: shop, service: checkout}
    catalog_files:                 # Backstage entity files (YAML documents or a JSON list): each
      - /etc/firebreak/catalog-info.yaml   # entity annotated pagerduty.com/service-id maps that service

A service listed in ``pagerduty_services`` takes those labels over what its catalog entity says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from firebreak.api.auth import load_or_create_secrets
from firebreak.api.sources import LabelMapping
from firebreak.config import Settings, TemporalSettings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8340
ONE_MIB = 1024 * 1024


def _env_list(name: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


class ApiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    state_dir: Path
    temporal: TemporalSettings = TemporalSettings()
    runbooks_dir: Path | None = None
    # Several values per secret let an operator rotate without downtime:
    # old and new are both accepted until the old one is removed.
    intake_tokens: list[SecretStr] = Field(default_factory=list, description="bearer tokens for every source")
    pagerduty_secrets: list[SecretStr] = Field(default_factory=list, description="V3 webhook signing secrets")
    grafana_secrets: list[SecretStr] = Field(default_factory=list, description="HMAC secrets of the contact point")
    grafana_timestamp_header: str = Field(
        default="X-Grafana-Alerting-Timestamp",
        description="the contact point's 'Timestamp Header'; when sent, the signature covers 'timestamp:body'",
    )
    grafana_max_skew_s: float | None = Field(
        default=300.0, description="reject signed timestamps older or newer than this; None disables the check"
    )
    max_body_bytes: int = Field(default=ONE_MIB, gt=0)
    temporal_timeout_s: float = Field(
        default=4.0, gt=0, description="below PagerDuty's 5 s delivery timeout, so a slow Temporal is a 503, not a hang"
    )
    read_requires_token: bool = Field(default=True, description="GET /v1/incidents and /v1/unrouted need a token")
    pagerduty_dedup_ttl_s: float = Field(default=48 * 3600, description="PagerDuty retries for up to 48 h")
    pagerduty_max_age_s: float = Field(
        default=48 * 3600, gt=0,
        description="refuse an event whose occurred_at is older than this; its id is remembered at least as long",
    )
    roster: Path | None = Field(default=None, description="approvers' public keys: approvals are checked before Temporal")
    label_mapping: LabelMapping = Field(default_factory=LabelMapping, description=(
        "how an incident system's service becomes labels: pagerduty_services maps a PagerDuty service id"))
    catalog_files: list[Path] = Field(default_factory=list, description=(
        "Backstage entity files; entities annotated pagerduty.com/service-id map that PagerDuty service"))

    @property
    def api_dir(self) -> Path:
        return self.state_dir / "api"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> "ApiSettings":
        """API settings for a Firebreak configuration; generates missing secrets in STATE_DIR/api/."""
        generated = load_or_create_secrets(settings.state_dir / "api")
        intake = _env_list("FIREBREAK_INTAKE_TOKEN") or (
            [settings.intake_token] if settings.intake_token else [generated.intake_token]
        )
        pagerduty = _env_list("FIREBREAK_PAGERDUTY_SECRET") or [generated.pagerduty_secret]
        grafana = _env_list("FIREBREAK_GRAFANA_SECRET") or [generated.grafana_secret]
        values: dict[str, object] = {
            "state_dir": settings.state_dir,
            "temporal": settings.temporal,
            "runbooks_dir": settings.resolved_runbooks_dir(),
            "intake_tokens": intake,
            "pagerduty_secrets": pagerduty,
            "grafana_secrets": grafana,
            "roster": settings.resolved_roster(),
            **load_intake_config(settings.state_dir / "api"),
        }
        values.update(overrides)
        return cls.model_validate(values)


INTAKE_CONFIG_FILE = "intake.yaml"


def load_intake_config(api_dir: Path) -> dict[str, object]:
    """``label_mapping`` and ``catalog_files`` from ``FIREBREAK_INTAKE_CONFIG`` or ``API_DIR/intake.yaml``.

    A file that is there but wrong stops the API at start, naming the file: an intake that silently
    maps nothing would send every PagerDuty incident to ``unrouted``.
    """
    path = Path(os.environ.get("FIREBREAK_INTAKE_CONFIG") or api_dir / INTAKE_CONFIG_FILE)
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or set(data) - {"pagerduty_services", "catalog_files"}:
        raise ValueError(f"{path}: expected a mapping with pagerduty_services and/or catalog_files")
    out: dict[str, object] = {}
    if "pagerduty_services" in data:
        out["label_mapping"] = {"pagerduty_services": data["pagerduty_services"] or {}}
    if "catalog_files" in data:
        out["catalog_files"] = [path.parent / Path(str(f)) for f in data["catalog_files"] or []]
    return out


def load_catalog_entities(files: list[Path]) -> list[dict[str, Any]]:
    """Every entity in these Backstage catalog files: YAML documents (catalog-info.yaml) or a JSON list."""
    entities: list[dict[str, Any]] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        try:
            documents = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: not a catalog file: {exc}") from None
        for document in documents:
            for entity in document if isinstance(document, list) else [document]:
                if isinstance(entity, dict):
                    entities.append(entity)
    return entities
