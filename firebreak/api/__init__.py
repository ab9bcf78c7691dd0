"""Firebreak's HTTP API: alert intake (Alertmanager, PagerDuty, Grafana, own format) and incident reads.

Public interface:

- :func:`create_app` (``settings: ApiSettings, client_factory``) -> FastAPI app;
- :class:`ApiServer`: the app served in-process on a free port (tests, benchmarks);
- :class:`ApiSettings`, built with :meth:`ApiSettings.from_settings`;
- :func:`stack_info`: what ``firebreak up`` writes into ``stack.json`` for senders.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from firebreak.api.settings import DEFAULT_HOST, DEFAULT_PORT, ApiSettings
from firebreak.config import load_settings

if TYPE_CHECKING:
    from firebreak.api.app import create_app
    from firebreak.api.server import ApiServer, serve

__all__ = ["ApiServer", "ApiSettings", "create_app", "serve", "stack_info"]
# FastAPI, uvicorn and the Temporal client load on first use: every `firebreak` command registers
# the `api` subcommand, and must not pay a second for it.
_LAZY = {"create_app": "firebreak.api.app", "ApiServer": "firebreak.api.server", "serve": "firebreak.api.server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'firebreak.api' has no attribute {name!r}")


def stack_info(state_dir: str | Path, url: str = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}") -> dict[str, str]:
    """``{url, intake_token, pagerduty_secret, grafana_secret}`` for ``stack.json``: the values that
    ``python -m firebreak.api --state-dir STATE_DIR`` accepts (the first of each when several are
    configured for rotation). Reads the same configuration (stack.json, config file, environment), and
    generates the secrets into ``STATE_DIR/api/secrets.json`` (0600) on first use, so calling it before
    or after the API starts gives the same values.
    """
    api = ApiSettings.from_settings(load_settings(state_dir))
    return {
        "url": url,
        "intake_token": api.intake_tokens[0].get_secret_value(),
        "pagerduty_secret": api.pagerduty_secrets[0].get_secret_value(),
        "grafana_secret": api.grafana_secrets[0].get_secret_value(),
    }
