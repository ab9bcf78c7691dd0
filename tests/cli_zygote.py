"""Run many `firebreak` invocations fast: each a forked child of one warm interpreter, calling the console
script's own entry point (``firebreak.cli:entry``) with its argv, and exiting as it does.

    python tests/cli_zygote.py PARALLEL ERR_DIR < argvs.json   # prints the exit codes as JSON

Starting Python and importing temporalio costs about 0.6 s of CPU a run here, so 500 exec'd runs take
minutes on two cores. Forked from a parent that has only imported the modules (it never makes a
Temporal runtime, whose threads a fork would not carry), each child still does everything a run does
from then on: settings, a Temporal client of its own, the command, and the exit. The exit is what
sdk-python#300 breaks: the same harness calling ``sys.exit(main())`` instead of ``entry()`` sees
about one child in ten abort (SIGABRT, 134 from a shell). A child killed by a signal is reported as
``-signal``. Each child's stderr goes to ``ERR_DIR/N.err``.
"""

from __future__ import annotations

import json
import os
import sys

# Everything the commands import lazily, imported once here (no Temporal runtime is created by imports).
import firebreak.cli
import firebreak.cli_incidents  # noqa: F401
import firebreak.codec  # noqa: F401
import firebreak.history  # noqa: F401
import firebreak.incidents  # noqa: F401
import firebreak.listing  # noqa: F401
import firebreak.plan_view  # noqa: F401
import firebreak.roster  # noqa: F401
import firebreak.signing  # noqa: F401
import firebreak.temporal  # noqa: F401
import firebreak.watch  # noqa: F401
import temporalio.client  # noqa: F401
import workflows.summary  # noqa: F401


def _child(argv: list[str], err_path: str) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(devnull, 1)
    os.dup2(err, 2)
    sys.argv = ["firebreak", *argv]
    try:
        firebreak.cli.entry()  # leaves with os._exit
    finally:
        os._exit(70)  # not reached unless entry() returned: EX_SOFTWARE, an undocumented code


def main() -> None:
    parallel, err_dir = int(sys.argv[1]), sys.argv[2]
    argvs: list[list[str]] = json.load(sys.stdin)
    codes: list[int | None] = [None] * len(argvs)
    running: dict[int, int] = {}

    def reap() -> None:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)

    for index, argv in enumerate(argvs):
        if len(running) >= parallel:
            reap()
        pid = os.fork()
        if pid == 0:
            _child(argv, os.path.join(err_dir, f"{index}.err"))
        running[pid] = index
    while running:
        reap()
    print(json.dumps(codes))


if __name__ == "__main__":
    main()
