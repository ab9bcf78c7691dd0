"""The broker's audit log and journal under faults: a full disk, a torn write, a tail cut away.

The full-disk test runs the real broker process with its state directory on a small tmpfs, mounted in a
mount namespace of the test's own (``unshare --mount``; the test reaches the files through
``/proc/PID/root``). Every mint and revoke, of reads and of writes (each with its plan, signed approval and
receipt, checked against the demo catalog), must either succeed with its audit record whole or fail with
no credential; a refused write is minted by its activity's next attempt once space returns; after a
restart, ``firebreak audit verify`` passes and names the repair. Without root or ``unshare`` the test says
why and is skipped, except in CI, where it fails.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI

from conftest import run_rule_tests
from demo.catalog import add_routes as add_catalog_routes
from firebreak import signing
from firebreak.blast_radius import BlastRadius
from firebreak.broker import cli, storage
from firebreak.broker.audit import GENESIS, AuditLog, record_hash, verify_chain
from firebreak.broker.models import MintRequest
from firebreak.broker.server import BrokerServer
from firebreak.contracts import Approval, Hypothesis
from firebreak.plan import build_plan
from firebreak.receipts import ensure_intake_key, intake_signer
from firebreak.roster import entry_yaml
from firebreak.runbook import default_runbook_dir, load_runbooks
from firebreak.serving import ThreadedServer

PARAMS = {"namespace": "shop", "service": "checkout"}
APPROVER = "fault-approver"
SECURITY_RULES = Path(__file__).resolve().parents[1] / "firebreak" / "security_rules.yml"


def read_mint(n: int) -> dict[str, Any]:
    return {"audience": "prometheus", "verb": "metrics.read", "resource": "namespace/shop", "ttl_s": 600,
            "workflow_id": "shop.checkout.error-rate", "run_id": "run-1", "activity_id": str(n),
            "step_id": "error_rate", "runbook": "bad-deploy", "params": PARAMS}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def runbooks(tmp_path: Path) -> Path:
    directory = tmp_path / "runbooks"
    directory.mkdir()
    shutil.copy(default_runbook_dir() / "bad-deploy.yaml", directory)
    return directory


# -- a full disk, on the real broker process ---------------------------------------------------------------


class SmallDisk:
    """A tmpfs of ``size`` at ``mountpoint``, in a mount namespace held by a sleeping process."""

    def __init__(self, mountpoint: Path, size: str) -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir()
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs -o size={size},mode=0700 firebreak-test '{mountpoint}' && echo mounted && exec sleep 600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "mounted":
            self.holder.wait(10)
            raise OSError(f"could not mount a tmpfs in a new mount namespace: {self.holder.stderr.read().strip()}")

    @property
    def root(self) -> Path:
        """The tmpfs as the test sees it: through the holder's view of the file system."""
        return Path(f"/proc/{self.holder.pid}/root") / self.mountpoint.relative_to("/")

    def run(self, *argv: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """A process inside the namespace (it sees the tmpfs at ``mountpoint``)."""
        return subprocess.Popen(["nsenter", f"--target={self.holder.pid}", "--mount", "--", *argv], **kwargs)

    def fill(self) -> Path:
        """Fill the tmpfs to its last byte: whatever is still free in a page a file holds is all that is left."""
        filler = self.root / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1 << 16, 1 << 12, 1 << 9, 1 << 6, 8, 1):
                while True:
                    try:
                        if os.write(fd, b"\0" * chunk) < chunk:
                            break
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        break
        finally:
            os.close(fd)
        return filler

    def close(self) -> None:
        self.holder.kill()  # the namespace, and the tmpfs with it, go with its last process
        self.holder.wait(10)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    missing = [tool for tool in ("unshare", "nsenter") if shutil.which(tool) is None]
    try:
        if missing:
            raise OSError(f"{', '.join(missing)} not installed (util-linux)")
        if os.geteuid() != 0:
            raise OSError("not root: mounting a tmpfs in a mount namespace needs CAP_SYS_ADMIN")
        disk = SmallDisk(tmp_path / "small", "1m")
    except OSError as exc:
        reason = f"full-disk test needs its own mount namespace and tmpfs: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason)  # in CI it runs, never skipped silently
        pytest.skip(reason)
    try:
        yield disk
    finally:
        disk.close()


class BrokerProcess:
    """``python -m firebreak.broker`` inside the namespace, state on the tmpfs; roster and catalog outside it."""

    def __init__(self, disk: SmallDisk, runbooks: Path, *, roster: Path, catalog_url: str) -> None:
        self.disk, self.runbooks, self.roster, self.catalog_url = disk, runbooks, roster, catalog_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BrokerProcess:
        self.proc = self.disk.run(
            sys.executable, "-m", "firebreak.broker", "--host", "127.0.0.1", "--port", str(self.port),
            "--state-dir", str(self.disk.mountpoint / "state"), "--runbooks-dir", str(self.runbooks),
            "--roster", str(self.roster), "--catalog-url", self.catalog_url,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.proc.communicate(timeout=10)[0].decode() if self.proc.poll() is not None else ""
                raise AssertionError(f"broker did not start: {out[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> str:
        """SIGTERM: uvicorn's shutdown signs the audit head."""
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.communicate(timeout=20)[0].decode()

    @property
    def state(self) -> Path:
        return self.disk.root / "state"

    def headers(self) -> dict[str, str]:
        token = (self.state / "broker" / "agent-token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}


class Writes:
    """Valid write mints, as a worker sends them: the rollback step of bad-deploy, each for its own incident
    and run, with the plan's honest impact, the approver's signature on it and the intake's receipt."""

    def __init__(self, runbooks: Path, roster: Path) -> None:
        self.runbook = load_runbooks(runbooks)[0]
        groups = self.runbook.remediate.policy_for(self.runbook.remediate.actions["rollback"]).groups
        self.key = signing.generate_key()
        roster.write_text("people:\n" + entry_yaml(APPROVER, list(groups), signing.public_pem(self.key)))
        self.intake: signing.Ed25519PrivateKey | None = None

    def request(self, n: int, service: str = "checkout") -> dict[str, Any]:
        assert self.intake is not None, "the intake's key is made in the broker's state directory first"
        incident = f"shop.disk-{n}.error-rate"
        params = {"namespace": "shop", "service": service}
        hypothesis = Hypothesis(id="bad_deploy", title="bad deploy", score=0.9, findings=[], actions=["rollback"])
        plan = build_plan(self.runbook, params, hypothesis, incident_id=incident, run_id=f"run-{n}")
        assert plan is not None, "the bad-deploy runbook proposes no rollback"
        # The blast radius the demo catalog gives (nothing depends on checkout or orders), as the worker's
        # walk finds it.
        plan = plan.model_copy(update={"impact": {s.id: BlastRadius(target=service) for s in plan.steps}})
        approval = signing.sign_approval(Approval(
            workflow_id=incident, plan_hash=plan.hash, decision="approve", nonce=f"full-disk-{n:04d}",
            expires_at=(datetime.now(UTC) + timedelta(minutes=30)).isoformat(), approver=APPROVER,
        ), self.key)
        step = plan.steps[0]
        return {"audience": step.target, "verb": step.verb, "resource": step.resource, "ttl_s": 60,
                "workflow_id": incident, "run_id": plan.run_id, "activity_id": "7", "step_id": step.id,
                "runbook": self.runbook.name, "params": params, "plan": plan.model_dump(mode="json"),
                "approvals": [approval.model_dump(mode="json")],
                "receipts": [intake_signer(self.intake)(incident).model_dump(mode="json")]}


def catalog_for(broker: BrokerProcess) -> tuple[ThreadedServer, signing.TargetVerifier]:
    """The demo's catalog where the broker was told it is, verifying the broker's own catalog tokens."""
    verifier = signing.TargetVerifier.from_broker(broker.url, "catalog")
    app = FastAPI()
    add_catalog_routes(app, verifier)
    port = int(broker.catalog_url.rsplit(":", 1)[1])
    return ThreadedServer(app, port=port, name="full-disk-catalog").start(), verifier


@pytest.mark.integration
def test_full_disk_never_issues_a_credential_without_its_audit_record_and_the_log_heals(
        small_disk: SmallDisk, runbooks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Reads and writes (each write with its plan, signed approval and receipt), and their revokes."""
    writes = Writes(runbooks, tmp_path / "roster.yaml")
    broker = BrokerProcess(small_disk, runbooks, roster=tmp_path / "roster.yaml",
                           catalog_url=f"http://127.0.0.1:{free_port()}").start()
    catalog: ThreadedServer | None = None
    verifier: signing.TargetVerifier | None = None
    try:
        catalog, verifier = catalog_for(broker)
        headers = broker.headers()
        writes.intake = ensure_intake_key(broker.state)  # where the broker reads the intake's public key
        issued: dict[int, str] = {}  # audit seq -> grant id, of every credential handed out
        written: dict[str, dict[str, Any]] = {}  # grant id -> the write request it was handed out for
        revoked: list[str] = []
        refusals: list[tuple[int, str]] = []  # (status, body) of every request that failed
        refused_writes: list[dict[str, Any]] = []  # write mints refused: the worker's activity retries them
        refused_revokes: list[dict[str, Any]] = []

        def mint(body: dict[str, Any]) -> str | None:
            response = httpx.post(f"{broker.url}/v1/mint", json=body, headers=headers, timeout=10)
            if response.status_code == 200:
                answer = response.json()
                assert answer["token"]
                issued[answer["audit_seq"]] = answer["grant_id"]
                if "plan" in body:
                    written[answer["grant_id"]] = body
                return str(answer["grant_id"])
            # Fails closed: no credential in the answer (and why, checked once the log is).
            assert "token" not in response.text
            refusals.append((response.status_code, response.text))
            if "plan" in body:
                refused_writes.append(body)
            return None

        def write(n: int, service: str = "checkout") -> str | None:
            return mint(MintRequest.model_validate(writes.request(n, service)).model_dump(mode="json"))

        def revoke(grant_id: str, *, wrote: bool = False) -> bool:
            body = {"grant_id": grant_id, "wrote": wrote}
            response = httpx.post(f"{broker.url}/v1/revoke", json=body, headers=headers, timeout=10)
            if response.status_code == 200:
                revoked.append(grant_id)
                return True
            refusals.append((response.status_code, response.text))
            refused_revokes.append(body)
            return False

        for n in range(3):
            assert mint(read_mint(n)) is not None
            assert write(n) is not None  # (the first reads the catalog, cached while the disk is full)
        filler = small_disk.fill()
        live = list(issued.values())
        live_writes = list(written)
        for n in range(3, 43):  # mints and revokes on a full disk
            grant = mint(read_mint(n))
            if n % 3 == 0 and live:
                revoke(live.pop())
            if grant is not None:
                live.append(grant)
            if n % 2 == 0:
                # One write needs a catalog read the broker has not cached: that read's record meets the full
                # disk too (a storage refusal, never a catalog one).
                written_grant = write(n, "orders" if n == 20 else "checkout")
                if n % 4 == 0 and live_writes:
                    revoke(live_writes.pop(), wrote=n % 8 == 0)
                if written_grant is not None:
                    live_writes.append(written_grant)
        assert refusals, "the full disk refused nothing: the test did not exercise a full disk"
        assert refused_writes, "the full disk refused no write mint: writes were not exercised on a full disk"
        metrics = httpx.get(f"{broker.url}/metrics", timeout=10).text
        errors = [line for line in metrics.splitlines() if line.startswith("firebreak_broker_storage_errors_total")]
        assert any(not line.endswith(" 0") for line in errors), errors

        filler.unlink()  # space returns
        for n in range(43, 46):
            assert mint(read_mint(n)) is not None
        # A refused write spent nothing for good: the activity's next attempt mints it (the same plan, signed
        # approval and receipt), and a refused revoke, retried, is answered and recorded.
        for body in refused_writes:
            assert mint(body | {"attempt": 2}) is not None, refusals[-1]
        for body in refused_revokes:
            assert revoke(body["grant_id"], wrote=body["wrote"]), refusals[-1]
        broker.stop()
        broker.start()  # the restart: a torn tail left anywhere is cut and recorded now
        assert mint(read_mint(46)) is not None
        assert write(46) is not None
        for grant_id in revoked:  # an answered revoke survived the restart
            assert grant_id in httpx.get(f"{broker.url}/v1/revoked", timeout=10).json()["revoked"]
    finally:
        if broker.proc is not None and broker.proc.poll() is None:
            broker.stop()
        if catalog is not None:
            catalog.stop()
        if verifier is not None:
            verifier.close()  # its revocation poll would outlive the broker

    audit_path = broker.state / "broker" / "audit.jsonl"
    key = signing.load_private_key(broker.state / "broker" / "signing-key.pem")
    # Every credential handed out has its mint record, whole, at the seq it was given with.
    ok, bad, message = verify_chain(audit_path, public_key=key.public_key(), history=issued)
    assert ok, (bad, message)
    records = {r["seq"]: r for r in lines(audit_path)}
    # Every write handed out was recorded as that write: its plan's step, incident, run and approver.
    by_grant = {r["grant_id"]: r for r in records.values() if r["event"] == "mint" and r["decision"] == "issued"}
    assert len(written) >= 3 + len(refused_writes) + 1
    for grant_id, body in written.items():
        record = by_grant[grant_id]
        assert (record["workflow_id"], record["run_id"], record["step_id"], record["approvers"]) == (
            body["workflow_id"], body["run_id"], body["step_id"], [APPROVER]), record
        assert record["scope"]["verb"] == body["verb"] and record["reason"].startswith("approved plan ")
    for grant_id in revoked:
        assert any(r["event"] == "revoke" and r["grant_id"] == grant_id for r in records.values()), grant_id
    repairs = [r for r in records.values() if r["event"] == "repair"]
    assert repairs, "a full disk that refused requests left no torn write to repair"
    assert all(r["decision"] == "truncated" and r["reason"] for r in repairs)
    assert any("was cut short" in r["reason"] and "ENOSPC" in r["reason"] for r in repairs), repairs

    # Each refusal said plainly that it was storage, retryable.
    assert {status for status, _ in refusals} == {503}, refusals[:3]
    assert all(json.loads(body)["error"] == "storage_unavailable" for _, body in refusals), refusals

    assert cli.main(["audit", "verify", "--state-dir", str(broker.state), "--no-history"]) == 0
    out = capsys.readouterr().out
    assert "chain intact" in out and "repair(s) the broker recorded" in out and "was cut short" in out


@pytest.mark.integration
def test_a_catalog_read_whose_record_failed_refuses_the_write_as_storage_never_as_the_catalog(
        tmp_path: Path, runbooks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker's own catalog read goes on its audit log: when that record cannot be made durable (an
    fsync that fails once, as a writeback error does), the write is refused for storage, with no credential,
    and counted as storage; the catalog answered, and blaming it would page the wrong people."""
    writes = Writes(runbooks, tmp_path / "roster.yaml")
    server = BrokerServer(tmp_path / "state", roster_path=tmp_path / "roster.yaml", runbooks_dir=runbooks).start()
    verifier = signing.TargetVerifier.from_broker(server.url, "catalog")
    app = FastAPI()
    add_catalog_routes(app, verifier)
    catalog = ThreadedServer(app, name="catalog").start()
    try:
        server.use_catalog(catalog.url)
        writes.intake = ensure_intake_key(tmp_path / "state")
        headers = {"Authorization": f"Bearer {server.agent_token}"}
        body = MintRequest.model_validate(writes.request(1)).model_dump(mode="json")
        real_fsync_path = storage.fsync_path
        failed: list[Path] = []

        def fails_once_for_the_audit_log(path: Path) -> None:
            if path == server.audit_path and not failed:
                failed.append(path)
                raise storage.StorageError(path, "fsync of", OSError(errno.EIO, os.strerror(errno.EIO)))
            real_fsync_path(path)

        monkeypatch.setattr(storage, "fsync_path", fails_once_for_the_audit_log)
        response = httpx.post(f"{server.url}/v1/mint", json=body, headers=headers, timeout=10)
        assert failed, "the catalog read's record was never synced: the test did not reach it"
        assert response.status_code == 503 and "token" not in response.text, response.text
        assert response.json()["error"] == "storage_unavailable", response.text
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        unavailable = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^firebreak_broker_unavailable_total\{dependency="(\w+)"\} (\S+)$', metrics, re.MULTILINE)}
        assert unavailable.get("storage", 0) >= 1 and unavailable.get("catalog", 0) == 0, unavailable
        # The storage is back: the same write (the activity's next attempt) is minted, its catalog read recorded.
        again = httpx.post(f"{server.url}/v1/mint", json=body | {"attempt": 2}, headers=headers, timeout=10)
        assert again.status_code == 200, again.text
    finally:
        catalog.stop()
        verifier.close()
        server.stop()
    records = lines(server.audit_path)
    # The read whose fsync failed, then the failure on the record; no denial blames the catalog.
    assert [r["event"] for r in records] == ["catalog_read", "repair", "catalog_read", "mint"], records
    assert records[1]["reason"].startswith("an fsync of records up to 1 failed (EIO")
    assert verify_chain(server.audit_path)[0]


# -- torn writes, without a full disk ----------------------------------------------------------------------


def test_a_torn_tail_is_cut_at_start_and_recorded_and_the_chain_verifies(tmp_path: Path) -> None:
    key = signing.generate_key()
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, signing_key=key, checkpoint_every=4)
    for _ in range(3):
        log.append("thaw", decision="thawed")
    with path.open("ab") as fh:  # what a write cut short by a crash leaves
        fh.write(b'{"appr')
    ok, seq, message = verify_chain(path, public_key=key.public_key())
    assert (ok, seq) == (False, 4) and "ends in a torn record after record 3 (6 bytes without an end of line)" in message

    again = AuditLog(path, signing_key=key, checkpoint_every=4)
    record = again.append("thaw", decision="thawed")
    again.close()
    records = lines(path)
    assert [r["event"] for r in records] == ["thaw", "thaw", "thaw", "repair", "thaw"] and record["seq"] == 5
    assert "cut a torn record after record 3: 6 bytes without an end of line" in records[3]["reason"]
    ok, _, message = verify_chain(path, public_key=key.public_key())
    assert ok and "1 repair(s) the broker recorded" in message and "repair at record 4: at start" in message


def test_a_short_write_fails_the_append_cuts_the_bytes_and_the_next_record_carries_the_repair(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.write writing only part of a record (what a full disk does) is an error, never a glued line."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("thaw", decision="thawed")
    real_write = os.write
    calls = 0

    def short_then_full(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(OSError) as raised:
        log.append("mint", decision="issued", grant_id="g-torn")
    monkeypatch.setattr(os, "write", real_write)
    assert "4 of" in str(raised.value)
    assert path.read_bytes().endswith(b"\n") and len(lines(path)) == 1  # the 4 bytes were cut off
    assert log.head_seq == 1

    log.append("thaw", decision="thawed")
    records = lines(path)
    assert [r["event"] for r in records] == ["thaw", "repair", "thaw"]
    assert records[1]["reason"].startswith("record 2 (mint of grant g-torn) was cut short: 4 of")
    assert "ENOSPC" in records[1]["reason"]
    assert verify_chain(path)[0]


@pytest.mark.integration
def test_a_torn_journal_line_is_dropped_at_start_and_the_repair_recorded_in_the_audit_chain(
        tmp_path: Path, runbooks: Path) -> None:
    server = BrokerServer(tmp_path / "state", runbooks_dir=runbooks).start()
    try:
        headers = {"Authorization": f"Bearer {server.agent_token}"}
        grant = httpx.post(f"{server.url}/v1/mint", json=read_mint(1), headers=headers).json()["grant_id"]
    finally:
        server.stop()
    journal = tmp_path / "state" / "broker" / "state.jsonl"
    with journal.open("a") as fh:  # a revoke's line, cut short by a crash: never answered
        fh.write('{"revoked": "' + grant[:5])
    server.start()
    try:
        assert grant in {g.grant_id for g in server.broker.state.live_grants()}  # the whole lines still count
    finally:
        server.stop()
    assert journal.read_text().endswith("\n") and '{"revoked"' not in journal.read_text()
    repairs = [r for r in lines(server.audit_path) if r["event"] == "repair"]
    assert len(repairs) == 1 and repairs[0]["reason"].startswith("state.jsonl: cut a torn last line of 18 bytes")
    key = signing.load_private_key(tmp_path / "state" / "broker" / "signing-key.pem")
    ok, _, message = verify_chain(server.audit_path, public_key=key)
    assert ok and "1 repair(s) the broker recorded" in message


def test_a_record_whose_fsync_failed_is_never_reported_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a writeback error once: a later fsync that succeeds does not bring the lost pages back."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        log.append("mint", decision="issued", grant_id="g-lost?")
    monkeypatch.setattr(os, "fsync", real_fsync)
    later = log.append("thaw", decision="thawed")  # durable: its own fsync succeeded
    with pytest.raises(OSError, match="fsync of record 1"):
        log.sync(1)
    log.sync(later["seq"])
    records = lines(path)
    assert [r["event"] for r in records] == ["mint", "repair", "thaw"]
    assert records[1]["reason"].startswith("an fsync of records up to 1 failed (EIO")


# -- a tail cut after the last checkpoint --------------------------------------------------------------------


def wait_for(predicate: Any, what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


@pytest.mark.integration
def test_a_tail_cut_after_the_last_checkpoint_is_caught_by_the_time_anchored_checkpoint(
        tmp_path: Path, runbooks: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FIREBREAK_AUDIT_CHECKPOINT_SECONDS", "0.5")
    server = BrokerServer(tmp_path / "state", runbooks_dir=runbooks).start()
    verify = ["audit", "verify", "--state-dir", str(tmp_path / "state"), "--no-history"]
    try:
        headers = {"Authorization": f"Bearer {server.agent_token}"}

        def mint(n: int) -> None:
            assert httpx.post(f"{server.url}/v1/mint", json=read_mint(n), headers=headers).status_code == 200

        for n in range(4):
            mint(n)
        # A time checkpoint covers the head (far fewer records than checkpoint_every).
        wait_for(lambda: lines(server.checkpoints_path)[-1]["seq"] == 4, "a time checkpoint of record 4")
        assert lines(server.checkpoints_path)[-1]["reason"] == "time"
        for n in range(4, 9):
            mint(n)
        # Drop the last 5 records, after the checkpoint: the chain alone still verifies...
        server.audit_path.write_text("".join(line + "\n" for line in server.audit_path.read_text().splitlines()[:4]))
        assert verify_chain(server.audit_path)[0]
        # ... but within seconds the broker signs its head, which the log no longer reaches.
        wait_for(lambda: lines(server.checkpoints_path)[-1]["seq"] == 9, "a checkpoint of record 9")
        assert cli.main(verify) == 1
        err = capsys.readouterr().err
        # (The checkpoint it names may be an earlier time checkpoint of records 5-8, signed between the mints.)
        assert re.search(r"signed record [5-9], but the log ends at record 4: the log was cut short", err), err
    finally:
        server.stop()


@pytest.mark.integration
def test_a_cut_back_to_an_earlier_checkpoint_with_the_later_ones_deleted_is_caught(
        tmp_path: Path, runbooks: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FIREBREAK_AUDIT_CHECKPOINT_SECONDS", "0.5")
    server = BrokerServer(tmp_path / "state", runbooks_dir=runbooks).start()
    verify = ["audit", "verify", "--state-dir", str(tmp_path / "state"), "--no-history"]
    try:
        headers = {"Authorization": f"Bearer {server.agent_token}"}
        for n in range(6):
            assert httpx.post(f"{server.url}/v1/mint", json=read_mint(n), headers=headers).status_code == 200
        wait_for(lambda: lines(server.checkpoints_path)[-1]["seq"] == 6, "a checkpoint of record 6")
        signed = lines(server.checkpoints_path)
        # Cut back to the start checkpoint (record 0) and delete every checkpoint after it, while it runs:
        server.audit_path.write_text("")
        server.checkpoints_path.write_text(json.dumps(signed[0]) + "\n")
        # The running broker signs its head again within seconds (a heartbeat, even with nothing new).
        wait_for(lambda: len(lines(server.checkpoints_path)) > 1, "the next time checkpoint")
        assert cli.main(verify) == 1
        assert "signed record 6, but the log ends at record 0: the log was cut short" in capsys.readouterr().err
    finally:
        server.stop()

    # A broker that is down, cut back to a checkpoint that is not its shutdown's, the later ones deleted:
    # nothing on disk contradicts it, but that checkpoint's age does once the broker's interval has passed.
    key = signing.generate_key()
    path = tmp_path / "offline" / "audit.jsonl"
    log = AuditLog(path, signing_key=key, checkpoint_every=100, checkpoint_seconds=60)
    for _ in range(5):
        log.append("thaw", decision="thawed")
    log.tick()  # nothing due yet
    middle = log.checkpoint("every")  # what a broker signs mid-run
    assert middle is not None
    for _ in range(5):
        log.append("thaw", decision="thawed")
    log.close()
    cp_path = path.with_name("audit.checkpoints.jsonl")
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:5]))
    cp_path.write_text("".join(json.dumps(c) + "\n" for c in lines(cp_path) if c["seq"] <= 5))
    assert verify_chain(path, public_key=key)[0]  # right after: nothing can tell yet
    later = datetime.fromisoformat(middle.at) + timedelta(minutes=5)
    ok, seq, message = verify_chain(path, public_key=key, now=later)
    assert (ok, seq) == (False, 6)
    assert "is 300 s old and not a shutdown checkpoint" in message and "later checkpoints were removed" in message


def test_unsigned_records_spanning_longer_than_the_time_interval_mean_removed_checkpoints(tmp_path: Path) -> None:
    key = signing.generate_key()
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, signing_key=key, checkpoint_every=100, checkpoint_seconds=60)
    for _ in range(3):
        log.append("thaw", decision="thawed")
    log.close()
    cp_path = tmp_path / "audit.checkpoints.jsonl"
    records = lines(path)
    # Records after the start checkpoint that are two hours apart: a broker signs within 60 s, so
    # checkpoints between them were removed. (Re-dated and re-hashed, as an attacker without the key can.)
    records[2]["at"] = "2099-01-01T02:00:00.000000Z"
    records[0]["at"] = "2099-01-01T00:00:00.000000Z"
    prev = GENESIS
    for record in records:
        record["prev_hash"] = prev
        record["hash"] = record_hash(record)
        prev = record["hash"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cp_path.write_text(json.dumps(lines(cp_path)[0]) + "\n")  # only the start checkpoint (record 0)
    ok, seq, message = verify_chain(path, public_key=key)
    assert (ok, seq) == (False, 1)
    assert "records 1 to 3 follow the newest checkpoint" in message and "span 7200 s" in message


# -- the alert ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_storage_error_rule_fires_at_the_availability_level_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool comes with Debian's prometheus package, which CI installs")
        pytest.skip("promtool not installed (Debian's prometheus package)")
    shipped = yaml.safe_load(SECURITY_RULES.read_text())
    rule = next(r for g in shipped["groups"] for r in g["rules"] if r.get("alert") == "FirebreakBrokerStorageError")
    assert rule["labels"]["severity"] == "warning" and rule["labels"]["category"] == "availability"
    for group in shipped["groups"]:
        for r in group["rules"]:
            r.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(shipped))
    job = 'job="firebreak-broker",instance="b:1"'
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": [
            {"series": f'firebreak_broker_storage_errors_total{{{job},file="audit"}}', "values": "0 0 0 0 1 3 3 3"},
            {"series": f'firebreak_broker_storage_errors_total{{{job},file="journal"}}', "values": "0x8"},
        ],
        "alert_rule_test": [
            {"eval_time": "45s", "alertname": "FirebreakBrokerStorageError", "exp_alerts": []},
            {"eval_time": "1m30s", "alertname": "FirebreakBrokerStorageError", "exp_alerts": [
                {"exp_labels": {"file": "audit", "severity": "warning", "category": "availability",
                                "firebreak_security": "true"}}]},
        ],
    }]}
    run_rule_tests(promtool, tmp_path, tests)
