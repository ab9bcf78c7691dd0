"""What the CLI tells people is true and short: held is held, closed is closed, errors are one line with
their documented exit code (2 bad usage or a bad file, 1 refused or not found), `history` and `status`
read for a person at a terminal, `privileges --usage` counts each privilege once.

The live cases run on the session's dev server, worker, broker and fleet; the stack-down cases point
the command at ports where nothing listens.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from api_harness import api_settings, running_api, wait_status
from conftest import BIN, CLOSED_PORT_URL
from incidents import (
    inject,
    make_alert,
    open_incident,
    report_of,
    wait_for_phase,
    wait_until,
)
from temporalio.testing import WorkflowEnvironment
from test_cli import _run, cli_state  # noqa: F401 - cli_state is a fixture

from firebreak.api import ApiServer
from firebreak.broker.audit import AuditLog
from firebreak.config import TemporalSettings
from firebreak.contracts import Phase
from worker import build_worker

CLOSED_TEMPORAL = "127.0.0.1:9"  # the discard port: no Temporal there


def firebreak(*argv: str) -> subprocess.CompletedProcess[str]:
    """The installed command, as a person runs it."""
    return subprocess.run([str(BIN / "firebreak"), *argv], capture_output=True, text=True, timeout=60, check=False)


def firebreak_each(*argvs: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Several runs side by side (each waits on its own imports and connects), answers in order."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda argv: firebreak(*argv), argvs))


@pytest.fixture
def down_state(tmp_path: Path, state_dir: Path) -> Path:
    """A state dir whose stack is down: Temporal, the API and the broker all on closed ports."""
    down = tmp_path / "down"
    down.mkdir()
    (down / "keys").symlink_to(state_dir / "keys")
    (down / "stack.json").write_text(json.dumps({"settings": {
        "temporal": {"address": CLOSED_TEMPORAL}, "api_url": CLOSED_PORT_URL, "broker_url": CLOSED_PORT_URL,
        "roster": str(state_dir / "roster.yaml")}}))
    (down / "broker").mkdir()
    (down / "broker" / "admin-token").write_text("an-admin-token")
    return down


# -- held, closed, history, status: on the live stack ---------------------------------------------------


async def test_a_held_incident_says_held_everywhere_and_a_closed_one_says_closed(
    dev_env: WorkflowEnvironment, settings, fleet, broker, cli_state: Path, capsys: pytest.CaptureFixture[str]
):
    sd = ["--state-dir", str(cli_state)]
    inject(fleet.url, "checkout", "bad_deploy")
    admin = {"Authorization": f"Bearer {broker.admin_token}"}
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, make_alert("DrillPair"))
        await wait_for_phase(handle, Phase.awaiting_approval)
        # Bad usage argparse cannot see (the window is the runbook's): exit 2, nothing signed.
        assert await _run(["approve", handle.id, "--as", "alice", "--valid-for", "99999", *sd]) == 2
        assert "--valid-for must be between 1 and" in capsys.readouterr().err
        frozen = httpx.post(f"{broker.url}/v1/freeze", json={"reason": "suspicious mints", "by": "carol"},
                            headers=admin, timeout=10)
        assert frozen.status_code == 200
        try:
            assert await _run(["approve", handle.id, "--as", "alice", *sd]) == 0
            said = capsys.readouterr().out.splitlines()[-1]
            assert said.startswith("approve by alice counted; approved, but held: nothing executes until "), said
            assert "credentials frozen by carol" in said and "executing now" not in said
            await wait_until(handle, lambda s: s.held is not None)

            # The card says it is held, rendered for a terminal: no Markdown marks.
            assert await _run(["status", handle.id, *sd]) == 0
            card = capsys.readouterr().out
            assert card.startswith("HELD: nothing executes until credentials are thawed: "), card
            held = next(line for line in card.splitlines() if line.startswith("Held: "))
            assert "credentials frozen by carol" in held
            assert "**" not in card and "#### " not in card and "`" not in card, card

            # A retry says it already counted, and that the incident is held; nothing is signed or sent.
            assert await _run(["approve", handle.id, "--as", "alice", *sd]) == 0
            again = capsys.readouterr().out
            assert "approve by alice already counted" in again and "nothing sent" in again
            assert "held: nothing executes until credentials are thawed" in again and "Plan hash" not in again
        finally:
            httpx.post(f"{broker.url}/v1/thaw", json={"reason": "all clear", "by": "carol"}, headers=admin,
                       timeout=10)
        report = await report_of(handle)
    assert report.phase == Phase.resolved, report.outcome

    # Closed: said in one line, without the plan, exit 1.
    assert await _run(["approve", handle.id, "--as", "carol", *sd]) == 1
    closed = capsys.readouterr()
    assert closed.err.strip() == (f"firebreak: {handle.id} is closed (resolved): nothing to approve; "
                                  f"{report.outcome}")
    assert closed.out == ""

    # history: what an operator reads, in time order; --all: every event, the SDK's markers too.
    assert await _run(["history", handle.id, "--json", *sd]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and not [r for r in rows if r["kind"] in ("marker_recorded", "activity_task_started")]
    assert "TemporalChangeVersion" not in json.dumps(rows)
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    assert any(r["kind"] == "activity_task_completed" and "grant " in r["detail"] for r in rows)
    assert await _run(["history", handle.id, "--all", "--json", *sd]) == 0
    everything = json.loads(capsys.readouterr().out)
    assert {r["kind"] for r in everything} >= {"marker_recorded", "activity_task_started"}
    assert [r["event_id"] for r in everything] == sorted(r["event_id"] for r in everything)


def test_status_text_has_no_markdown_and_shortens_links():
    from firebreak.cli_incidents import terminal_text

    link = ("http://127.0.0.1:9090/graph?g0.expr=sum%28rate%28http_requests_total%7Bnamespace%3D%22shop%22%7D"
            "%5B1m%5D%29%29&g0.tab=0")
    card = f"# [resolved] x\n\n### RESOLVED\n**Outcome:** done\n#### Plan `abc`\n- **s1** `fleet.restart`\n" \
           f"#### Evidence\n- {link}"
    text = terminal_text(card, {link: "checkout 5xx ratio"})
    assert "**" not in text and "#" not in text and "`" not in text, text
    assert "- checkout 5xx ratio (http://127.0.0.1:9090/graph?…)" in text and link not in text
    assert "--links prints them in full" in text
    assert link in terminal_text(card, {link: "checkout 5xx ratio"}, links=True)


# -- errors a user can cause: one line, the documented exit code -----------------------------------------


@pytest.mark.integration
def test_a_missing_or_garbage_key_file_is_bad_usage_in_one_line(down_state: Path, tmp_path: Path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    cases = [(argv, key, why)
             for key, why in ((tmp_path / "missing.pem", "no such key file"),
                              (garbage, "not an unencrypted Ed25519 private key in PEM"),
                              (tmp_path, "is a directory"))
             for argv in (["approve", "some.incident", "--key", str(key)], ["inbox", "--key", str(key)])]
    runs = firebreak_each(*[[*argv, "--state-dir", str(down_state)] for argv, _, _ in cases],
                          ["approve", "some.incident", "--state-dir", str(down_state)])
    for (argv, key, why), done in zip(cases, runs):
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stderr.startswith(f"firebreak: {key}: {why}"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Error" not in done.stderr, done.stderr
    anonymous = runs[-1]
    assert anonymous.returncode == 2
    assert anonymous.stderr == "firebreak: say who you are: --key PATH (or --as NAME for a demo person)\n"


@pytest.mark.integration
def test_with_the_stack_down_each_command_says_so_in_one_line_with_what_to_run(down_state: Path):
    sd = ["--state-dir", str(down_state)]
    reads = [["status", "some.incident"], ["list"], ["history", "some.incident"],
             ["approve", "some.incident", "--as", "alice"]]
    *answers, thaw, required, auto = firebreak_each(*[[*argv, *sd] for argv in reads], ["creds", "thaw", *sd],
                                                    ["audit", "verify", "--history", *sd], ["audit", "verify", *sd])
    for argv, done in zip(reads, answers):
        assert done.returncode == 1, (argv, done.stderr)
        assert done.stderr.strip() == (f"firebreak: no Temporal at {CLOSED_TEMPORAL}: run `firebreak up` "
                                       "(or point FIREBREAK_TEMPORAL_ADDRESS at your cluster)"), (argv, done.stderr)

    assert thaw.returncode == 1
    assert thaw.stderr.strip() == (f"thaw not done: no broker answered at {CLOSED_PORT_URL} (ConnectError): "
                                   "run `firebreak up`, or give --broker-url")

    assert required.returncode == 1
    assert required.stderr.splitlines()[-1] == (f"history cross-check failed: Temporal at {CLOSED_TEMPORAL} did "
                                                "not answer: run `firebreak up`")
    assert "tonic" not in required.stderr
    # By default the history check is skipped when Temporal is down (as documented), and it says so plainly.
    assert "tonic" not in auto.stderr and "transport" not in auto.stderr, auto.stderr
    assert (f"history: not checked (Temporal at {CLOSED_TEMPORAL} did not answer: run `firebreak up`); --history "
            "makes this an error") in auto.stderr


# -- the API's answers to an approval it could not deliver ----------------------------------------------


@pytest.mark.integration
async def test_the_api_answers_an_approval_it_could_not_deliver_503_with_retry_after(
    state_dir: Path, runbooks_dir: Path, approvers
):
    temporal = TemporalSettings(address=CLOSED_TEMPORAL, task_queue="nowhere")
    async with ApiServer(api_settings(state_dir, temporal, runbooks_dir, temporal_timeout_s=2.0)) as api:
        approval = approvers.approval("alice", "some.incident", "0" * 64)
        async with httpx.AsyncClient(timeout=30) as http:
            answer = await http.post(f"{api.url}/v1/incidents/some.incident/approvals",
                                     json=approval.model_dump(mode="json"))
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] and answer.headers["x-firebreak-delivery"] == "none"
    assert "the approval was not delivered" in answer.json()["error"]


# -- privileges --usage: by privilege, with a header ------------------------------------------------------


@pytest.mark.integration
def test_privileges_usage_counts_each_mint_once_for_its_template_under_a_header(tmp_path: Path):
    (tmp_path / "broker").mkdir()
    log = AuditLog(tmp_path / "broker" / "audit.jsonl")
    # One incident of checkout: its own rollback, and its failing dependency's.
    for resource in ("service/checkout", "service/payments"):
        log.append("mint", decision="issued", audience="fleet", workflow_id="shop.checkout.error-rate",
                   scope={"verb": "fleet.rollback", "resource": resource})
    done = firebreak("privileges", "--usage", "--state-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("USES"))
    assert lines[header].split() == ["USES", "LAST", "USED", "KIND", "TARGET", "VERB", "RESOURCE"]
    rows = {" ".join(line.split()[-4:]): int(line.split()[0]) for line in lines[header + 1:]
            if line and line.split()[0].isdigit()}
    assert rows["write fleet fleet.rollback service/{service}"] == 1
    assert rows["write fleet fleet.rollback service/{dependency}"] == 1
    done = firebreak("privileges", "--usage", "--json", "--state-dir", str(tmp_path))
    counted = {f"{p['kind']} {p['resource']}": p["uses"] for p in json.loads(done.stdout)["privileges"]
               if p["verb"] == "fleet.rollback"}
    assert counted == {"write service/{service}": 1, "write service/{dependency}": 1}


@pytest.mark.integration
def test_privileges_bad_usage_and_bad_files_exit_2_in_one_line(tmp_path: Path):
    bad = tmp_path / "bad-runbooks"
    bad.mkdir()
    (bad / "broken.yaml").write_text("x: [\n")
    for argv, said in (
        (["--runbooks-dir", str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'}: no such runbooks directory"),
        (["--runbooks-dir", str(bad)], f"{bad / 'broken.yaml'}:2: (yaml):"),
        (["--usage", "--window", "forever"], "--window: 'forever' is not a duration"),
        (["lock", "--lock", str(tmp_path / "no" / "lock.json")], f"{tmp_path / 'no' / 'lock.json'}: No such file"),
    ):
        done = firebreak("privileges", *argv, "--state-dir", str(tmp_path))
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stderr.startswith(f"firebreak: {said}") and len(done.stderr.splitlines()) == 1, done.stderr
        assert done.stdout == "", done.stdout  # no report that would say the agent can do nothing


async def test_the_api_answers_an_approval_it_queued_as_a_signal_202_saying_so(
    dev_env: WorkflowEnvironment, settings, fleet, approvers
):
    inject(fleet.url, "checkout", "bad_deploy")
    # A generous deadline: this is about what a delivery as a signal is answered, not about a slow machine.
    async with running_api(dev_env.client, settings, settings.state_dir, worker=False,
                           temporal_timeout_s=30.0) as api:
        async with build_worker(dev_env.client, settings):
            handle = await open_incident(dev_env.client, settings, make_alert("DrillPair"))
            waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        # No worker answers now: the approval is recorded in history as a signal, judged later.
        approval = approvers.approval("alice", handle.id, waiting.plan_hash)
        async with httpx.AsyncClient(timeout=30) as http:
            # As `firebreak approve` does, read it first (from its memo, once Temporal gives up on the worker).
            await wait_status(http, api, handle.id, lambda s: s["phase"] == "awaiting_approval")
            answer = await http.post(f"{api.url}/v1/incidents/{handle.id}/approvals",
                                     json=approval.model_dump(mode="json"))
    assert answer.status_code == 202, answer.text
    assert answer.headers["x-firebreak-delivery"] == "queued"
    body = answer.json()
    assert body["queued"] is True and body["via"] == "signal" and "it has not counted yet" in body["detail"]
    history = await handle.fetch_history()
    assert sum(e.workflow_execution_signaled_event_attributes.signal_name == "approval" for e in history.events
               if e.HasField("workflow_execution_signaled_event_attributes")) == 1
    await handle.terminate("test over")
