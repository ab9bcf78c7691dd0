"""The chaos suite's quick variant, as CI runs it: crashes and restarts change no ending and no write.

``python bench/chaos.py --quick`` on its own stack (dev server, broker, fleet, Prometheus, a worker):
at least 10 worker SIGKILLs at every point of an incident's life, a dev-server SIGKILL and restart,
broker restarts mid-step, the target and Prometheus going away. Every incident must reach the ending
its undisturbed twin reached, with exactly its writes, counted from the fleet's own change log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs

ROOT = Path(__file__).resolve().parent.parent


def _count(output: str, label: str) -> int:
    """The 'injected' column of one fault row of the table (0 when the row is absent)."""
    found = re.search(rf"^{re.escape(label)}\s+(\d+)\s", output, re.MULTILINE)
    return int(found.group(1)) if found else 0


@pytest.mark.e2e
@needs("prometheus")
def test_quick_chaos_run_changes_no_ending_and_no_write(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "bench.chaos", "--quick", "--state-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=420)
    output = run.stdout + run.stderr
    report = output[-6000:]
    assert "undisturbed endings" in output, report

    kills = int(re.search(r"^worker kills \(\d+ workers?\)\s+(\d+)", output, re.MULTILINE).group(1))
    assert kills >= 10, report
    assert _count(output, "dev server kill + restart") >= 1, report
    for every in ("worker kill: investigating", "worker kill: awaiting approval",
                  "worker kill: between approval and write", "worker kill: inside the write",
                  "worker kill: verifying", "broker kill + restart mid-step", "target down during write (refused)",
                  "target down during write (answer lost)"):
        assert _count(output, every) >= 1, f"{every} was never injected\n{report}"

    assert re.search(r"wrong ending 0, stuck 0$", output, re.MULTILINE), report
    assert re.search(r"duplicate 0, missing 0$", output, re.MULTILINE), report
    assert run.returncode == 0, report


def test_the_judge_counts_from_the_fleet_log_and_misses_nothing() -> None:
    from bench.chaos_ledger import Expected, Outcome, judge, writes_by_incident

    log = {"changes": [
        {"kind": "deploy", "description": "deploy v42 (was v41) from the CI pipeline"},
        {"kind": "restart", "description": "restart all 3 replicas (workflow_id=chaos.a, step_id=s1)"},
        {"kind": "restart", "description": "restart all 3 replicas (workflow_id=chaos.b, step_id=s1)"},
        {"kind": "restart", "description": "restart all 3 replicas (workflow_id=chaos.b, step_id=s1)"},
        {"kind": "rollback", "description": "rollback to v41 (was v42) (workflow_id=chaos.c, step_id=s1)"},
    ]}
    writes = writes_by_incident(log)
    assert writes == {"chaos.a": ["restart"], "chaos.b": ["restart", "restart"], "chaos.c": ["rollback"]}
    expected = {"restart": Expected("resolved", ["restart"]), "rollback": Expected("rolled_back", ["rollback", "deploy"])}
    outcomes = [
        Outcome("chaos.a", "restart", "f", "resolved", writes["chaos.a"]),
        Outcome("chaos.b", "restart", "f", "resolved", writes["chaos.b"]),  # acted twice
        Outcome("chaos.c", "rollback", "f", "failed", writes["chaos.c"]),  # wrong ending, its undo missing
        Outcome("chaos.d", "restart", "f", None, []),  # stuck: its missing write is not counted as missing
    ]
    verdict = judge(outcomes, expected)
    assert (verdict.expected_ending, len(verdict.wrong), len(verdict.stuck)) == (2, 1, 1)
    assert (verdict.duplicate, verdict.missing) == (1, 1)
    assert not verdict.clean
    assert judge(outcomes[:1], expected).clean
