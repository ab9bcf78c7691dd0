"""The broker bench runs against a real broker and prints its figures beside the floor. No timing is asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_broker_bench_prints_pairs_per_second_and_p99_beside_its_floor(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.broker", "--reads", "40", "--writes", "20", "--clients", "4", "--warmup", "4",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    number = r"[\d,]+(?:\.\d+)?"
    figures = rf" +(\d+) +{number} +{number} ms +{number} ms"
    reads = re.search(rf"^read pairs \(mint \+ revoke\){figures}", out, re.M)
    writes = re.search(rf"^write pairs \(plan, approval, receipt\){figures}", out, re.M)
    floor = re.search(rf"^floor: Ed25519 signature \+ group-committed append{figures}", out, re.M)
    assert reads and writes and floor, out[-4000:]
    # Every pair was driven and measured: the counts are what was asked, not what happened to succeed.
    assert (int(reads.group(1)), int(writes.group(1)), int(floor.group(1))) == (40, 20, 40), out[-4000:]
    # The goal is judged for each kind, beside the floor's own figures.
    for kind in ("read pairs", "write pairs"):
        assert re.search(rf"^goal \({kind}.*pairs/s measured .* p99 {number} ms: (met|NOT met)$", out, re.M), out[-4000:]
    assert re.search(rf"^floor: {number} operations/s, CPU {number} ms each", out, re.M), out[-4000:]
    assert "checks: every pair minted and revoked (60 pairs)" in out, out[-4000:]
    assert "CHECK FAILED" not in out
