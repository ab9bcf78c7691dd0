"""The broker's audit log: hash-chained, and `firebreak audit verify` finds any edit.

Signed checkpoints and the grants Temporal history recorded make a log cut short,
or rewritten whole and re-hashed, fail verification too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio import activity, workflow
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from firebreak import signing
from firebreak.audit_history import HistoryGrants, grants_in, history_grants
from firebreak.broker import checkpoints, cli
from firebreak.broker.app import create_app
from firebreak.broker.audit import GENESIS, AuditLog, record_hash, verify_chain
from firebreak.broker.server import BrokerServer
from firebreak.runbook import default_runbook_dir


def fill(path: Path, n: int = 5, **log_options: Any) -> AuditLog:
    """n records: a mint of g0 at seq 1, a deny naming g1 at seq 2, a mint of g2 at seq 3, ..."""
    log = AuditLog(path, **log_options)
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
    assert cli.main(["audit", "verify", "--state-dir", str(tmp_path), "--no-history"]) == 0
    assert "5 records, chain intact" in capsys.readouterr().out

    text = path.read_text().replace('"reason":"record 4"', '"reason":"record four"')
    path.write_text(text)
    assert cli.main(["audit", "verify", "--state-dir", str(tmp_path), "--no-history"]) == 1
    err = capsys.readouterr().err
    assert "record 4 was altered" in err and "first broken record: seq 4" in err


# -- signed checkpoints ------------------------------------------------------------------


@pytest.fixture
def key() -> signing.Ed25519PrivateKey:
    return signing.generate_key()


def signed_log(path: Path, key: signing.Ed25519PrivateKey, n: int = 10, every: int = 4) -> AuditLog:
    """A broker's run: checkpoints at start (record 0), at 4 and 8, and at shutdown (10)."""
    log = fill(path, n, signing_key=key, checkpoint_every=every)
    log.close()
    return log


def write_lines(path: Path, items: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def rehash(records: list[dict[str, Any]]) -> None:
    """What an attacker without the key can do: re-link and re-hash every record from genesis."""
    prev = GENESIS
    for record in records:
        record["prev_hash"] = prev
        record["hash"] = record_hash(record)
        prev = record["hash"]


def test_checkpoints_at_start_every_n_and_at_close(tmp_path: Path, key: signing.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    log = signed_log(path, key)
    cp_path = tmp_path / "audit.checkpoints.jsonl"
    assert log.checkpoints_path == cp_path and cp_path.stat().st_mode & 0o777 == 0o600
    signed = lines(cp_path)
    assert [(c["seq"], c["reason"], c["every"]) for c in signed] == [
        (0, "start", 4), (4, "every", 4), (8, "every", 4), (10, "shutdown", 4)
    ]
    hashes = {0: GENESIS} | {r["seq"]: r["hash"] for r in lines(path)}
    assert all(c["hash"] == hashes[c["seq"]] and c["kid"] == signing.key_id(key) for c in signed)
    assert verify_chain(path, public_key=key.public_key()) == (
        True, None, f"{path}: 10 records, 4 checkpoints: chain intact"
    )
    # A restart over a head that is already signed adds nothing; appends go on counting from it.
    again = AuditLog(path, signing_key=key, checkpoint_every=4)
    again.close()
    assert len(lines(cp_path)) == 4
    for _ in range(4):
        again.append("thaw", decision="thawed")
    assert [c["seq"] for c in lines(cp_path)][-1] == 14


def test_no_key_no_checkpoints(tmp_path: Path) -> None:
    log = fill(tmp_path / "audit.jsonl", 20)
    assert log.close() is None and not (tmp_path / "audit.checkpoints.jsonl").exists()


def test_truncated_tail_is_broken(tmp_path: Path, key: signing.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    signed_log(path, key)
    write_lines(path, lines(path)[:7])
    assert verify_chain(path)[0]  # the chain alone cannot tell
    ok, seq, message = verify_chain(path, public_key=key.public_key())
    assert (ok, seq) == (False, 8)
    assert "audit.checkpoints.jsonl:3 signed record 8, but the log ends at record 7" in message
    assert "cut short (records from 8 on are missing)" in message


def test_rewritten_and_rehashed_log_is_broken(tmp_path: Path, key: signing.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    signed_log(path, key)
    records = lines(path)
    records[5]["decision"] = "issued"  # record 6: a denial turned into something else
    rehash(records)
    write_lines(path, records)
    assert verify_chain(path)[0]  # consistent again, as far as the chain goes
    ok, seq, message = verify_chain(path, public_key=key.public_key())
    assert (ok, seq) == (False, 8)
    assert "record 8 is not the record checkpoint" in message and "rewritten after record 4 and re-hashed" in message

    records[0]["reason"] = "nothing happened"  # now from the first record on
    rehash(records)
    write_lines(path, records)
    ok, seq, message = verify_chain(path, public_key=key.public_key())
    assert (ok, seq) == (False, 4) and "the log was rewritten and re-hashed" in message


def test_forged_checkpoint_is_broken(tmp_path: Path, key: signing.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    cp_path = tmp_path / "audit.checkpoints.jsonl"
    signed_log(path, key)
    records = lines(path)[:7]
    rehash(records)
    write_lines(path, records)
    real = lines(cp_path)

    # The attacker signs checkpoints of the cut log with a key of their own, under the broker's kid.
    mallory = signing.generate_key()
    forged = checkpoints.sign(mallory, signing.key_id(key), seq=7, hash=records[-1]["hash"], every=4, reason="shutdown")
    write_lines(cp_path, [*real[:2], json.loads(forged.to_line())])
    ok, seq, message = verify_chain(path, public_key=key.public_key())
    assert (ok, seq) == (False, 7)
    assert "audit.checkpoints.jsonl:3 (record 7) is not the broker's" in message
    assert "signature does not verify with the broker's key" in message

    # ... or under their own kid.
    forged = checkpoints.sign(mallory, signing.key_id(mallory), seq=7, hash=records[-1]["hash"], every=4,
                              reason="shutdown")
    write_lines(cp_path, [*real[:2], json.loads(forged.to_line())])
    assert "not among the broker keys" in verify_chain(path, public_key=key.public_key())[2]

    # ... or they edit a real one to vouch for the shorter log.
    altered = dict(real[2], seq=7, hash=records[-1]["hash"])
    write_lines(cp_path, [*real[:2], altered])
    assert verify_chain(path, public_key=key.public_key())[:2] == (False, 7)

    cp_path.write_text("{not json\n")
    ok, seq, message = verify_chain(path, public_key=key.public_key())
    assert (ok, seq) == (False, None) and "audit.checkpoints.jsonl:1 is malformed: not valid JSON" in message


def test_removed_checkpoints_are_broken(tmp_path: Path, key: signing.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    cp_path = tmp_path / "audit.checkpoints.jsonl"
    signed_log(path, key)
    real = lines(cp_path)

    write_lines(cp_path, real[:2])  # the checkpoints of 8 and 10 removed
    ok, seq, message = verify_chain(path, public_key=key.public_key())
    assert (ok, seq) == (False, 5)
    assert "6 records follow the newest checkpoint (record 4" in message and "broker signs one every 4" in message

    cp_path.unlink()
    ok, seq, message = verify_chain(path, public_key=key.public_key())
    assert (ok, seq) == (False, None) and "10 records but no checkpoint" in message


def test_crash_leaves_at_most_n_unsigned_and_verifies(tmp_path: Path, key: signing.Ed25519PrivateKey) -> None:
    """No close(): the records since the last every-N checkpoint are unsigned, which is allowed."""
    path = tmp_path / "audit.jsonl"
    fill(path, 7, signing_key=key, checkpoint_every=4)
    assert [c["seq"] for c in lines(tmp_path / "audit.checkpoints.jsonl")] == [0, 4]
    assert verify_chain(path, public_key=key.public_key())[0]


# -- grants from Temporal history ------------------------------------------------------


def test_history_grants_intact(tmp_path: Path, key: signing.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    signed_log(path, key)
    assert verify_chain(path, public_key=key.public_key(), history={1: "g0", 3: "g2", 9: "g8"}) == (
        True, None, f"{path}: 10 records, 4 checkpoints, 3 grants from history: chain intact"
    )
    # History alone (no key) is a check of its own.
    assert verify_chain(path, history={5: "g4"}) == (True, None, f"{path}: 10 records, 1 grants from history: chain intact")


def test_history_grant_beyond_the_end_is_broken(tmp_path: Path, key: signing.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    cp_path = tmp_path / "audit.checkpoints.jsonl"
    signed_log(path, key)
    # Cut the log and its checkpoints at the same place: the checkpoints alone no longer tell...
    write_lines(path, lines(path)[:7])
    write_lines(cp_path, [c for c in lines(cp_path) if c["seq"] <= 7])
    assert verify_chain(path, public_key=key.public_key())[0]
    # ... but Temporal history still holds the grant minted as record 9.
    ok, seq, message = verify_chain(path, public_key=key.public_key(), history={1: "g0", 9: "g8"})
    assert (ok, seq) == (False, 8)
    assert "Temporal history says grant 'g8' was minted as record 9, but the log ends at record 7" in message


def test_history_grant_naming_another_record_is_broken(tmp_path: Path, key: signing.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    signed_log(path, key)
    ok, seq, message = verify_chain(path, public_key=key.public_key(), history={3: "g2", 5: "g-other"})
    assert (ok, seq) == (False, 5)
    assert "record 5 is a mint of grant 'g4', but Temporal history says record 5 minted grant 'g-other'" in message
    ok, seq, message = verify_chain(path, history={2: "g1"})  # right grant id, but record 2 is a denial
    assert (ok, seq) == (False, 2) and "record 2 is a deny of grant 'g1'" in message


def test_grant_walk_over_activity_results() -> None:
    """Results shaped like the activities': evidence, step results, verification; the same grant twice."""
    grant = {"grant_id": "ga", "audience": "prometheus", "scope": "metrics.read namespace/shop",
             "expires_at": "2025-01-01T00:00:00Z", "audit_seq": 3}
    investigate = {"evidence": [{"id": "error_rate", "ok": True, "grant": grant, "samples": [[1, "0.2"]]},
                                {"id": "deploys", "ok": True, "grant": {**grant, "grant_id": "gb", "audit_seq": 4}}]}
    execute = {"step_id": "s1", "status": "done", "grant": {"grant_id": "gc", "audit_seq": 9},
               "verification": {"ok": True, "grants": [{"grant_id": "gd", "audit_seq": 11}, grant]}}
    old = {"grant": {"grant_id": "g-old", "audit_seq": None}, "note": {"grant_id": "not a grant"}}
    assert sorted(grants_in([investigate, execute, old])) == sorted(
        [("ga", 3), ("gb", 4), ("gc", 9), ("gd", 11), ("ga", 3), ("g-old", None)]
    )
    found = HistoryGrants()
    for n, result in enumerate([investigate, execute, old, None, "text"]):
        found.add(result, f"event {n}")
    assert found.by_seq == {3: "ga", 4: "gb", 9: "gc", 11: "gd"} and found.without_seq == {"g-old"}
    assert found.where[9] == "event 1" and not found.conflicts

    found.add({"grant_id": "gx", "audit_seq": 9}, "event 7")
    found.add({"grant_id": "ga", "audit_seq": 5}, "event 8")
    assert found.conflicts == [
        "Temporal history names two grants for audit record 9: 'gc' (event 1) and 'gx' (event 7)",
        "Temporal history gives grant 'ga' two audit records: 3 (event 0) and 5 (event 8)",
    ]


# -- the CLI -----------------------------------------------------------------------------


def test_cli_verifies_checkpoints_with_the_brokers_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broker = tmp_path / "broker"
    key = signing.generate_key()
    signing.write_private_key(broker / "signing-key.pem", key)
    path = broker / "audit.jsonl"
    signed_log(path, key)
    verify = ["audit", "verify", "--state-dir", str(tmp_path), "--no-history"]
    assert cli.main(verify) == 0
    assert f"{path}: 10 records, 4 checkpoints: chain intact" in capsys.readouterr().out

    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [signing.public_jwk(key)]}))
    public = tmp_path / "broker.pub"
    public.write_text(signing.public_pem(key))
    assert cli.main([*verify, "--jwks", str(jwks)]) == 0
    assert cli.main([*verify, "--public-key", str(public)]) == 0
    capsys.readouterr()

    write_lines(path, lines(path)[:6])
    assert cli.main(verify) == 1
    err = capsys.readouterr().err
    assert "signed record 8, but the log ends at record 6" in err and "first broken record: seq 7" in err

    # Another key (the JWKS of some other broker) does not vouch for these checkpoints.
    jwks.write_text(json.dumps({"keys": [signing.public_jwk(signing.generate_key())]}))
    assert cli.main([*verify, "--jwks", str(jwks)]) == 1
    assert "not among the broker keys" in capsys.readouterr().err


def test_cli_refuses_checkpoints_it_cannot_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broker" / "audit.jsonl"
    signed_log(path, signing.generate_key())  # the key is not in the state dir
    assert cli.main(["audit", "verify", "--state-dir", str(tmp_path), "--no-history"]) == 1
    assert "4 checkpoints" in (err := capsys.readouterr().err) and "no broker key to check them" in err


def test_cli_history_required_but_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fill(tmp_path / "broker" / "audit.jsonl")
    monkeypatch.setenv("FIREBREAK_TEMPORAL_ADDRESS", "127.0.0.1:9")  # discard port: nothing listens
    assert cli.main(["audit", "verify", "--state-dir", str(tmp_path), "--history"]) == 1
    assert "history cross-check failed: Temporal at 127.0.0.1:9" in capsys.readouterr().err
    # By default an unreachable Temporal is said, not fatal.
    assert cli.main(["audit", "verify", "--state-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "history: not checked (Temporal at 127.0.0.1:9" in err and "were not compared with the log" in err
    assert "chain intact\nnot cross-checked with Temporal history (unreachable" in out


# -- the broker signs at shutdown ------------------------------------------------------


@pytest.fixture
def one_runbook(tmp_path: Path) -> Path:
    directory = tmp_path / "runbooks"
    directory.mkdir()
    shutil.copy(default_runbook_dir() / "bad-deploy.yaml", directory)
    return directory


@pytest.mark.integration
def test_stopping_the_broker_server_checkpoints_the_head(tmp_path: Path, one_runbook: Path) -> None:
    server = BrokerServer(tmp_path / "state", runbooks_dir=one_runbook).start()
    try:
        agent = {"Authorization": f"Bearer {server.agent_token}"}
        for _ in range(3):  # each refusal of the authenticated agent is an audit record
            assert httpx.post(f"{server.url}/v1/mint", json={}, headers=agent).status_code == 400
    finally:
        server.stop()
    records = lines(server.audit_path)
    signed = lines(server.checkpoints_path)
    assert len(records) == 3
    assert (signed[-1]["seq"], signed[-1]["hash"], signed[-1]["reason"]) == (3, records[-1]["hash"], "shutdown")
    key = signing.load_private_key(tmp_path / "state" / "broker" / "signing-key.pem")
    assert verify_chain(server.audit_path, public_key=key.public_key()) == (
        True, None, f"{server.audit_path}: 3 records, 2 checkpoints: chain intact"
    )


async def test_the_apps_lifespan_checkpoints_at_shutdown(tmp_path: Path, one_runbook: Path) -> None:
    """What uvicorn runs on SIGTERM when the broker is its own process (`firebreak broker`)."""
    app = create_app(tmp_path, runbooks_dir=one_runbook)
    async with app.router.lifespan_context(app):
        record = app.state.broker.audit.append("thaw", decision="thawed")
    last = lines(tmp_path / "broker" / "audit.checkpoints.jsonl")[-1]
    assert (last["seq"], last["hash"], last["reason"]) == (record["seq"], record["hash"], "shutdown")


# -- the history walk on a real Temporal dev server ------------------------------------


@activity.defn(name="investigate")
async def _investigate_with_grants() -> dict[str, Any]:
    return {"evidence": [{"id": "error_rate", "grant": {"grant_id": "dev-g1", "audit_seq": 1}}],
            "verify": {"grant": {"grant_id": "dev-g3", "audit_seq": 3}}}


@workflow.defn(name="IncidentWorkflow")
class _GrantsIncident:
    """Stands in for the real workflow: only its type name and activity results matter here."""

    @workflow.run
    async def run(self) -> None:
        await workflow.execute_activity(_investigate_with_grants, start_to_close_timeout=timedelta(seconds=30))


async def test_history_grants_from_the_dev_server(dev_env: WorkflowEnvironment) -> None:
    client = dev_env.client
    queue = f"audit-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[_GrantsIncident], activities=[_investigate_with_grants],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        await client.execute_workflow(_GrantsIncident.run, id=f"audit-{queue}", task_queue=queue)
    # Only this test's run: the session's dev server holds other tests' incidents too.
    query = f"WorkflowType = 'IncidentWorkflow' AND TaskQueue = '{queue}'"
    for _ in range(50):  # visibility follows the run's close by a moment
        found = await history_grants(client, query)
        if found.workflows:
            break
        await asyncio.sleep(0.2)
    assert found.workflows == 1 and found.by_seq == {1: "dev-g1", 3: "dev-g3"} and not found.conflicts


async def test_audit_verify_checks_history_by_default_when_temporal_answers(
        dev_env: WorkflowEnvironment, tmp_path: Path, key: signing.Ed25519PrivateKey,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A log cut together with its checkpoints: only history can tell, and no flag is needed for it to."""
    from conftest import PAYLOAD_KEY_FILE

    client = dev_env.client
    queue = f"audit-default-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[_GrantsIncident], activities=[_investigate_with_grants],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        await client.execute_workflow(_GrantsIncident.run, id=f"audit-{queue}", task_queue=queue)
    broker = tmp_path / "broker"
    signing.write_private_key(broker / "signing-key.pem", key)
    path = broker / "audit.jsonl"
    signed_log(path, key)
    cp_path = broker / "audit.checkpoints.jsonl"
    write_lines(path, lines(path)[:2])  # history holds dev-g3 as record 3
    write_lines(cp_path, [c for c in lines(cp_path) if c["seq"] <= 2])
    verify = ["audit", "verify", "--state-dir", str(tmp_path)]
    assert await asyncio.to_thread(cli.main, [*verify, "--no-history"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("FIREBREAK_TEMPORAL_ADDRESS", client.service_client.config.target_host)
    monkeypatch.setenv("FIREBREAK_PAYLOAD_KEY_FILE", str(PAYLOAD_KEY_FILE))
    for _ in range(50):  # visibility follows the run's close by a moment
        if (await history_grants(client, f"WorkflowType = 'IncidentWorkflow' AND TaskQueue = '{queue}'")).workflows:
            break
        await asyncio.sleep(0.2)
    assert await asyncio.to_thread(cli.main, verify) == 1
    err = capsys.readouterr().err
    # Whichever grant it names first (the session's server holds other tests' incidents too), history caught
    # what the chain and the checkpoints could not.
    assert "IncidentWorkflow runs" in err and "Temporal history says" in err, err
