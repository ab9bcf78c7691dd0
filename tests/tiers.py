"""Test tiers: what a test needs to run, told from the fixtures it uses.

- ``unit``: nothing but the interpreter. No socket to another process, no subprocess: the guard
  below fails a unit test that opens one, so a test that needs a server cannot hide in the fast tier.
- ``workflow``: the time-skipping test server.
- ``integration``: the dev server, the broker, the fleet or the API.
- ``e2e``: Prometheus, Alertmanager, Backstage, chromium, the chaos and accuracy runs.

A test's tier is the highest its fixtures reach. A module whose tests start servers in their own
body says so with ``pytestmark = pytest.mark.<tier>``; an explicit mark always wins.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

TIERS = ("unit", "workflow", "integration", "e2e")

E2E_FIXTURES = frozenset({"scraped_prometheus", "prometheus", "alertmanager", "ui_env", "backstage"})
INTEGRATION_FIXTURES = frozenset({
    "dev_env", "broker", "fleet", "settings", "temporal", "api", "http", "env", "server",
    "codec_server", "encrypted_client", "watched_fleet", "watched", "broker_files", "versioned_broker",
    "recording_fleet", "fleet_server", "minter", "webhook_receiver", "webhook", "cli_state",
    "module_fleet", "worker_settings", "hostile_catalog", "capped", "client",
})
WORKFLOW_FIXTURES = frozenset({"time_env"})


def tier_of(fixturenames: Iterable[str]) -> str:
    names = set(fixturenames)
    if names & E2E_FIXTURES:
        return "e2e"
    if names & INTEGRATION_FIXTURES:
        return "integration"
    if names & WORKFLOW_FIXTURES:
        return "workflow"
    return "unit"


class NeedsMoreThanUnit(AssertionError):
    """A test in the unit tier reached for a server or a subprocess."""


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise NeedsMoreThanUnit(f"a unit test {what}: mark its module with the tier it needs "
                                "(pytestmark = pytest.mark.integration, ...)")
    return refused


@contextmanager
def unit_guard() -> Iterator[None]:
    """Refuse network sockets and subprocesses for the duration of a unit test."""
    real_connect, real_bind = socket.socket.connect, socket.socket.bind
    real_popen = subprocess.Popen.__init__

    def checked(real: Any, what: str) -> Any:
        def call(self: socket.socket, address: Any) -> Any:
            if self.family in (socket.AF_INET, socket.AF_INET6):
                return _refuse(what)()
            return real(self, address)
        return call

    socket.socket.connect = checked(real_connect, "opened a network connection")  # type: ignore[method-assign]
    socket.socket.bind = checked(real_bind, "bound a network port")  # type: ignore[method-assign]
    subprocess.Popen.__init__ = _refuse("started a subprocess")  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = real_connect  # type: ignore[method-assign]
        socket.socket.bind = real_bind  # type: ignore[method-assign]
        subprocess.Popen.__init__ = real_popen  # type: ignore[method-assign]
