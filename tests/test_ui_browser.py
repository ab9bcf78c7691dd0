"""The Temporal Web UI, driven in a real browser: what an operator sees of a resolved, a rejected and a
failed incident.

Playwright (PyPI) drives Debian's chromium (`executable_path`; nothing downloads a browser; scripts/setup
installs both) against the dev server's own UI, with the real worker answering the UI's queries. Each
view is saved as a screenshot under the test's tmp dir; the incident card is copied to docs/ for the
README. In CI a missing chromium or playwright fails the test rather than skipping it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from conftest import CONVERTER, INTERCEPTORS, temporal_bin
from firebreak.contracts import Phase
from firebreak.temporal import SEARCH_ATTRIBUTES
from incidents import inject, make_alert, open_incident, report_of, submit, wait_for_phase, wait_until
from worker import build_worker

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parent.parent / "docs"
try:
    from playwright.async_api import Page, async_playwright
except ImportError:  # pragma: no cover - only where the test extra is not installed
    async_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(
    (async_playwright is None or not Path(CHROMIUM).exists()) and not os.environ.get("CI"),
    reason="needs the PyPI package playwright and Debian's chromium (bash scripts/setup installs both)",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
async def ui_env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[WorkflowEnvironment, str]]:
    """A dev server of its own, with its Web UI: the list then holds only this test's incidents."""
    ui_port = _free_port()
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_bin(), data_converter=CONVERTER, interceptors=INTERCEPTORS,
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_database_filename=str(tmp_path_factory.mktemp("ui-temporal") / "temporal.db"),
        dev_server_extra_args=["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal",
                               "--ui-disable-news-fetch"],
        ui=True, ui_port=ui_port,
    )
    yield env, f"http://127.0.0.1:{ui_port}"
    await env.shutdown()


async def _incidents(client: Client, settings, fleet, approvers) -> dict[str, tuple[str, str]]:  # noqa: ANN001
    """A resolved (after a refused approval), a rejected and a failed incident: {phase: (id, run)}."""
    inject(fleet.url, "checkout", "bad_deploy")
    inject(fleet.url, "payments", "bad_deploy")
    inject(fleet.url, "inventory", "clear")  # nothing changed there: the diagnosis cannot decide
    resolved = await open_incident(client, settings, make_alert("DrillPair", service="checkout"), requested_by="bob")
    rejected = await open_incident(client, settings, make_alert("DrillRollback", service="payments"))
    failed = await open_incident(client, settings, make_alert("DrillRollback", service="inventory"))
    waiting = await wait_for_phase(resolved, Phase.awaiting_approval)
    assert not (await submit(resolved, approvers.approval("bob", resolved.id, waiting.plan_hash))).counted
    assert (await submit(resolved, approvers.approval("alice", resolved.id, waiting.plan_hash,
                                                      comment="restart first, as agreed"))).counted
    plan = await wait_for_phase(rejected, Phase.awaiting_approval)
    assert (await submit(rejected, approvers.approval("alice", rejected.id, plan.plan_hash, decision="reject",
                                                      comment="deploy freeze until 18:00"))).counted
    for handle, phase in ((resolved, Phase.resolved), (rejected, Phase.rejected), (failed, Phase.failed)):
        assert (await report_of(handle)).phase == phase
        await wait_until(handle, lambda s: s.phase.closed)
    return {phase: (handle.id, (await handle.describe()).run_id)
            for handle, phase in ((resolved, "resolved"), (rejected, "rejected"), (failed, "failed"))}


async def _text(page: Page) -> str:
    """Everything the page shows, its frames included (the UI renders markdown in a sandboxed frame)."""
    parts = []
    for frame in page.frames:
        try:
            parts.append(await frame.locator("body").inner_text(timeout=5000))
        except Exception:  # noqa: BLE001 - a frame that went away while reading
            continue
    return "\n".join(parts)


async def _until_shown(page: Page, *texts: str, timeout: float = 30.0) -> str:
    """The page's text once it shows every one of ``texts`` (the UI loads, then polls)."""
    text = ""
    for _ in range(int(timeout / 0.5)):
        text = await _text(page)
        if all(t in text for t in texts):
            return text
        await page.wait_for_timeout(500)
    missing = [t for t in texts if t not in text]
    raise AssertionError(f"{page.url} never showed {missing}; it showed:\n{text[-3000:]}")


async def _row(page: Page, incident_id: str) -> str:
    return await page.locator("tr", has_text=incident_id).first.inner_text()


async def test_the_ui_tells_outcomes_apart_and_shows_the_incident_card(
    ui_env, state_dir, runbooks_dir, broker, fleet, approvers, tmp_path: Path  # noqa: ANN001
):
    from conftest import worker_settings_for

    env, ui = ui_env
    settings = worker_settings_for(state_dir, runbooks_dir, broker, fleet)
    workflows = f"{ui}/namespaces/default/workflows"
    # The worker stays up while the browser looks: the UI asks it for each run's current details.
    async with build_worker(env.client, settings):
        ids = await _incidents(env.client, settings, fleet, approvers)
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = await browser.new_page(viewport={"width": 1800, "height": 900})
            try:
                await _the_list(page, workflows, ids, tmp_path)
                await _phase_filters(page, workflows, ids, tmp_path)
                await _the_details(page, workflows, ids, tmp_path)
            finally:
                await browser.close()


async def _the_list(page: Page, workflows: str, ids: dict[str, tuple[str, str]], shots: Path) -> None:
    """Failed is red (FAILED), rejected and resolved are told apart by their phase column."""
    await page.goto(workflows)
    await _until_shown(page, *(incident for incident, _ in ids.values()))
    # Once per browser, as an operator does (the UI keeps it in local storage): Configure Columns, add the
    # phase, service and runbook search attributes, drop the workflow type (always IncidentWorkflow).
    await page.get_by_test_id("workflows-summary-table-configuration-button").click()
    for column in ("FirebreakPhase", "FirebreakService", "FirebreakRunbook"):
        await page.get_by_test_id(f"orderable-list-item-{column}-add-button").click()
    for column in ("Type", "End"):
        await page.get_by_test_id(f"orderable-list-item-{column}-remove-button").click()
    await page.get_by_test_id("drawer-close-button").click()
    await page.get_by_test_id("drawer-close-button").wait_for(state="hidden")
    await page.wait_for_timeout(500)  # the drawer slides away
    await _until_shown(page, "FirebreakPhase")
    rows = {phase: await _row(page, incident) for phase, (incident, _) in ids.items()}
    await page.screenshot(path=str(shots / "list.png"), full_page=True)
    assert "FAILED" in rows["failed"] and "COMPLETED" not in rows["failed"], rows["failed"]
    assert "COMPLETED" in rows["resolved"] and "COMPLETED" in rows["rejected"]
    for phase, row in rows.items():
        assert phase in row.split(), (phase, row)

    # Temporal's own status filter (the FAILED count above the list): the incidents that need a human.
    await page.get_by_test_id("workflow-status-Failed").click()
    failed_id = ids["failed"][0]
    await _until_shown(page, failed_id)
    await page.wait_for_timeout(1000)
    shown = await _text(page)
    await page.screenshot(path=str(shots / "list-failed.png"), full_page=True)
    assert failed_id in shown and ids["resolved"][0] not in shown and ids["rejected"][0] not in shown
    DOCS.mkdir(exist_ok=True)
    shutil.copy(shots / "list.png", DOCS / "ui-list.png")


async def _phase_filters(page: Page, workflows: str, ids: dict[str, tuple[str, str]], shots: Path) -> None:
    for phase, (incident, _) in ids.items():
        query = quote(f'FirebreakPhase="{phase}"')
        await page.goto(f"{workflows}?query={query}")
        shown = await _until_shown(page, incident)
        others = [other for p, (other, _) in ids.items() if p != phase]
        assert not any(other in shown for other in others), (phase, shown[-2000:])
        await page.screenshot(path=str(shots / f"filter-{phase}.png"), full_page=True)


async def _the_details(page: Page, workflows: str, ids: dict[str, tuple[str, str]], shots: Path) -> None:
    resolved, run = ids["resolved"]
    # The event history: each activity's summary, and the refused approval's update failed with its reason.
    await page.goto(f"{workflows}/{resolved}/{run}/history")
    await _until_shown(page, "execute s1: fleet.restart on service/checkout",
                       "refused: bob requested this incident and cannot approve it")
    await page.screenshot(path=str(shots / "history.png"), full_page=True)

    # The incident card (Current Details) beside the run's summary.
    await page.set_viewport_size({"width": 1600, "height": 1800})
    await page.goto(f"{workflows}/{resolved}/{run}/user-metadata")
    card = await _until_shown(page, "DrillPair on checkout (critical)", "RESOLVED", "Outcome:")
    # (The UI's markdown turns straight quotes into curly ones.)
    for shown in ("✔ alice approved", "comment: “restart first, as agreed”",
                  "✘ bob approved", "REFUSED: bob requested this incident and cannot approve it",
                  "s1 fleet.restart on service/checkout", "blast radius: checkout", "no undo declared",
                  "A recent deploy", "s1 succeeded", "remediation applied and verified"):
        assert shown in card, (shown, card[-3000:])
    _as_the_terminal_shows_it(card, resolved, findings=True)
    await page.screenshot(path=str(shots / "incident-card.png"), full_page=True)
    DOCS.mkdir(exist_ok=True)
    shutil.copy(shots / "incident-card.png", DOCS / "incident-card.png")

    for phase, words in (("rejected", ("REJECTED: nothing executed", "reason: “deploy freeze until 18:00”")),
                         ("failed", ("FAILED: needs a human", "no hypothesis is supported well enough"))):
        incident, run = ids[phase]
        await page.goto(f"{workflows}/{incident}/{run}/user-metadata")
        card = await _until_shown(page, *words)
        _as_the_terminal_shows_it(card, incident, findings=phase == "rejected")
        await page.screenshot(path=str(shots / f"card-{phase}.png"), full_page=True)

    # The failed run's page: the readable reason, and no SDK stack trace under it.
    incident, run = ids["failed"]
    await page.goto(f"{workflows}/{incident}/{run}/history")
    shown = await _until_shown(page, "failed: escalated to a human: no hypothesis is supported well enough")
    await page.screenshot(path=str(shots / "failed-run.png"), full_page=True)
    for trace in ("Traceback", 'File "/', "temporalio/worker", "_workflow_instance.py"):
        assert trace not in shown, (trace, shown[-3000:])


def _as_the_terminal_shows_it(card: str, incident: str, *, findings: bool) -> None:
    """Each finding on a line of its own under its hypothesis (as `firebreak status` nests them), and every
    command copyable: plain ASCII (no en dash where "--" was sent)."""
    lines = [line.strip() for line in card.splitlines() if line.strip()]
    titles = [line for line in lines if re.fullmatch(r".+ \d{1,3}%", line)]  # a hypothesis alone on its line
    shown = [line for line in lines if line.startswith(("✔", "✘"))]
    assert (titles and shown) or not findings, card[-3000:]
    # Never a hypothesis with its findings run into it, nor two findings on one line.
    assert not [line for line in lines if re.search(r"\d%\s*[✔✘]", line)], card[-3000:]
    assert not [line for line in shown if re.search(r"[✔✘].*[✔✘]", line)], shown
    assert f"firebreak status {incident} --watch" in card, card[-3000:]
    assert "–" not in card, [line for line in lines if "–" in line]
