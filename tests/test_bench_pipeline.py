"""The pipeline bench still runs end to end and its own checks pass. No timing is asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
import pytest


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_a_short_pipeline_bench_runs_and_checks_itself(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--incidents", "4", "--throughput", "4",
         "--held", "6,10", "--concurrency", "2", "--warmup", "1", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    # Every figure is printed beside its bare baseline.
    for figure in ("1 engine time to proposal", "2 approval to first write", "3 throughput",
                   "4 worker RSS, 6 awaiting", "4 worker RSS, 10 awaiting", "5 single-alert webhook"):
        assert figure in out, out[-4000:]
    assert "biggest cost on the critical path:" in out
    assert "goal 3 as CPU: 0.8x bare allows" in out, out[-4000:]
    # A worker past its capacity shows in its own log: each side's slow workflow tasks are counted.
    for side in ("firebreak", "bare"):
        assert re.search(rf"{side}: tasks over 5 s, all phases \(its log\) +\d+\n", out), out[-4000:]
    # Its correctness checks: the approved ones resolved, each written once at the fleet, the rest never.
    checks = re.search(r"checks: (\d+) approved incidents resolved, each written exactly once at the fleet; "
                       r"(\d+) left open, none written; (\d+) histories replay", out)
    assert checks, out[-4000:]
    # 1 warm-up, 4 proposed and approved, 4 for throughput, 2 approved out of each held level; the held
    # levels opened 6, then 6 more to have 10 open again after the first 2 were approved.
    assert int(checks.group(1)) == 1 + 4 + 4 + 2 * 2
    assert int(checks.group(2)) == 6 + 6 - 2 * 2
    assert "CHECK FAILED" not in out


def test_goal_3_budget_is_bare_cpu_over_0_8_less_what_bare_has_no_counterpart_of() -> None:
    from bench.pipeline import Results, goal3_budget

    r = Results(cpu={"bare": {"temporal": 7.0, "bare-worker": 5.0, "api": 0.4},
                     "firebreak": {"temporal": 12.0, "worker": 12.0, "broker": 3.0, "fleet": 1.0}})
    text = "\n".join(goal3_budget(r, per_side=100))
    # bare: 124 ms per incident, so 155 ms allowed; broker and fleet take 40 of it, 115 left, where
    # bare's own Temporal and worker spend 120 ms and Firebreak's 240 ms.
    assert "allows 155 ms per incident (bare's 124 ms / 0.8)" in text, text
    assert "(broker, fleet) spend 40 ms" in text, text
    assert "leaves 115 ms for Temporal and the worker, where bare's spend 120 ms" in text, text
    assert "(Firebreak's: 240 ms)" in text, text
