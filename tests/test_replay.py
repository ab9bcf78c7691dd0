"""Histories recorded from real runs must replay on today's code without nondeterminism.

A change to IncidentWorkflow that running incidents depend on needs
``workflow.patched(...)``; this test is what catches a change that forgot it.
Record a new history with ``temporal workflow show --workflow-id ID --output json``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from firebreak.temporal import DATA_CONVERTER
from workflows.incident import IncidentWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_recorded_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    # Replayed as recorded: these carry no payload MAC, so with the plain converter. The payload codec
    # would hand the workflow the unauthenticated marker for every payload and replay a different run.
    # (A history recorded with a payload key replays with the plain converter too: it ignores the MAC entry.)
    replayer = Replayer(workflows=[IncidentWorkflow], data_converter=DATA_CONVERTER)
    await replayer.replay_workflow(history)


def test_there_are_histories_to_replay() -> None:
    assert HISTORIES, "tests/histories is empty: nothing guards determinism"
