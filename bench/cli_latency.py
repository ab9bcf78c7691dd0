"""How long the on-call engineer waits for the CLI: `--version`, `list` and `status` at p50.

Brings the embedded stack up on free ports in a temporary state dir (no Prometheus), opens one
sample incident, and times each command as a fresh process, the way a person runs it, beside
`python -c pass` measured in the same run: the interpreter's own start is the floor no command
can go under. Goals (issue 26): `--version` under 150 ms, `list` and `status` under 400 ms.

    python -m bench.cli_latency [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from firebreak import stack

GOALS_MS = {"--version": 150, "list": 400, "status": 400}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def p50_ms(argv: list[str], runs: int) -> float:
    """The median wall time of ``argv`` as a fresh process; a failed run stops the bench."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        times.append((time.perf_counter() - start) * 1000)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return statistics.median(times)


def open_incident(firebreak: str, state: Path) -> str:
    """Raise the bad-deploy sample and wait until its workflow shows in `list`."""
    subprocess.run([firebreak, "alert", "--sample", "bad-deploy", "--state-dir", str(state)],
                   check=True, capture_output=True, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listed = subprocess.run([firebreak, "list", "--json", "--state-dir", str(state)],
                                capture_output=True, text=True, check=False)
        rows = json.loads(listed.stdout or "[]") if listed.returncode == 0 else []
        if rows:
            return str(rows[0]["incident_id"])
        time.sleep(1)
    raise SystemExit("the sample incident never showed in `firebreak list`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (default 15)")
    args = parser.parse_args()

    firebreak = str(Path(sys.executable).parent / "firebreak")
    with tempfile.TemporaryDirectory(prefix="firebreak-cli-latency-") as tmp:
        state = Path(tmp)
        ports = stack.Ports(**{name: free_port() for name in vars(stack.Ports())})
        stack.up(state, ports, with_prometheus=False)
        try:
            incident = open_incident(firebreak, state)
            sd = ["--state-dir", str(state)]
            measured = {
                "python -c pass": p50_ms([sys.executable, "-c", "pass"], args.runs),
                "--version": p50_ms([firebreak, "--version"], args.runs),
                "list": p50_ms([firebreak, "list", *sd], args.runs),
                "status": p50_ms([firebreak, "status", incident, *sd], args.runs),
            }
        finally:
            stack.down(state)

    floor = measured["python -c pass"]
    print(f"{'command':<16}{'p50 ms':>9}{'x floor':>9}{'goal ms':>9}  met")
    for name, ms in measured.items():
        goal = GOALS_MS.get(name)
        met = "" if goal is None else ("yes" if ms < goal else "NO")
        print(f"{name:<16}{ms:>9.0f}{ms / floor:>9.1f}{goal or '':>9}  {met}")


if __name__ == "__main__":
    main()
