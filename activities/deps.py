"""What activities need from the outside world, built once per worker."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from firebreak.broker.client import BrokerClient, TokenFile
from firebreak.config import Settings


@dataclass
class ActivityDeps:
    settings: Settings
    http: httpx.AsyncClient
    broker: BrokerClient

    @classmethod
    def from_settings(cls, settings: Settings) -> "ActivityDeps":
        # A configured credential as it is; else the broker's file, re-read when `creds rotate` replaces it.
        token: str | TokenFile = settings.broker_token or TokenFile(settings.state_dir / "broker" / "agent-token")
        return cls(
            settings=settings,
            http=httpx.AsyncClient(timeout=httpx.Timeout(10.0)),
            broker=BrokerClient(settings.broker_url, token),
        )

    def target_url(self, target: str) -> str:
        try:
            return self.settings.targets[target].rstrip("/")
        except KeyError:
            raise LookupError(f"no URL configured for target {target!r}") from None
