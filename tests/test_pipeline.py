"""The real pipeline: Prometheus scrapes the demo fleet and evaluates the demo rules,
Alertmanager routes the alert to `firebreak api`, and the incident opens by itself."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from api_harness import TOKEN, running_api
from conftest import needs
from demo.prom import AlertmanagerProcess, PrometheusProcess, free_port
from firebreak.contracts import IncidentStatus, Phase
from incidents import inject

pytestmark = needs("prometheus", "alertmanager")


async def test_alertmanager_webhook_opens_the_incident_with_the_deploy_on_top(
    dev_env: WorkflowEnvironment, settings, fleet, tmp_path: Path
):
    client = dev_env.client
    async with running_api(client, settings, tmp_path / "api") as api:
        with AlertmanagerProcess(tmp_path / "am", free_port(), f"{api.url}/v1/alerts/alertmanager", TOKEN) as am, \
                PrometheusProcess(tmp_path / "prom", free_port(), fleet.target, am.url,
                                  alertmanager_auth=am.web_auth) as prom:
            settings.targets["prometheus"] = prom.url  # the worker reads its targets from these settings
            deadline = time.monotonic() + 60
            while (prom.query_value("count_over_time(up[1m])") or 0) < 12 and time.monotonic() < deadline:
                await asyncio.sleep(0.5)  # history from before the fault, for the before/after comparison
            bad = inject(fleet.url, "checkout", "bad_deploy")["version"]

            handle = client.get_workflow_handle("shop.checkout.error-rate")
            status: IncidentStatus | None = None
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                try:
                    status = await handle.query("status", result_type=IncidentStatus)
                    if status.phase == Phase.awaiting_approval:
                        break
                except Exception:  # noqa: BLE001 - not started yet: Alertmanager has not sent it
                    pass
                await asyncio.sleep(0.5)
            assert status is not None and status.phase == Phase.awaiting_approval, status
            await handle.terminate("test over")

    assert status.runbook == "bad-deploy" and status.service == "checkout" and status.severity == "critical"
    assert status.hypotheses[0].id == "bad_deploy", [(h.id, h.score) for h in status.hypotheses]
    assert any(bad in f.detail for f in status.hypotheses[0].findings)
    assert [s.verb for s in status.plan.steps] == ["fleet.rollback"]
    summary = await (await handle.describe()).static_summary()
    assert summary and "HighErrorRate" in summary
