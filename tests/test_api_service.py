"""``python -m firebreak.api`` as the embedded stack runs it: secrets generated once, stack_info agrees."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import httpx

from api_harness import alertmanager_body, labels
from firebreak.api import stack_info
from firebreak.api.unrouted import UnroutedLog, UnroutedRecord
from firebreak.cli import build_parser
from firebreak.contracts import Alert
from firebreak.stack import wait_http


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_service_generates_its_secrets_once_and_stack_info_reports_what_it_accepts(tmp_path: Path) -> None:
    port, temporal_port = _free_port(), _free_port()
    # Temporal is not running: the service must start anyway and say so.
    settings = {"temporal": {"address": f"127.0.0.1:{temporal_port}"}}
    (tmp_path / "stack.json").write_text(json.dumps({"settings": settings}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIREBREAK_")}
    proc = subprocess.Popen([sys.executable, "-m", "firebreak.api", "--host", "127.0.0.1", "--port", str(port),
                             "--state-dir", str(tmp_path), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", proc=proc)
        info = stack_info(tmp_path, url)
        assert set(info) == {"url", "intake_token", "pagerduty_secret", "grafana_secret"}
        secrets_file = tmp_path / "api" / "secrets.json"
        assert secrets_file.stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "api").stat().st_mode & 0o777 == 0o700
        assert stack_info(tmp_path, url) == info  # generated once, then read back

        health = httpx.get(f"{url}/healthz").json()
        assert health["temporal"] == "unreachable"
        body = alertmanager_body([{"labels": labels("NobodyHandlesThis", "svc"), "fingerprint": "0a"}])
        accepted = httpx.post(f"{url}/v1/alerts/alertmanager", content=body,
                              headers={"Authorization": f"Bearer {info['intake_token']}"})
        assert accepted.status_code == 202, accepted.text
        refused = httpx.post(f"{url}/v1/alerts/alertmanager", content=body, headers={"Authorization": "Bearer x"})
        assert refused.status_code == 401
        routed = alertmanager_body([{"labels": labels("HighErrorRate", "svc"), "fingerprint": "0b"}])
        down = httpx.post(f"{url}/v1/alerts/alertmanager", content=routed,
                          headers={"Authorization": f"Bearer {info['intake_token']}"}, timeout=30)
        assert down.status_code == 503
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0].decode()
    for secret in (info["intake_token"], info["pagerduty_secret"], info["grafana_secret"]):
        assert secret not in output  # never logged


def test_firebreak_api_subcommand_is_registered() -> None:
    args = build_parser().parse_args(["api", "--port", "9999", "--max-body-bytes", "2048"])
    assert args.port == 9999 and args.max_body_bytes == 2048 and callable(args.func)


async def test_unrouted_log_rotates_and_still_lists_the_newest(tmp_path: Path) -> None:
    log = UnroutedLog(tmp_path / "unrouted.jsonl", max_bytes=2_000)
    for i in range(20):
        alert = Alert(fingerprint=f"f{i}", labels={"alertname": "A"})
        await log.append([UnroutedRecord(at=datetime.now(timezone.utc), kind="unrouted", source="t", reason="r",
                                         alert=alert)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrouted.jsonl", "unrouted.jsonl.1"]
    assert (tmp_path / "unrouted.jsonl").stat().st_size <= 2_000
    newest = await log.tail(3)
    assert [r["alert"]["fingerprint"] for r in newest] == ["f17", "f18", "f19"]
