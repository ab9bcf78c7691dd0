"""The broker's audit log: hash-chained, and `firebreak audit verify` finds any edit."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from firebreak.broker import cli
from firebreak.broker.audit import GENESIS, AuditLog, record_hash, verify_chain


def fill(path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.append(
            "mint" if i % 2 == 0 else "deny",
            decision="issued" if i % 2 == 0 else "denied",
            reason=f"record {i + 1}",
            grant_id=f"g{i}",
            audience="fleet",
            scope={"verb": "fleet.read", "resource": "service/checkout"},
            subject="firebreak-agent",
            workflow_id="wf",
            run_id="r",
            step_id="s1",
            approvers=["alice"],
        )
    return log


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chain_links_every_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path)
    records = lines(path)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev_hash"] == GENESIS
    for before, after in itertools.pairwise(records):
        assert after["prev_hash"] == before["hash"]
    assert all(record_hash(r) == r["hash"] for r in records)
    assert verify_chain(path) == (True, None, f"{path}: 5 records, chain intact")


def test_reopened_log_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path, 2)
    AuditLog(path).append("thaw", decision="thawed")
    assert lines(path)[-1]["seq"] == 3
    assert verify_chain(path)[0]


def test_edited_record_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path)
    records = lines(path)
    records[2]["decision"] = "issued"  # someone turns a denial into... something else
    records[2]["approvers"] = ["mallory"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ok, seq, message = verify_chain(path)
    assert (ok, seq) == (False, 3)
    assert "record 3 was altered" in message


def test_edit_with_rehash_still_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path)
    records = lines(path)
    records[1]["reason"] = "nothing to see"
    records[1]["hash"] = record_hash(records[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert verify_chain(path)[:2] == (False, 3)


def test_deleted_record_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path)
    records = lines(path)
    del records[1]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ok, seq, message = verify_chain(path)
    assert (ok, seq) == (False, 2) and "removed or reordered" in message


def test_garbage_line_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path, 2)
    with path.open("a") as fh:
        fh.write("{not json\n")
    assert verify_chain(path)[:2] == (False, 3)


def test_missing_log_is_empty_and_valid(tmp_path: Path) -> None:
    assert verify_chain(tmp_path / "none.jsonl")[:2] == (True, None)


def test_cli_audit_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broker" / "audit.jsonl"
    fill(path)
    assert cli.main(["audit", "verify", "--state-dir", str(tmp_path)]) == 0
    assert "5 records, chain intact" in capsys.readouterr().out

    text = path.read_text().replace('"reason":"record 4"', '"reason":"record four"')
    path.write_text(text)
    assert cli.main(["audit", "verify", "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "record 4 was altered" in err and "first broken record: seq 4" in err
