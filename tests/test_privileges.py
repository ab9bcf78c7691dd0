"""What the agent can do, and what a change did to it: the privilege report and its drift check."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from firebreak import privileges
from firebreak.broker.audit import AuditLog
from firebreak.cli import main
from firebreak.runbook import default_runbook_dir, load_runbooks

REPO = Path(__file__).resolve().parent.parent


def shipped() -> dict:
    return privileges.report(load_runbooks(default_runbook_dir()))


def test_every_shipped_privilege_is_classified_and_no_write_is_standing():
    data = shipped()
    assert data["standing_write_access"] == "none"
    kinds = {(p["kind"], p["verb"]): p for p in data["privileges"]}
    assert kinds[("read", "metrics.read")]["classification"] == "observability read"
    assert kinds[("read", "fleet.read")]["classification"] == "change-record read"
    assert kinds[("write", "fleet.rollback")]["classification"] == "high-risk write"
    assert kinds[("write", "fleet.scale")]["classification"] == "low-risk write"
    rollback = kinds[("write", "fleet.rollback")]
    assert rollback["approvers"] == 1 and rollback["separation_of_duties"] and rollback["max_ttl_s"] == 60
    assert rollback["params"] == {"service": "^[a-z][a-z0-9-]{0,30}$"} and rollback["runbooks"] == ["bad-deploy"]
    assert kinds[("undo", "fleet.deploy")]["runbooks"] == ["bad-deploy"]
    for p in data["privileges"]:
        assert p["kind"] == "read" or p["approvers"] >= 1, p


def test_the_markdown_report_states_standing_write_access(capsys: pytest.CaptureFixture[str]):
    assert main(["privileges", "--markdown", "--runbooks-dir", str(default_runbook_dir())]) == 0
    out = capsys.readouterr().out
    assert "Standing write access: **none**." in out and "| high-risk write | write | fleet | `fleet.rollback` |" in out


def test_the_committed_lock_matches_the_shipped_runbooks():
    widen, narrow = privileges.diff(privileges.load_lock(REPO / privileges.LOCK_FILE), shipped())
    assert (widen, narrow) == ([], [])


def copy_runbooks(tmp_path: Path) -> Path:
    target = tmp_path / "runbooks"
    shutil.copytree(default_runbook_dir(), target)
    return target


def edit(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def run_diff(runbooks: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["privileges", "diff", "--runbooks-dir", str(runbooks), "--lock", str(REPO / privileges.LOCK_FILE)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_new_write_verb_fails_the_diff_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    runbooks = copy_runbooks(tmp_path)

    def add_delete(data: dict) -> None:
        data["remediate"]["actions"]["delete"] = {"target": "fleet", "verb": "fleet.delete",
                                                  "resource": "service/{service}", "risk": "high",
                                                  "blast_radius": "everything"}
    edit(runbooks / "stuck.yaml", add_delete)
    code, out = run_diff(runbooks, capsys)
    assert code == 1 and "WIDENED: new write privilege: fleet.delete on fleet service/{service}" in out


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d["remediate"]["approval"].__setitem__("medium", {"approvers": 1, "groups": ["oncall", "anyone"]}),
     "approver groups added ['anyone']"),
    (lambda d: d["remediate"]["actions"]["rollback"].__setitem__("timeout", "10m"), "max TTL 60s -> 600s"),
    (lambda d: d["params"]["service"].__setitem__("pattern", "^.+$"), "param 'service' pattern"),
])
def test_widenings_fail_the_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str], change, expected: str):
    runbooks = copy_runbooks(tmp_path)
    edit(runbooks / "bad-deploy.yaml", change)
    code, out = run_diff(runbooks, capsys)
    assert code == 1 and expected in out, out


def test_narrowing_passes_and_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    runbooks = copy_runbooks(tmp_path)
    (runbooks / "stuck.yaml").unlink()  # fleet.restart goes away
    edit(runbooks / "bad-deploy.yaml",
         lambda d: d["remediate"]["actions"]["rollback"].__setitem__("timeout", "30s"))
    code, out = run_diff(runbooks, capsys)
    assert code == 0
    assert "narrowed: removed write privilege: fleet.restart on fleet service/{service}" in out
    assert "max TTL 60s -> 30s" in out


def test_usage_counts_mints_from_the_audit_log_and_flags_the_unused(tmp_path: Path):
    log = AuditLog(tmp_path / "audit.jsonl")
    for _ in range(3):
        log.append("mint", decision="issued", audience="prometheus",
                   scope={"verb": "metrics.read", "resource": "namespace/shop"})
    log.append("mint", decision="issued", audience="fleet", scope={"verb": "fleet.rollback", "resource": "service/checkout"})
    log.append("deny", decision="denied", audience="fleet", scope={"verb": "fleet.restart", "resource": "service/x"})
    records = [__import__("json").loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    used = privileges.usage(shipped(), records, since=0)
    by_key = {f"{p['kind']} {p['verb']}": p for p in used["privileges"]}
    assert by_key["read metrics.read"]["uses"] == 3 and by_key["read metrics.read"]["last_used"]
    assert by_key["write fleet.rollback"]["uses"] == 1
    assert by_key["write fleet.restart"]["uses"] == 0  # a denial is not a use
    assert "write fleet fleet.restart service/{service}" in used["never_used"]
