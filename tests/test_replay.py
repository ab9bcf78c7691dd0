"""Histories recorded from real runs must replay on today's code without nondeterminism.

``tests/histories/`` only grows: every history recorded there is kept forever, and each must still
replay, because a run started on that code may still be open somewhere. A change to IncidentWorkflow
that alters the commands a recorded run issued goes behind ``workflow.patched(...)``; re-recording a
history to make this test pass is exactly the mistake it exists to catch (f918bd8 did that, and every
incident started before it could no longer decode its own input). ``SHA256SUMS`` pins each file.

Add a history: run the incident, then
``temporal workflow show --workflow-id ID --output json > tests/histories/NAME.json`` (a new name,
never an existing one), and append its line with ``cd tests/histories && sha256sum NAME.json >> SHA256SUMS``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.worker import Replayer

from firebreak.codec import MAC_METADATA
from firebreak.temporal import DATA_CONVERTER
from workflows.incident import IncidentWorkflow

DIRECTORY = Path(__file__).parent / "histories"
HISTORIES = sorted(DIRECTORY.glob("*.json"))
SUMS = DIRECTORY / "SHA256SUMS"


def _payload_metadata(node: object) -> list[dict[str, str]]:
    """The metadata of every payload in a history exported as JSON (values decoded from base64)."""
    found: list[dict[str, str]] = []
    if isinstance(node, dict):
        if isinstance(node.get("metadata"), dict) and "data" in node:
            found.append({k: base64.b64decode(v).decode("utf-8", "replace") for k, v in node["metadata"].items()})
        for value in node.values():
            found += _payload_metadata(value)
    elif isinstance(node, list):
        for value in node:
            found += _payload_metadata(value)
    return found


def recorded_with(history: dict) -> DataConverter:
    """The data converter a history was recorded with, as far as replay needs it.

    Plain JSON payloads, with or without the payload MAC (``firebreak-mac``): the plain converter, which
    reads the data and ignores the MAC entry. The authenticating codec would need the recording's key
    and, without it, hand the workflow the unauthenticated marker for every payload: another run.
    Encrypted payloads cannot be read without their key, which is not kept in the repo: refused.
    """
    encodings = {meta.get("encoding", "") for meta in _payload_metadata(history)}
    if "binary/encrypted" in encodings:
        raise ValueError("encrypted payloads: record replay histories without --encrypt")
    unknown = encodings - {"json/plain", "binary/null", "json/protobuf"}
    if unknown:
        raise ValueError(f"payload encodings this test cannot read: {sorted(unknown)}")
    return DATA_CONVERTER


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_recorded_history_replays(path: Path) -> None:
    text = path.read_text()
    history = WorkflowHistory.from_json(path.stem, text)
    replayer = Replayer(workflows=[IncidentWorkflow], data_converter=recorded_with(json.loads(text)))
    await replayer.replay_workflow(history)


def test_there_are_histories_to_replay() -> None:
    assert HISTORIES, "tests/histories is empty: nothing guards determinism"


def _pinned() -> dict[str, str]:
    pinned: dict[str, str] = {}
    for line in SUMS.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            pinned[name.lstrip("*")] = digest
    return pinned


def test_recorded_histories_are_never_changed_or_removed() -> None:
    pinned = _pinned()
    present = {path.name for path in HISTORIES}
    assert not pinned.keys() - present, f"histories were removed: {sorted(pinned.keys() - present)}"
    assert not present - pinned.keys(), (
        f"new histories must be pinned in tests/histories/SHA256SUMS: {sorted(present - pinned.keys())}")
    changed = [name for name, digest in pinned.items()
               if hashlib.sha256((DIRECTORY / name).read_bytes()).hexdigest() != digest]
    assert not changed, f"recorded histories were modified (record a new file instead): {changed}"


def test_the_payload_mac_does_not_change_the_converter() -> None:
    authenticated = {"events": [{"input": {"payloads": [{
        "metadata": {"encoding": base64.b64encode(b"json/plain").decode(),
                     MAC_METADATA: base64.b64encode(b"k1:" + b"0" * 64).decode()},
        "data": base64.b64encode(b"{}").decode()}]}}]}
    assert recorded_with(authenticated) is DATA_CONVERTER
    encrypted = json.loads(json.dumps(authenticated).replace(
        base64.b64encode(b"json/plain").decode(), base64.b64encode(b"binary/encrypted").decode()))
    with pytest.raises(ValueError, match="encrypted"):
        recorded_with(encrypted)
