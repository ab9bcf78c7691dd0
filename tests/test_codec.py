"""Payload encryption and the decode-only codec server, down to a real incident on the dev server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.api.failure.v1 import Failure
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.converter import (
    ActivitySerializationContext,
    DefaultFailureConverter,
    DefaultFailureConverterWithEncodedAttributes,
    WorkflowSerializationContext,
)
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from conftest import temporal_bin, unauthenticated_client
from demo.prom import free_port
from firebreak.codec import (
    ENCODING,
    KEY_ID_METADATA,
    MAC_METADATA,
    DecryptionError,
    EncryptionCodec,
    EncryptionError,
    PayloadAuthCodec,
    UNAUTHENTICATED,
    PayloadAuthError,
    ensure_key_file,
    key_id_for,
    mac_key_id_for,
    unauthenticated_reason,
)
from firebreak.codec_server import MAX_BODY_BYTES, CodecServer, create_app
from firebreak.contracts import ApprovalOutcome, Phase
from firebreak.history import history_rows
from firebreak.config import TemporalSettings
from firebreak.temporal import DATA_CONVERTER, connect, data_converter
from incidents import inject, make_alert, open_incident, report_of, status, submit, wait_for_phase
from worker import build_worker
from workflows.incident import IncidentWorkflow

KEY = EncryptionCodec.generate_key_b64()
TOKEN = secrets.token_urlsafe(24)
UI = "http://127.0.0.1:8233"
NAMESPACE = "default"


def payload(value: Any) -> Payload:
    return DATA_CONVERTER.payload_converter.to_payloads([value])[0]


def as_json(p: Payload) -> dict[str, Any]:
    return json_format.MessageToDict(p)


async def wait_for_status(handle: Any, predicate: Any, timeout: float = 15.0) -> Any:
    """The incident's status once ``predicate(status)`` holds (signals are handled asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        current = await status(handle)
        if predicate(current) or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.2)


# -- the codec --------------------------------------------------------------------------------------


async def test_round_trip_encrypts_every_payload_with_a_fresh_nonce() -> None:
    codec = EncryptionCodec.from_b64(KEY)
    originals = [payload({"runbook": "drill-rollback"}), payload(None), payload("x" * 5000)]
    encoded = await codec.encode(originals)
    for original, enc in zip(originals, encoded):
        assert enc.metadata["encoding"] == ENCODING
        assert enc.metadata[KEY_ID_METADATA] == codec.current.encode()
        assert set(enc.metadata) == {"encoding", KEY_ID_METADATA}  # the original encoding is hidden too
        assert not original.data or original.data not in enc.data
    assert await codec.decode(encoded) == originals
    again = await codec.encode(originals[:1])
    assert again[0].data[:12] != encoded[0].data[:12], "each payload gets its own nonce"


async def test_tampered_ciphertext_is_refused() -> None:
    codec = EncryptionCodec.from_b64(KEY)
    [enc] = await codec.encode([payload({"approver": "alice"})])
    for index in (0, 12, len(enc.data) // 2, len(enc.data) - 1):  # nonce, ciphertext, tag
        tampered = Payload()
        tampered.CopyFrom(enc)
        tampered.data = enc.data[:index] + bytes([enc.data[index] ^ 1]) + enc.data[index + 1:]
        with pytest.raises(DecryptionError, match="tampered or wrong key"):
            await codec.decode([tampered])
    truncated = Payload(metadata=dict(enc.metadata), data=enc.data[:20])
    with pytest.raises(DecryptionError, match="truncated"):
        await codec.decode([truncated])


async def test_wrong_key_is_refused() -> None:
    mine, theirs = EncryptionCodec.from_b64(KEY), EncryptionCodec.from_b64(EncryptionCodec.generate_key_b64())
    [enc] = await mine.encode([payload("secret")])
    with pytest.raises(DecryptionError, match="unknown key id"):
        await theirs.decode([enc])
    # The same key id on a different key (a misconfigured rotation) fails authentication, not silently.
    key_a, key_b = os.urandom(32), os.urandom(32)
    [enc] = await EncryptionCodec({"k1": key_a}, "k1").encode([payload("secret")])
    with pytest.raises(DecryptionError, match="tampered or wrong key"):
        await EncryptionCodec({"k1": key_b}, "k1").decode([enc])
    # Relabelling a payload with another known key id fails too: the key id is bound as associated data.
    both = EncryptionCodec({"k1": key_a, "k2": key_a}, "k1")
    [enc] = await both.encode([payload("secret")])
    enc.metadata[KEY_ID_METADATA] = b"k2"
    with pytest.raises(DecryptionError, match="tampered or wrong key"):
        await both.decode([enc])


async def test_plaintext_payload_is_refused_on_decode() -> None:
    codec = EncryptionCodec.from_b64(KEY)
    for plain in (payload({"approver": "mallory"}), payload(None), Payload()):
        with pytest.raises(DecryptionError, match="not encrypted"):
            await codec.decode([plain])
    # One bad payload spoils the batch: nothing is half-decoded.
    [good] = await codec.encode([payload(1)])
    with pytest.raises(DecryptionError):
        await codec.decode([good, payload(2)])


async def test_rotation_old_key_decodes_new_key_encodes() -> None:
    old_b64, new_b64 = KEY, EncryptionCodec.generate_key_b64()
    old = EncryptionCodec.from_b64(old_b64)
    [written_before] = await old.encode([payload({"v": 1})])
    rotated = EncryptionCodec.from_b64(f"{new_b64},{old_b64}")
    assert rotated.current == key_id_for(base64.b64decode(new_b64))
    assert rotated.key_ids == [rotated.current, old.current]
    assert await rotated.decode([written_before]) == [payload({"v": 1})]
    [written_after] = await rotated.encode([payload({"v": 2})])
    assert written_after.metadata[KEY_ID_METADATA] == rotated.current.encode()
    with pytest.raises(DecryptionError, match="unknown key id"):
        await old.decode([written_after])  # a worker not yet given the new key refuses, it does not guess
    # The explicit form: key ids chosen by the operator.
    explicit = EncryptionCodec({"2025-01": os.urandom(32), "2024-07": base64.b64decode(old_b64)}, current="2025-01")
    with pytest.raises(DecryptionError, match="unknown key id"):
        await explicit.decode([written_before])  # ids are part of the format: derived ids differ from "2024-07"


def test_bad_keys_are_refused_without_echoing_them() -> None:
    short = base64.b64encode(b"k" * 16).decode()
    with pytest.raises(EncryptionError, match="32 bytes") as info:
        EncryptionCodec.from_b64(short)
    assert short not in str(info.value)
    with pytest.raises(EncryptionError, match="not valid base64"):
        EncryptionCodec.from_b64("not base64!")
    with pytest.raises(EncryptionError, match="not among the keys"):
        EncryptionCodec({"a": os.urandom(32)}, current="b")
    with pytest.raises(EncryptionError):
        EncryptionCodec.from_b64("  ")
    codec = EncryptionCodec.from_b64(KEY)
    assert KEY not in repr(codec)
    # URL-safe base64 of the same key is the same key.
    urlsafe = base64.urlsafe_b64encode(base64.b64decode(KEY)).decode()
    assert EncryptionCodec.from_b64(urlsafe).current == codec.current


async def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = ensure_key_file(tmp_path / "codec" / "key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = EncryptionCodec.from_key_file(path)
    assert ensure_key_file(path) == path and EncryptionCodec.from_key_file(path).current == first.current
    [enc] = await first.encode([payload("x")])
    assert await EncryptionCodec.from_key_file(path).decode([enc]) == [payload("x")]


# -- payload authentication -------------------------------------------------------------------------

MAC_KEY = PayloadAuthCodec.generate_key_b64()
IN_WORKFLOW = WorkflowSerializationContext(namespace=NAMESPACE, workflow_id="shop.checkout.error-rate")
IN_ACTIVITY = ActivitySerializationContext(
    namespace=NAMESPACE, workflow_id="attacker", workflow_type="Attack", activity_type="execute_step",
    activity_id="1", activity_task_queue="firebreak", is_local=False)


async def test_auth_codec_signs_in_one_metadata_entry_and_leaves_the_payload_readable() -> None:
    codec = PayloadAuthCodec.from_b64(MAC_KEY)
    originals = [payload({"runbook": "drill-rollback"}), payload(None), payload("x" * 5000), Payload()]
    signed = await codec.encode(originals)
    for original, sig in zip(originals, signed):
        assert sig.data == original.data, "the data stays as written: readable in the UI"
        assert {k: v for k, v in sig.metadata.items() if k != MAC_METADATA} == dict(original.metadata)
        key_id, _, mac = sig.metadata[MAC_METADATA].decode().partition(":")
        assert key_id == codec.current == mac_key_id_for(base64.b64decode(MAC_KEY)) and len(mac) == 64
        assert MAC_METADATA not in original.metadata, "encode does not touch its input"
    assert await codec.decode(signed) == originals
    assert await codec.encode(signed) == signed, "signing again replaces the MAC, never stacks"


def _variants(signed: Payload) -> dict[str, Payload]:
    def changed(edit: Any) -> Payload:
        copy = Payload()
        copy.CopyFrom(signed)
        edit(copy)
        return copy

    other_mac = ("0" if signed.metadata[MAC_METADATA][-1:] != b"0" else "1").encode()
    return {
        "data": changed(lambda p: setattr(p, "data", p.data.replace(b"alice", b"mallo"))),
        "encoding": changed(lambda p: p.metadata.__setitem__("encoding", b"json/protobuf")),
        "added metadata": changed(lambda p: p.metadata.__setitem__("messageType", b"x")),
        "removed metadata": changed(lambda p: p.metadata.__delitem__("encoding")),
        "mac": changed(lambda p: p.metadata.__setitem__(MAC_METADATA, p.metadata[MAC_METADATA][:-1] + other_mac)),
        "data moved into metadata": changed(lambda p: (p.metadata.__setitem__("encoding", b"json/plain" + p.data),
                                                       setattr(p, "data", b""))),
    }


async def _refusal(codec: PayloadAuthCodec, p: Payload) -> str:
    try:
        await codec.decode([p])
    except PayloadAuthError as exc:
        return str(exc)
    return "accepted"


async def test_auth_codec_refuses_any_change_and_any_unsigned_payload() -> None:
    codec = PayloadAuthCodec.from_b64(MAC_KEY)
    [signed] = await codec.encode([payload({"approver": "alice", "decision": "approve"})])
    refusals = {what: await _refusal(codec, tampered) for what, tampered in _variants(signed).items()}
    assert all(reason.startswith("unauthenticated payload: bad MAC") for reason in refusals.values()), refusals
    for plain in (payload({"approver": "mallory"}), payload(None), Payload()):
        with pytest.raises(PayloadAuthError, match="^unauthenticated payload: no MAC$"):
            await codec.decode([plain])
    for junk in (b"", b"fm-x", b"fm-x:zz", b"no colon" + b"0" * 64, b"bad id!:" + b"0" * 64):
        forged = Payload()
        forged.CopyFrom(signed)
        forged.metadata[MAC_METADATA] = junk
        with pytest.raises(PayloadAuthError, match="malformed MAC"):
            await codec.decode([forged])
    # A MAC under a key id the codec does not hold, and a valid MAC relabelled with another id.
    [theirs] = await PayloadAuthCodec.from_b64(PayloadAuthCodec.generate_key_b64()).encode([payload("x")])
    with pytest.raises(PayloadAuthError, match="unknown key id"):
        await codec.decode([theirs])
    key = os.urandom(32)
    both = PayloadAuthCodec({"k1": key, "k2": key}, "k1")
    [sig] = await both.encode([payload("x")])
    sig.metadata[MAC_METADATA] = b"k2" + sig.metadata[MAC_METADATA][2:]
    with pytest.raises(PayloadAuthError, match="bad MAC under key 'k2'"):
        await both.decode([sig])
    # The encryption codec's kind of refusal, for the codec server and clients alike.
    assert issubclass(PayloadAuthError, DecryptionError)
    # One bad payload spoils the batch: nothing is half-decoded.
    with pytest.raises(PayloadAuthError):
        await codec.decode([signed, payload(2)])


async def test_auth_codec_rotation_old_key_verifies_new_key_signs() -> None:
    old_b64, new_b64 = MAC_KEY, PayloadAuthCodec.generate_key_b64()
    old = PayloadAuthCodec.from_b64(old_b64)
    [before] = await old.encode([payload({"v": 1})])
    rotated = PayloadAuthCodec.from_b64(f"{new_b64},{old_b64}")
    assert rotated.key_ids == [rotated.current, old.current]
    assert await rotated.decode([before]) == [payload({"v": 1})]
    [after] = await rotated.encode([payload({"v": 2})])
    assert after.metadata[MAC_METADATA].startswith(rotated.current.encode() + b":")
    with pytest.raises(PayloadAuthError, match="unknown key id"):
        await old.decode([after])  # a worker not yet given the new key refuses, it does not guess


async def test_unauthenticated_payloads_become_markers_for_workflows_and_raise_elsewhere() -> None:
    auth, enc = PayloadAuthCodec.from_b64(MAC_KEY), EncryptionCodec.from_b64(KEY)
    [signed] = await auth.encode([payload({"decision": "approve"})])
    [sealed] = await enc.encode([payload({"decision": "approve"})])
    forged = payload({"approver": "mallory", "decision": "approve"})
    converter = DATA_CONVERTER.payload_converter

    # For a workflow: the refused payload becomes the marker, the good ones stay as they were.
    for codec, good in ((auth, signed), (enc, sealed)):
        decoded = await codec.with_context(IN_WORKFLOW).decode([good, forged])
        assert decoded[0] == payload({"decision": "approve"})
        [value] = converter.from_payloads(decoded[1:])
        reason = unauthenticated_reason(value)
        assert reason is not None and reason.startswith("unauthenticated payload: "), value
        assert "mallory" not in json.dumps(value), "none of the refused content reaches the workflow"
    assert unauthenticated_reason(converter.from_payloads(await auth.with_context(IN_WORKFLOW).decode([forged]))[0]) \
        == "unauthenticated payload: no MAC"

    # For an activity's arguments, and without a context (a client, the codec server): raise.
    with pytest.raises(PayloadAuthError, match="^unauthenticated payload: no MAC; refusing to run the activity$"):
        await auth.with_context(IN_ACTIVITY).decode([forged])
    with pytest.raises(DecryptionError, match=r"not encrypted \(encoding 'json/plain'\); refusing to run the activity$"):
        await enc.with_context(IN_ACTIVITY).decode([forged])
    for codec in (auth, enc):
        with pytest.raises(DecryptionError):
            await codec.decode([forged])
    # Signed, but for no place: an activity refuses it (see tests/test_payload_binding.py); signed for its place, it runs.
    with pytest.raises(DecryptionError, match="^misplaced payload: not bound"):
        await auth.with_context(IN_ACTIVITY).decode([signed])
    [placed] = await auth.with_context(IN_ACTIVITY).encode([payload({"decision": "approve"})])
    assert await auth.with_context(IN_ACTIVITY).decode([placed]) == [payload({"decision": "approve"})]


async def test_activity_results_in_a_workflow_activation_become_markers() -> None:
    """The SDK decodes an activity's result for the workflow with the same ActivitySerializationContext
    the activity worker uses for its arguments; only its command-aware visitor's context variable
    tells the two apart. If a later SDK drops it, this test says so."""
    from temporalio.api.enums.v1 import CommandType
    from temporalio.worker._command_aware_visitor import current_command

    codec = PayloadAuthCodec.from_b64(MAC_KEY).with_context(IN_ACTIVITY)
    with current_command(CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK, 1):
        [marker] = await codec.decode([payload({"result": "forged"})])
    assert unauthenticated_reason(DATA_CONVERTER.payload_converter.from_payloads([marker])[0])
    with pytest.raises(PayloadAuthError):
        await codec.decode([payload({"result": "forged"})])


def test_unauthenticated_reason_recognises_only_the_marker() -> None:
    assert unauthenticated_reason({"firebreak_unauthenticated": "unauthenticated payload: no MAC"}) == \
        "unauthenticated payload: no MAC"
    for value in (None, "firebreak_unauthenticated", {}, {"firebreak_unauthenticated": 1},
                  {"firebreak_unauthenticated": "x", "approver": "alice"}, ["firebreak_unauthenticated"],
                  {"approver": "alice"}):
        assert unauthenticated_reason(value) is None, value


async def test_payload_key_file_and_converter_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ensure_key_file(tmp_path / "payload.key", PayloadAuthCodec)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = PayloadAuthCodec.from_key_file(path)
    assert first.current.startswith("fm-") and ensure_key_file(path, PayloadAuthCodec) == path
    assert PayloadAuthCodec.from_key_file(path).current == first.current
    assert MAC_KEY not in repr(first) and path.read_text().strip() not in repr(first)
    with pytest.raises(EncryptionError, match="payload key must be 32 bytes"):
        PayloadAuthCodec.from_b64(base64.b64encode(b"k" * 16).decode())

    signing = data_converter(TemporalSettings(payload_key_file=str(path)))
    assert isinstance(signing.payload_codec, PayloadAuthCodec)
    # Failures stay readable in the UI: only encryption moves them into encoded attributes.
    assert signing.failure_converter_class is DefaultFailureConverter
    encrypting = data_converter(TemporalSettings(payload_key_file=str(path), encrypt_key=KEY))
    assert isinstance(encrypting.payload_codec, EncryptionCodec), "encryption authenticates already"
    assert encrypting.failure_converter_class is DefaultFailureConverterWithEncodedAttributes
    assert data_converter(TemporalSettings()) is DATA_CONVERTER and DATA_CONVERTER.payload_codec is None

    from firebreak.config import load_settings

    monkeypatch.setenv("FIREBREAK_PAYLOAD_KEY_FILE", str(path))
    assert load_settings(tmp_path / "state").temporal.payload_key_file == str(path)


# -- the codec server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def codec_server() -> Iterator[CodecServer]:
    with CodecServer(EncryptionCodec.from_b64(KEY), bearer_token=TOKEN, allowed_origins=[UI],
                     namespace=NAMESPACE) as server:
        yield server


def post_decode(url: str, payloads: list[dict[str, Any]], *, token: str | None = TOKEN,
                namespace: str | None = NAMESPACE, origin: str | None = None,
                scheme: str = "Bearer") -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    if namespace is not None:
        headers["X-Namespace"] = namespace
    if origin is not None:
        headers["Origin"] = origin
    return httpx.post(f"{url}/decode", json={"payloads": payloads}, headers=headers, timeout=10)


async def test_codec_server_decodes_a_real_payload(codec_server: CodecServer) -> None:
    [enc] = await EncryptionCodec.from_b64(KEY).encode([payload({"runbook": "drill-rollback"})])
    response = post_decode(codec_server.url, [as_json(enc)])
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    [decoded] = response.json()["payloads"]
    assert base64.b64decode(decoded["metadata"]["encoding"]) == b"json/plain"
    assert json.loads(base64.b64decode(decoded["data"])) == {"runbook": "drill-rollback"}
    assert post_decode(codec_server.url, []).json() == {"payloads": []}


async def test_codec_server_requires_the_bearer_token(codec_server: CodecServer) -> None:
    [enc] = await EncryptionCodec.from_b64(KEY).encode([payload("secret")])
    for kwargs in ({"token": None}, {"token": "wrong-" + TOKEN}, {"token": TOKEN, "scheme": "Basic"},
                   {"token": TOKEN[:-1]}, {"token": TOKEN.upper()}):
        response = post_decode(codec_server.url, [as_json(enc)], **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 401, kwargs
        assert response.headers["www-authenticate"] == "Bearer"
        assert "secret" not in response.text and TOKEN not in response.text


async def test_codec_server_refuses_other_namespaces(codec_server: CodecServer) -> None:
    [enc] = await EncryptionCodec.from_b64(KEY).encode([payload("secret")])
    for namespace in ("prod", "", None):
        response = post_decode(codec_server.url, [as_json(enc)], namespace=namespace)
        assert response.status_code == 403, namespace
    # Authentication comes first: without the token, the namespace is not even discussed.
    assert post_decode(codec_server.url, [as_json(enc)], token=None, namespace="prod").status_code == 401


async def test_codec_server_shows_what_it_cannot_decrypt_as_refused(codec_server: CodecServer) -> None:
    """Never passed through as if genuine; shown as the refusal, beside the payloads it can decode."""
    plain = as_json(payload({"approver": "mallory"}))
    [mine] = await EncryptionCodec.from_b64(KEY).encode([payload("secret")])
    [other] = await EncryptionCodec.from_b64(EncryptionCodec.generate_key_b64()).encode([payload("x")])
    response = post_decode(codec_server.url, [plain, as_json(mine), as_json(other)])
    assert response.status_code == 200
    shown = [base64.b64decode(p["data"]).decode() for p in response.json()["payloads"]]
    assert "not encrypted" in json.loads(shown[0])[UNAUTHENTICATED] and "mallory" not in shown[0]
    assert shown[1] == '"secret"'
    assert "unknown key id" in json.loads(shown[2])[UNAUTHENTICATED]
    for body in (b"not json", b"[]", b'{"payloads": "x"}'):
        response = httpx.post(f"{codec_server.url}/decode", content=body, timeout=10, headers={
            "Authorization": f"Bearer {TOKEN}", "X-Namespace": NAMESPACE, "Content-Type": "application/json"})
        assert response.status_code == 400, body


def test_codec_server_has_no_encode(codec_server: CodecServer) -> None:
    for path in ("/encode", "/docs", "/openapi.json"):
        response = httpx.post(f"{codec_server.url}{path}", json={"payloads": []}, timeout=10,
                              headers={"Authorization": f"Bearer {TOKEN}", "X-Namespace": NAMESPACE})
        assert response.status_code in (404, 405), path
    assert httpx.get(f"{codec_server.url}/decode", timeout=10).status_code == 405


def preflight(server: CodecServer, origin: str, headers: str = "authorization,content-type,x-namespace") -> httpx.Response:
    return httpx.options(f"{server.url}/decode", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": headers})


async def test_cors_admits_the_ui_origin_only(codec_server: CodecServer) -> None:
    allowed = preflight(codec_server, UI)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == UI
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert {h.strip().lower() for h in allowed.headers["access-control-allow-headers"].split(",")} >= {
        "authorization", "content-type", "x-namespace"}
    assert "POST" in allowed.headers["access-control-allow-methods"]

    for origin in ("http://127.0.0.1:9999", "http://evil.example", "null"):
        refused = preflight(codec_server, origin)
        assert refused.status_code >= 400, origin
        assert "access-control-allow-origin" not in refused.headers, origin
    # A header beyond the three the UI sends fails the preflight, so the browser never sends the request.
    odd = preflight(codec_server, UI, "authorization,x-evil")
    assert odd.status_code == 400 and "x-evil" not in odd.headers.get("access-control-allow-headers", "").lower()

    # The actual request: the browser may read the answer from the UI's origin, and no other.
    [enc] = await EncryptionCodec.from_b64(KEY).encode([payload("x")])
    assert post_decode(codec_server.url, [as_json(enc)], origin=UI).headers["access-control-allow-origin"] == UI
    assert post_decode(codec_server.url, [], token=None, origin=UI).headers["access-control-allow-origin"] == UI
    other = post_decode(codec_server.url, [as_json(enc)], origin="http://evil.example")
    assert "access-control-allow-origin" not in other.headers


def test_create_app_refuses_unsafe_configuration() -> None:
    codec = EncryptionCodec.from_b64(KEY)
    with pytest.raises(ValueError, match="never"):
        create_app(codec, bearer_token=TOKEN, allowed_origins=["*"])
    with pytest.raises(ValueError, match="at least"):
        create_app(codec, bearer_token="short", allowed_origins=[UI])


# -- a whole incident, encrypted ----------------------------------------------------------------------


def walk(message: Message, path: str = "") -> Iterator[tuple[str, Message]]:
    """Every sub-message (with its path) of a protobuf message, maps and lists included."""
    yield path, message
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        name = f"{path}.{field.name}"
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    yield from walk(item, f"{name}[{key}]")
        elif field.is_repeated:
            for index, item in enumerate(value):
                yield from walk(item, f"{name}[{index}]")
        else:
            yield from walk(value, name)


def never_through_codec(path: str) -> bool:
    # Temporal never passes these to a codec: indexed for search, or for interceptors (tracing context),
    # or written by the SDK's core itself (a workflow.patched() marker: the patch id and a flag).
    return ".search_attributes" in path or ".header." in path or "marker_recorded_event_attributes.details[patch-" in path


@pytest.fixture
async def encrypted_client(dev_env: WorkflowEnvironment) -> Client:
    """A client to the same dev server that encrypts: what every Firebreak process gets from a key setting."""
    client = await connect(TemporalSettings(address=dev_env.client.service_client.config.target_host,
                                            namespace=dev_env.client.namespace, encrypt_key=KEY))
    # DATA_CONVERTER plus the codec (and the reader of its bound messages), and failure messages moved into
    # encoded (encrypted) attributes.
    converter = client.data_converter
    assert issubclass(converter.payload_converter_class, DATA_CONVERTER.payload_converter_class)
    assert converter.failure_converter_class is DefaultFailureConverterWithEncodedAttributes
    assert isinstance(client.data_converter.payload_codec, EncryptionCodec)
    return client


def assert_failure_encoded(path: str, failure: Failure) -> None:
    if failure.HasField("application_failure_info") or failure.HasField("encoded_attributes"):
        assert failure.message == "Encoded failure" and not failure.stack_trace, path
        assert failure.encoded_attributes.metadata["encoding"] == ENCODING, path


async def test_incident_runs_encrypted_end_to_end(
    dev_env: WorkflowEnvironment, encrypted_client: Client, settings, broker, fleet, approvers,
    codec_server: CodecServer,
) -> None:
    client, plain_client = encrypted_client, unauthenticated_client(dev_env)  # the same server, with and without the key
    converter = client.data_converter
    codec = converter.payload_codec
    assert isinstance(codec, EncryptionCodec)
    target = client.service_client.config.target_host

    inject(fleet.url, "checkout", "bad_deploy")
    async with build_worker(client, settings):
        handle = await open_incident(client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        # Someone without the key cannot read the workflow's state.
        with pytest.raises(Exception, match="encoding"):
            await plain_client.get_workflow_handle(handle.id).query("status")
        # A client with the payload (MAC) key but not the encryption key gets the marker, not the state:
        # clients decode query answers in a workflow's serialization context too.
        marked = await dev_env.client.get_workflow_handle(handle.id).query("status")
        assert unauthenticated_reason(marked) == "unauthenticated payload: no MAC", marked
        outcome = await submit(handle, approvers.approval("alice", handle.id, waiting.plan_hash))
        assert outcome.counted
        report = await report_of(handle)
    assert report.phase == Phase.rolled_back

    # The history as the server holds it, read by a client without the codec.
    history = await plain_client.get_workflow_handle(handle.id).fetch_history()
    found = [(path, m) for event in history.events for path, m in walk(event, f"event{event.event_id}")]
    payloads = [(p, m) for p, m in found if isinstance(m, Payload) and not never_through_codec(p)]
    assert len(payloads) > 20
    clear = [p for p, m in payloads if m.metadata.get("encoding") != ENCODING]
    assert not clear, f"payloads in clear: {clear[:5]}"
    assert all(m.metadata[KEY_ID_METADATA] == codec.current.encode() for _, m in payloads)
    # In clear, the runbook name is only where Temporal indexes it (a search attribute the workflow sets).
    named = [p for p, m in found if isinstance(m, Payload) and b"drill-rollback" in m.data]
    assert named and all(".search_attributes" in p for p in named), named

    # Any failure the SDK wrote carries "Encoded failure", its real message and stack trace encrypted.
    for path, failure in (pm for pm in found if isinstance(pm[1], Failure)):
        assert_failure_encoded(path, failure)

    # Those holding the token see it in clear through the codec server, as the UI would ask.
    started = history.events[0].workflow_execution_started_event_attributes
    response = post_decode(codec_server.url, [as_json(p) for p in started.input.payloads], origin=UI)
    assert response.status_code == 200, response.text
    [incident] = [json.loads(base64.b64decode(p["data"])) for p in response.json()["payloads"]]
    assert incident["runbook"]["name"] == "drill-rollback"

    # The Temporal CLI, a real codec client: with the token it reads the history; without it, it cannot.
    show = [temporal_bin(), "workflow", "show", "--address", target, "--namespace", NAMESPACE,
            "--workflow-id", handle.id, "--output", "json", "--codec-endpoint", codec_server.url]
    shown = subprocess.run([*show, "--codec-auth", f"Bearer {TOKEN}"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert "binary/encrypted" not in _decoded_text(shown.stdout)
    [shown_input] = json.loads(shown.stdout)["events"][0]["workflowExecutionStartedEventAttributes"]["input"]["payloads"]
    assert json.loads(base64.b64decode(shown_input["data"]))["runbook"]["name"] == "drill-rollback"
    # Without the token its decode requests are refused (it retries them until its deadline): nothing in clear.
    refused = subprocess.run([*show, "--command-timeout", "3s"], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "drill-rollback" not in _decoded_text(refused.stdout or "{}")

    # The encrypted history replays, and the operator's history table reads it with the key.
    await Replayer(workflows=[IncidentWorkflow], data_converter=converter).replay_workflow(history)
    rows = await history_rows(history, converter)
    assert any(detail.startswith("rolled_back:") for *_, detail in rows), rows[-3:]


def _decoded_text(exported: str) -> str:
    """The CLI's JSON with every payload's base64 metadata and data decoded, for searching."""
    parts: list[str] = []

    def visit(node: object) -> None:
        if isinstance(node, dict):
            if "data" in node and isinstance(node.get("metadata"), dict):
                for value in [node["data"], *node["metadata"].values()]:
                    try:
                        parts.append(base64.b64decode(value).decode("utf-8", "replace"))
                    except (ValueError, TypeError):
                        pass
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(json.loads(exported))
    return "\n".join(parts)


async def test_plaintext_messages_are_refused_and_do_not_wedge_the_incident(
    dev_env: WorkflowEnvironment, encrypted_client: Client, settings, broker, fleet, approvers,
) -> None:
    """Someone with access to Temporal but not the key sends a well-formed approval in clear.

    The worker does not read it: the workflow gets the unauthenticated marker instead (raising there
    would fail the workflow task on every retry, and a signal stays in history: the incident would be
    wedged). The update, whose argument then cannot be an Approval, is rejected; nothing counts, and
    the incident goes on answering and waiting.
    """
    outsider = unauthenticated_client(dev_env)
    inject(fleet.url, "checkout", "bad_deploy")
    async with build_worker(encrypted_client, settings):
        handle = await open_incident(encrypted_client, settings, make_alert("DrillRollback"))
        waiting = await wait_for_phase(handle, Phase.awaiting_approval)
        forged = approvers.approval("alice", handle.id, waiting.plan_hash)
        theirs = outsider.get_workflow_handle(handle.id)
        with pytest.raises(WorkflowUpdateFailedError):
            await theirs.execute_update("submit_approval", forged, result_type=ApprovalOutcome,
                                        rpc_timeout=timedelta(seconds=10))
        await theirs.signal("approval", forged)
        after = await wait_for_status(handle, lambda s: len(s.approvals) >= 1)
        assert after.phase == Phase.awaiting_approval
        await handle.terminate("test over")
    assert [r.counted for r in after.approvals] == [False], after.approvals
    assert "alice" not in after.approvals[0].approver, "the refused payload's content is not read"
    assert "unauthenticated payload" in after.approvals[0].reason and "not encrypted" in after.approvals[0].reason
    history = await handle.fetch_history()
    assert not [e for e in history.events if e.HasField("workflow_task_failed_event_attributes")]
    assert not any(e.HasField("workflow_execution_update_accepted_event_attributes") for e in history.events)


@pytest.mark.integration
async def test_codec_server_command_serves_decode_and_prints_no_secret(tmp_path: Path) -> None:
    key_file = ensure_key_file(tmp_path / "codec-key")
    token_file = tmp_path / "codec-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "firebreak.codec_server", "--port", str(port), "--key-file", str(key_file),
         "--token-file", str(token_file), "--ui-origin", UI, "--namespace", NAMESPACE],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.options(f"{url}/decode", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "codec server did not start"
                time.sleep(0.1)
        [enc] = await EncryptionCodec.from_key_file(key_file).encode([payload({"runbook": "drill-rollback"})])
        response = post_decode(url, [as_json(enc)])
        assert response.status_code == 200, response.text
        assert post_decode(url, [as_json(enc)], token="wrong-" + TOKEN).status_code == 401
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=10)
    assert "codec server on" in output
    for secret in (TOKEN, key_file.read_text().strip()):
        assert secret not in output


def test_codec_server_refuses_oversized_bodies(codec_server: CodecServer) -> None:
    response = httpx.post(f"{codec_server.url}/decode", content=b" " * (MAX_BODY_BYTES + 1), timeout=30, headers={
        "Authorization": f"Bearer {TOKEN}", "X-Namespace": NAMESPACE, "Content-Type": "application/json"})
    assert response.status_code == 413
