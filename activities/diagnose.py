"""Diagnosis as an activity: its result, with every finding, is kept in history."""

from __future__ import annotations

from temporalio import activity

from firebreak import diagnosis
from firebreak.contracts import DiagnoseRequest, Diagnosis


@activity.defn(name="diagnose")
async def diagnose(request: DiagnoseRequest) -> Diagnosis:
    return diagnosis.diagnose(request.runbook, request.evidence, request.alert_started_at)
