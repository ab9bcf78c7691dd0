"""Commands that do not talk to Temporal do not import it (issue 26: slow to start at 3 a.m.).

Each check runs in a fresh interpreter (what is imported is a property of a clean process), and
asserts on ``sys.modules``, never on time: the latency itself is measured by ``bench.cli_latency``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

pytestmark = pytest.mark.integration  # a subprocess per test

# Heavy for a CLI start and needed by no command checked here.
HEAVY = ("temporalio", "pydantic", "cryptography", "fastapi", "httpx", "jwt", "yaml", "opentelemetry", "asyncio")

_PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    from firebreak.cli import build_parser
    words = json.loads(sys.argv[1])
    printed = io.StringIO()
    code = None
    try:
        with contextlib.redirect_stdout(printed):
            build_parser(words[0]).parse_args(words)
    except SystemExit as exc:
        code = exc.code
    print(json.dumps({"code": code, "printed": printed.getvalue(),
                      "modules": sorted({name.split(".")[0] for name in sys.modules}),
                      "firebreak": sorted(n for n in sys.modules if n.startswith(("firebreak.", "workflows")))}))
""")


def _probe(*words: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(words))],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_version_imports_nothing_heavy() -> None:
    result = _probe("--version")
    assert result["code"] == 0
    assert result["printed"].startswith("firebreak ") and "(temporalio " in result["printed"]
    loaded = set(result["modules"])
    assert not loaded & set(HEAVY), f"`firebreak --version` imported {sorted(loaded & set(HEAVY))}"
    assert "firebreak.contracts" not in result["firebreak"]


def test_read_commands_parse_without_the_sdk_or_the_contracts() -> None:
    """Parsing `list` (which talks to Temporal only once it runs) loads neither the SDK nor the models."""
    result = _probe("list", "--open", "--limit", "5")
    assert result["code"] is None  # parsed, not exited
    loaded = set(result["modules"])
    assert "temporalio" not in loaded and "pydantic" not in loaded
    assert "firebreak.contracts" not in result["firebreak"]


def test_phase_choices_are_still_checked() -> None:
    """`--phase` reads its choices from the contracts when given: a bad one is still a usage error."""
    result = _probe("list", "--phase", "no_such_phase")
    assert result["code"] == 2
    assert _probe("list", "--phase", "awaiting_approval")["code"] is None
