"""The pipeline bench still runs end to end and its own checks pass. No timing is asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_short_pipeline_bench_runs_and_checks_itself(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pipeline.py"), "--incidents", "4", "--throughput", "4",
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
