"""500 `firebreak` runs against a live dev server and worker: every one exits with its documented code.

Before the console script left with ``os._exit``, about one run in eight that had used a Temporal
client aborted at interpreter shutdown with 134 (``PyGILState_Release ... finalizing``,
sdk-python#300). Each run here talks to Temporal itself (no API in between): `status` (a query),
`list` (visibility) and `approve` as the person who raised the incident (a query, then an update the
workflow refuses, exit 1).

The 500 run as forked children of one warm interpreter, each through the console script's entry
point (tests/cli_zygote.py says why, and that the same harness without the fix sees the aborts); a
further batch runs the installed console script itself, start-up included.

Every run waits up to a minute for the worker's answer (``FIREBREAK_WORKER_WAIT_S``). With the
default 2 s, a CI machine with two cores under these runs once took longer over a query, so bob's
approval was recorded as a signal for later (exit 0, as documented, and refused later); that path has
its own test in test_cli.py. Here every approve must be answered, and refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from conftest import BIN
from firebreak.contracts import Phase
from incidents import inject, make_alert, open_incident, wait_for_phase
from test_cli import cli_state  # noqa: F401 - a fixture
from worker import build_worker

RUNS = 500
EXECED = 30  # through the installed script: about 0.6 s of CPU each, mostly Python start-up and imports
PARALLEL = 4
ZYGOTE = Path(__file__).resolve().parent / "cli_zygote.py"
ENV = {**os.environ, "FIREBREAK_WORKER_WAIT_S": "60"}


async def test_500_runs_on_a_live_stack_exit_only_with_documented_codes(
    dev_env: WorkflowEnvironment, settings, fleet, cli_state: Path, tmp_path: Path
):
    inject(fleet.url, "checkout", "bad_deploy")
    sd = ["--state-dir", str(cli_state)]
    async with build_worker(dev_env.client, settings):
        handle = await open_incident(dev_env.client, settings, make_alert("DrillPair"), requested_by="bob")
        await wait_for_phase(handle, Phase.awaiting_approval)
        # What each command must answer: its documented exit code, not merely "not 134".
        commands = [
            (["status", handle.id, "--json", *sd], 0),
            (["list", "--open", "--runbook", "drill-pair", "--json", *sd], 0),
            (["approve", handle.id, "--as", "bob", *sd], 1),  # bob raised it: refused, exit 1
        ]
        plan = [commands[i % len(commands)] for i in range(RUNS)]
        started = time.monotonic()
        # In a thread: the worker on this event loop answers the runs meanwhile.
        forked = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(ZYGOTE), str(PARALLEL), str(tmp_path)],
            input=json.dumps([argv for argv, _ in plan]), capture_output=True, text=True, timeout=600, env=ENV)
        assert forked.returncode == 0, forked.stderr[-2000:]
        codes: list[int] = json.loads(forked.stdout)
        forked_s = time.monotonic() - started

        started = time.monotonic()
        gate = asyncio.Semaphore(PARALLEL)
        execed = await asyncio.gather(*[_exec(commands[i % len(commands)][0], gate) for i in range(EXECED)])
        execed_s = time.monotonic() - started
        still = await handle.query("status")
        await handle.terminate("test over")

    print(f"{RUNS} forked runs in {forked_s:.0f}s: {dict(Counter(codes))}; "
          f"{EXECED} exec'd runs in {execed_s:.0f}s: {dict(Counter(code for code, _ in execed))}")
    wrong = [(argv, expected, code, (tmp_path / f"{i}.err").read_text()[-300:])
             for i, ((argv, expected), code) in enumerate(zip(plan, codes)) if code != expected]
    assert len(codes) == RUNS and not wrong, (Counter(codes), wrong[:3])
    errors = [(tmp_path / f"{i}.err").read_text() for i in range(RUNS)]
    assert not any("Fatal Python error" in e or "Traceback" in e for e in errors)
    wrong = [(commands[i % len(commands)], code, err[-300:]) for i, (code, err) in enumerate(execed)
             if code != commands[i % len(commands)][1]]
    assert not wrong, wrong[:3]
    assert still["phase"] == "awaiting_approval"
    assert still["approvals"] and not any(a["counted"] for a in still["approvals"])
    assert {a["approver"] for a in still["approvals"]} == {"bob"}


async def _exec(argv: list[str], gate: asyncio.Semaphore) -> tuple[int, str]:
    async with gate:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "firebreak"), *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=ENV)
        _, err = await proc.communicate()
    return proc.returncode if proc.returncode is not None else -1, err.decode()
