"""Payload codecs: HMAC authentication (readable) or AES-256-GCM encryption, both failing closed.

Two codecs, one of them on every client and worker (see ``firebreak/temporal.py``):

- :class:`PayloadAuthCodec` (the default stack): every payload keeps its data and metadata, so the
  Temporal UI shows it as is, and gains one metadata entry, ``firebreak-mac``: an HMAC-SHA256 under
  a key only Firebreak's processes hold. A payload without a valid MAC was written by someone who
  can reach Temporal but is not Firebreak: a worker never runs an activity on it.
- :class:`EncryptionCodec` (``firebreak up --encrypt``): the Temporal server never sees plaintext:
  workflow inputs, results, signals, updates, memos, summaries and (with
  ``DefaultFailureConverterWithEncodedAttributes``) failure messages all pass through it.
  AES-GCM authenticates as it encrypts.

Search attributes, ids, workflow and activity type names, headers, failure messages (unless encoded)
and the markers the SDK's core writes itself (``workflow.patched``) pass through neither: keep secrets
out of them, and do not trust them.

Unlike Temporal's sample codec, neither passes an unauthenticated payload through. What decode does
with one depends on where it is decoded (the SDK's serialization context, see :func:`_decodes_for_a_workflow`):

- for a workflow (its input, signals, updates, queries, activity results), it becomes a marker,
  ``{"firebreak_unauthenticated": "<reason>"}`` (see :func:`unauthenticated_reason`): raising there
  would fail the workflow task on every retry, and a signal stays in history, so one outsider's
  signal would wedge the incident forever. (Clients decode a workflow's answers in the same context,
  so they get the marker too, and their typed conversion fails on it.)
- for an activity's arguments, and without a context (``codec.decode`` called directly: the codec
  server, ``firebreak history``), it raises :class:`DecryptionError` (:class:`PayloadAuthError` for
  the auth codec): the activity fails with "Failed decoding arguments" caused by that message, and
  nothing runs.

Encrypted payload layout::

    metadata: {"encoding": "binary/encrypted", "encryption-key-id": "<key id>"}
    data:     nonce (12 bytes) || AES-GCM(ciphertext || tag) of Payload.SerializeToString()

The key id is also bound into the ciphertext as associated data, so a payload
cannot be relabelled with another key id without failing authentication.

Authenticated payload layout: the payload as written, plus
``metadata["firebreak-mac"] = "<key id>:<hex HMAC-SHA256>"`` over :func:`_mac_message`.

Bound payloads (both codecs): a MAC or a ciphertext says who wrote a payload, not where it belongs,
so each payload written in a serialization context also carries ``metadata["firebreak-bind"]``
(:class:`Binding`: the workflow id, what it was made for, the run, the activity id), inside what
the MAC covers (or inside the ciphertext). What the SDK's context does not tell the codec (the message
name, the run) comes in a binding *request* that :mod:`firebreak.binding`'s interceptors attach to
the argument before it is encoded (:data:`BIND_REQUEST`, dropped here, never written). On decode the
codec checks what its context knows (workflow id; activity type and id); a workflow's messages reach
it as an envelope (:func:`unbind`) so that the workflow checks the message name and the run itself;
an activity's run is checked by :class:`firebreak.binding.PayloadBinding` on the activity worker.
Payloads written before bindings carry none (``tests/histories/``): they are read as recorded, and
refused only where new work needs a binding.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import copy
import hashlib
import hmac
import json
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Self, TypeVar

from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import PydanticJSONPlainPayloadConverter, PydanticPayloadConverter
from temporalio.converter import (
    ActivitySerializationContext,
    EncodingPayloadConverter,
    PayloadCodec,
    SerializationContext,
    WithSerializationContext,
    WorkflowSerializationContext,
)

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
MAC_METADATA = "firebreak-mac"
BIND_METADATA = "firebreak-bind"  # written by the codec, covered by the MAC
BIND_REQUEST = "firebreak-bind-request"  # attached by the interceptors, consumed by encode, never written
BOUND = "firebreak_bound"  # the envelope key a workflow's messages arrive under (see unbind)
BOUND_ENCODING = b"json/firebreak-bound"  # the envelope's encoding: only ever made by decode, never sent
UNAUTHENTICATED = "firebreak_unauthenticated"
KEY_BYTES = 32  # AES-256; for HMAC-SHA256, its output size
# GCM's standard nonce, random per payload. NIST caps random nonces at 2^32 messages per key: rotate well before.
NONCE_BYTES = 12
TAG_BYTES = 16
_AAD_PREFIX = b"firebreak/payload/v1\x00"
_MAC_PREFIX = b"firebreak/payload-mac/v1\x00"
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_MAC_VALUE = re.compile(rb"^([A-Za-z0-9._-]{1,64}):([0-9a-f]{64})$")

_Codec = TypeVar("_Codec", bound="_KeyedCodec")


class EncryptionError(ValueError):
    """A key or key set that cannot be used. Messages never contain key material."""


class DecryptionError(ValueError):
    """A payload this codec refuses to decode: not encrypted, unknown key, tampered or wrong key."""


class PayloadAuthError(DecryptionError):
    """A payload without a valid MAC: written by someone who does not hold the payload key."""


class PayloadBindingError(DecryptionError):
    """An authentic payload moved out of its place: another workflow, run, message or activity."""


MISPLACED = "misplaced payload"


def key_id_for(key: bytes) -> str:
    """A stable id for an encryption key, so every process names it alike without extra configuration.

    A truncated SHA-256 under a domain tag: one-way, so it reveals nothing usable about the key.
    """
    return "fb-" + hashlib.sha256(b"firebreak-encryption-key-id\x00" + key).hexdigest()[:16]


def mac_key_id_for(key: bytes) -> str:
    """Like :func:`key_id_for` for a payload (MAC) key, under its own tag: the two kinds never share ids."""
    return "fm-" + hashlib.sha256(b"firebreak-payload-mac-key-id\x00" + key).hexdigest()[:16]


def _decode_key(key_b64: str, kind: str = "encryption key") -> bytes:
    # Standard or URL-safe alphabet, strictly: a stray character is a broken key, not noise to skip.
    text = key_b64.strip().translate(str.maketrans("-_", "+/"))
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EncryptionError(f"{kind} is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise EncryptionError(f"{kind} must be {KEY_BYTES} bytes, got {len(key)}")
    return key


def _read_key_file(path: str | Path) -> str:
    """The keys of a key file (one base64 key a line, ``#`` comments), comma-joined for ``from_b64``."""
    lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines()]
    return ",".join(line for line in lines if line)



# -- bindings: where a payload belongs -----------------------------------------------------------------

# What a workflow receives as a message (its input, a signal, an update, a query): checked by the
# workflow itself, which alone knows its run and which handler it is in. The rest the codec checks.
MESSAGE_KINDS = frozenset({"start", "continue", "signal", "update", "query"})


@dataclass(frozen=True)
class Binding:
    """Where a payload was made to go, covered by its MAC (in :data:`BIND_METADATA`).

    ``to`` is ``kind:name``: ``start:<workflow type>`` (a client's start), ``continue:<workflow type>``
    (a run's continue-as-new), ``signal:<name>``, ``update:<name>``, ``query:<name>``,
    ``activity:<type>`` (an activity's input), ``result:<type>`` (its result or heartbeat details), or
    ``""`` (anything else written for this workflow: its result, memo, answers). ``run`` is the run it
    was made for, ``""`` where the writer cannot know it (a start, the signal of a signal-with-start).
    ``attempt`` is the activity attempt that produced a result.
    """

    workflow_id: str
    to: str
    run: str = ""
    activity_id: str = ""
    attempt: int = 0

    @property
    def kind(self) -> str:
        return self.to.partition(":")[0]

    def encode(self) -> bytes:
        return json.dumps({"v": 1, "wf": self.workflow_id, "to": self.to, "run": self.run, "act": self.activity_id,
                           "attempt": self.attempt}, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Binding:
        try:
            doc = json.loads(raw)
            if doc.get("v") != 1 or not all(isinstance(doc.get(k), str) for k in ("wf", "to", "run", "act")) \
                    or type(doc.get("attempt")) is not int:
                raise ValueError
        except (ValueError, AttributeError):
            raise PayloadBindingError(f"{MISPLACED}: malformed binding") from None
        return cls(doc["wf"], doc["to"], doc["run"], doc["act"], doc["attempt"])


class MessageBinding(NamedTuple):
    """What a workflow's message was made for, as the workflow sees it after :func:`unbind`."""

    to: str
    run: str


def bind_request(payload: Payload, to: str, run: str = "") -> Payload:
    """``payload`` marked for the codec to bind to ``to`` and ``run`` when it encodes it.

    The request is no secret and proves nothing: only the codec's MAC over the binding does.
    """
    marked = Payload()
    marked.CopyFrom(payload)
    marked.metadata[BIND_REQUEST] = json.dumps({"to": to, "run": run}, separators=(",", ":"), sort_keys=True).encode()
    return marked


def _read_request(raw: bytes) -> MessageBinding:
    try:
        doc = json.loads(raw)
        return MessageBinding(str(doc["to"]), str(doc["run"]))
    except (ValueError, KeyError, TypeError):
        raise EncryptionError("malformed binding request") from None


def unbind(value: object) -> tuple[Any, MessageBinding | None]:
    """A workflow's message and what it was made for; ``(value, None)`` for a payload without a binding.

    Pure, no I/O: safe in workflow code. The codec hands a bound message to the workflow as
    ``{"firebreak_bound": {"to": ..., "run": ...}, "value": ...}`` (see :func:`_envelope`).
    """
    if isinstance(value, dict) and set(value) == {BOUND, "value"}:
        bound = value[BOUND]
        if isinstance(bound, dict) and isinstance(bound.get("to"), str) and isinstance(bound.get("run"), str):
            return value["value"], MessageBinding(bound["to"], bound["run"])
    return value, None


def misplaced(bound: MessageBinding | None, *, to: str, runs: Collection[str], any_run: bool = False) -> str | None:
    """Why a message cannot be taken here, or None. Pure: for workflow code.

    ``to``: the message this handler is (``signal:alert``); ``runs``: the runs it may be made for
    (this run, and the run it continued from); ``any_run``: a message its sender could not bind to a
    run (a start; the signal of a signal-with-start, which joins whichever run is open).
    """
    if bound is None:
        return f"{MISPLACED}: not bound to a workflow, run and message (written without payload binding)"
    if bound.to != to:
        return f"{MISPLACED}: made for {bound.to or 'no message'}, not {to}"
    if not bound.run:
        return None if any_run else f"{MISPLACED}: made for no particular run"
    if bound.run not in runs:
        return f"{MISPLACED}: made for run {bound.run}, not this one"
    return None


def _envelope(payload: Payload, binding: Binding) -> Payload:
    encoding = payload.metadata.get("encoding", b"")
    if encoding == b"json/plain":
        value = payload.data
    elif encoding == b"binary/null":
        value = b"null"
    else:  # Firebreak writes JSON only; a message the workflow could not check is refused
        raise PayloadBindingError(f"{MISPLACED}: a message in encoding {encoding[:40].decode('ascii', 'replace')!r}")
    head = json.dumps({"to": binding.to, "run": binding.run}, separators=(",", ":"), sort_keys=True).encode()
    return Payload(metadata={"encoding": BOUND_ENCODING},
                   data=b'{"' + BOUND.encode() + b'":' + head + b',"value":' + value + b"}")


class _BoundJSONPayloadConverter(EncodingPayloadConverter):
    """Reads the envelope: whole for a parameter typed ``Any`` (the workflow checks it, see :func:`unbind`),
    else the value alone, converted to the parameter's type (a workflow that does not check bindings)."""

    def __init__(self, json_converter: EncodingPayloadConverter) -> None:
        self._json = json_converter

    @property
    def encoding(self) -> str:
        return BOUND_ENCODING.decode()

    def to_payload(self, value: Any) -> Payload | None:
        return None  # never written: only decode makes envelopes

    def from_payload(self, payload: Payload, type_hint: type | None = None) -> Any:
        envelope = json.loads(payload.data)
        if type_hint is None or type_hint is Any:
            return envelope
        inner = json.dumps(envelope["value"], separators=(",", ":")).encode()
        return self._json.from_payload(Payload(metadata={"encoding": b"json/plain"}, data=inner), type_hint)


class BoundPayloadConverter(PydanticPayloadConverter):
    """Firebreak's payload converter wherever a codec binds payloads: pydantic's, plus the envelope."""

    def __init__(self) -> None:
        super().__init__()
        json_converter = next(c for c in self.converters.values() if isinstance(c, PydanticJSONPlainPayloadConverter))
        self._set_converters(*self.converters.values(), _BoundJSONPayloadConverter(json_converter))


# The bindings of an activity's arguments, noted by the codec on the activity worker for the check
# it cannot make (the run): the SDK decodes them in the activity's own task, right before its interceptors.
_activity_bindings: contextvars.ContextVar[tuple[Binding, ...]] = contextvars.ContextVar(
    "firebreak_activity_bindings", default=())


def activity_bindings() -> tuple[Binding, ...]:
    """The bindings the codec checked for the current activity task's arguments (and heartbeat details)."""
    return _activity_bindings.get()


def _activity_info() -> Any:
    try:
        from temporalio import activity

        return activity.info()
    except RuntimeError:  # not in an activity
        return None

# -- unauthenticated payloads -------------------------------------------------------------------------


def unauthenticated_marker(reason: str) -> Payload:
    """What a workflow receives instead of a payload it must not trust: the reason, none of the content."""
    body = json.dumps({UNAUTHENTICATED: reason[:200]}, separators=(",", ":"), sort_keys=True)
    return Payload(metadata={"encoding": b"json/plain"}, data=body.encode())


def unauthenticated_reason(value: object) -> str | None:
    """The reason when ``value`` (a decoded signal, update or input) is the marker of a refused payload.

    Pure, no I/O: safe in workflow code. Workflow handlers typed ``Any`` call it first and record
    the refusal instead of reading the value.
    """
    if isinstance(value, dict) and len(value) == 1:
        reason = value.get(UNAUTHENTICATED)
        if isinstance(reason, str):
            return reason
    return None


def _decodes_for_a_workflow(context: SerializationContext | None) -> bool:
    """Whether the SDK is decoding for a workflow activation, where a refused payload must not raise.

    Found in temporalio 1.35's source (worker/_workflow.py, _workflow_instance.py, _activity.py, client/):
    - Workflow activations (input, signals, updates, queries) decode with a WorkflowSerializationContext.
    - Activity *results* in an activation (ResolveActivity) decode with an ActivitySerializationContext,
      the same one the activity worker uses for the activity's *arguments*; the fields cannot tell them
      apart. Only the workflow side runs inside the SDK's command-aware visitor, which sets
      ``current_command_info``: that (private) context variable is what tells them apart here.
    - Clients pass a WorkflowSerializationContext too (starting a workflow, query/update answers, results),
      so a client also gets the marker there; its typed conversion (``result_type=IncidentStatus``...) then
      fails on it. Clients without a context (``codec.decode`` called directly, the codec server) raise.
    - Nexus contexts are not used by Firebreak: strict.
    """
    if isinstance(context, WorkflowSerializationContext):
        return True
    if isinstance(context, ActivitySerializationContext):
        return _in_workflow_activation()
    return False


def _in_workflow_activation() -> bool:
    try:
        from temporalio.worker._command_aware_visitor import current_command_info
    except ImportError:  # a later SDK moved it: never wedge a workflow; an activity still fails on the marker's type
        return True
    return current_command_info.get() is not None


class _KeyedCodec(PayloadCodec, WithSerializationContext):
    """Keys by id (the first writes, all read), key files, and decode's behaviour per serialization context."""

    _kind: ClassVar[str] = "key"

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise EncryptionError(f"current key id {current!r} is not among the keys")
        for key_id, key in keys.items():
            if not _KEY_ID.match(key_id):
                raise EncryptionError(f"bad key id {key_id!r}: 1-64 of A-Z a-z 0-9 . _ -")
            if len(key) != KEY_BYTES:
                raise EncryptionError(f"{self._kind} {key_id!r} must be {KEY_BYTES} bytes, got {len(key)}")
        self.current = current
        self._key_ids = list(keys)
        self._context: SerializationContext | None = None

    @staticmethod
    def _derive_key_id(key: bytes) -> str:
        raise NotImplementedError

    @classmethod
    def from_b64(cls: type[_Codec], key_b64: str) -> _Codec:
        """One base64 key, or several separated by commas or whitespace: the first encodes, all decode.

        The comma form lets ``FIREBREAK_ENCRYPT_KEY=NEW,OLD`` rotate keys without another setting.
        Key ids are derived from the keys (:func:`key_id_for`, :func:`mac_key_id_for`).
        """
        parts = [p for p in re.split(r"[,\s]+", key_b64) if p]
        if not parts:
            raise EncryptionError(f"no {cls._kind} given")
        keys = [_decode_key(p, cls._kind) for p in parts]
        ids = [cls._derive_key_id(k) for k in keys]
        return cls(dict(zip(ids, keys)), current=ids[0])

    @classmethod
    def from_key_file(cls: type[_Codec], path: str | Path) -> _Codec:
        """A file of base64 keys, one a line, the current one first (as written by :func:`write_key_file`)."""
        return cls.from_b64(_read_key_file(path))

    @staticmethod
    def generate_key_b64() -> str:
        return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")

    @property
    def key_ids(self) -> list[str]:
        return list(self._key_ids)

    def __repr__(self) -> str:  # never the keys
        return f"{type(self).__name__}(current={self.current!r}, key_ids={self.key_ids!r})"

    def with_context(self, context: SerializationContext) -> Self:
        # The SDK calls this per operation; the copy shares the keys and only remembers where it decodes.
        bound = copy.copy(self)
        bound._context = context
        return bound

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._seal(self._bound(p)) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        # Decided at decode time: for an activity context it depends on who is decoding (see above).
        if _decodes_for_a_workflow(self._context):
            return [self._open_or_mark(p) for p in payloads]
        try:
            return [self._placed(self._open(p)) for p in payloads]  # one refused payload spoils the batch
        except DecryptionError as exc:
            if isinstance(self._context, ActivitySerializationContext):
                # The SDK reports "Failed decoding arguments" caused by this: say that nothing ran.
                raise type(exc)(f"{exc}; refusing to run the activity") from None
            raise

    def _open_or_mark(self, payload: Payload) -> Payload:
        try:
            return self._placed(self._open(payload))
        except DecryptionError as exc:
            return unauthenticated_marker(_unauthenticated(str(exc)))

    def _open(self, payload: Payload) -> Payload:
        raise NotImplementedError

    def _seal(self, payload: Payload) -> Payload:
        raise NotImplementedError

    # -- binding: where the payload goes (encode) and whether it arrived there (decode) --

    def _bound(self, payload: Payload) -> Payload:
        """``payload`` with the binding of this context (and of the interceptors' request, if any)."""
        request = payload.metadata.get(BIND_REQUEST)
        binding = self._binding_for(_read_request(request) if request is not None else None)
        if binding is None and request is None and BIND_METADATA not in payload.metadata:
            return payload
        bound = Payload()
        bound.CopyFrom(payload)
        for key in (BIND_REQUEST, BIND_METADATA):  # a binding is only ever the codec's own
            if key in bound.metadata:
                del bound.metadata[key]
        if binding is not None:
            bound.metadata[BIND_METADATA] = binding.encode()
        return bound

    def _binding_for(self, request: MessageBinding | None) -> Binding | None:
        context = self._context
        if isinstance(context, WorkflowSerializationContext):
            # A client's message (the interceptor says which), or what the workflow itself writes.
            return Binding(context.workflow_id, request.to if request else "", request.run if request else "")
        if isinstance(context, ActivitySerializationContext):
            if _in_workflow_activation():  # the workflow scheduling the activity: its input
                to = f"activity:{context.activity_type}"
                if request is not None and request.to != to:
                    raise EncryptionError(f"binding request for {request.to!r} on the input of {to!r}")
                # The SDK knows the activity id here only if the workflow chose it (Firebreak's do not: the
                # run and the type place it, since only the run's own worker schedules in that run).
                return Binding(context.workflow_id, to, request.run if request else "", context.activity_id or "")
            # The activity worker: its result or heartbeat details, from the run and attempt that produced them.
            info = _activity_info()
            return Binding(context.workflow_id, f"result:{context.activity_type}",
                           (info.workflow_run_id or "") if info else "", context.activity_id or "",
                           info.attempt if info else 0)
        return None  # called directly (tests, tools): nothing says where the payload goes

    def _placed(self, payload: Payload) -> Payload:
        """An opened payload checked against where it is decoded; its binding removed (or enveloped)."""
        context = self._context
        raw = payload.metadata.get(BIND_METADATA)
        if context is None or not isinstance(context, (WorkflowSerializationContext, ActivitySerializationContext)):
            return payload  # the codec server, `firebreak history`: nothing to check against; the binding stays shown
        binding = Binding.decode(raw) if raw is not None else None
        if raw is not None:
            stripped = Payload()
            stripped.CopyFrom(payload)
            del stripped.metadata[BIND_METADATA]
            payload = stripped
        if binding is not None and binding.workflow_id != context.workflow_id:
            raise PayloadBindingError(
                f"{MISPLACED}: made for workflow {binding.workflow_id!r}, not {context.workflow_id!r}")
        if isinstance(context, WorkflowSerializationContext):
            # Unbound (recorded before bindings): read as recorded; the workflow decides whether it may count.
            return _envelope(payload, binding) if binding is not None and binding.kind in MESSAGE_KINDS else payload
        in_activation = _in_workflow_activation()
        if binding is None:
            if in_activation:
                return payload  # a result recorded before bindings: replays as it ran
            raise PayloadBindingError(f"{MISPLACED}: not bound to a workflow and activity")
        kinds = {f"result:{context.activity_type}"}
        if not in_activation:  # the activity worker: its arguments, or its heartbeat details
            kinds.add(f"activity:{context.activity_type}")
        if binding.to not in kinds:
            raise PayloadBindingError(f"{MISPLACED}: made for {binding.to or 'no activity'}, "
                                      f"not {'result' if in_activation else 'activity'}:{context.activity_type}")
        if binding.activity_id and context.activity_id and binding.activity_id != context.activity_id:
            raise PayloadBindingError(
                f"{MISPLACED}: made for activity id {binding.activity_id!r}, not {context.activity_id!r}")
        if not in_activation:
            _activity_bindings.set(_activity_bindings.get() + (binding,))
        return payload


def _unauthenticated(reason: str) -> str:
    if reason.startswith(("unauthenticated payload", MISPLACED)):
        return reason
    return f"unauthenticated payload: {reason}"


# -- authentication ------------------------------------------------------------------------------------


class PayloadAuthCodec(_KeyedCodec):
    """Signs every payload with HMAC-SHA256, in a metadata entry; verifies and strips it on decode.

    The data and the other metadata stay as written, so the UI shows them. Rotation works as for
    :class:`EncryptionCodec`: append the new key everywhere, then move it first, then drop the old
    one once no open workflow holds payloads signed with it.
    """

    _kind = "payload key"

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        super().__init__(keys, current)
        self._keys = {key_id: bytes(key) for key_id, key in keys.items()}

    _derive_key_id = staticmethod(mac_key_id_for)

    def _seal(self, payload: Payload) -> Payload:
        return self.sign(payload)

    def sign(self, payload: Payload) -> Payload:
        signed = Payload()
        signed.CopyFrom(payload)
        _drop_mac(signed)  # re-signing replaces, never stacks
        mac = _mac(self._keys[self.current], self.current, signed)
        signed.metadata[MAC_METADATA] = f"{self.current}:{mac.hex()}".encode("ascii")
        return signed

    def verify(self, payload: Payload) -> Payload:
        """The payload without its MAC entry, or :class:`PayloadAuthError` naming why not."""
        return self._open(payload)

    def _open(self, payload: Payload) -> Payload:
        value = payload.metadata.get(MAC_METADATA)
        if value is None:
            raise PayloadAuthError("unauthenticated payload: no MAC")
        found = _MAC_VALUE.match(value)
        if found is None:
            raise PayloadAuthError("unauthenticated payload: malformed MAC")
        key_id, presented = found.group(1).decode("ascii"), bytes.fromhex(found.group(2).decode("ascii"))
        key = self._keys.get(key_id)
        if key is None:
            raise PayloadAuthError(f"unauthenticated payload: MAC under an unknown key id {key_id!r}")
        plain = Payload()
        plain.CopyFrom(payload)
        _drop_mac(plain)
        if not hmac.compare_digest(_mac(key, key_id, plain), presented):
            raise PayloadAuthError(f"unauthenticated payload: bad MAC under key {key_id!r}: tampered or wrong key")
        return plain


def _drop_mac(payload: Payload) -> None:
    if MAC_METADATA in payload.metadata:  # a protobuf map's del raises on a missing key
        del payload.metadata[MAC_METADATA]


def _mac(key: bytes, key_id: str, payload: Payload) -> bytes:
    return hmac.new(key, _mac_message(key_id, payload), hashlib.sha256).digest()


def _mac_message(key_id: str, payload: Payload) -> bytes:
    """The canonical bytes a MAC covers: every field of the payload but the MAC itself.

    Each part length-prefixed (so no two payloads serialize alike), metadata sorted by the UTF-8 bytes
    of its keys, the key id bound in (so a MAC cannot be relabelled), external payload references
    serialized deterministically (Firebreak uses none; covering them keeps a future one from riding along).
    """
    def part(data: bytes) -> bytes:
        return len(data).to_bytes(8, "big") + data

    metadata = sorted((k.encode(), v) for k, v in payload.metadata.items() if k != MAC_METADATA)
    chunks = [_MAC_PREFIX, part(key_id.encode("ascii")), len(metadata).to_bytes(4, "big")]
    chunks += [part(k) + part(v) for k, v in metadata]
    chunks.append(part(payload.data))
    chunks.append(len(payload.external_payloads).to_bytes(4, "big"))
    chunks += [part(ref.SerializeToString(deterministic=True)) for ref in payload.external_payloads]
    return b"".join(chunks)


# -- encryption ----------------------------------------------------------------------------------------


class EncryptionCodec(_KeyedCodec):
    """Encrypts with the current key; decrypts with any known key, chosen by the payload's key id.

    Rotation, in two steps so no running process meets a key it does not know:
    1. append the new key (``OLD,NEW``) everywhere and restart: all decode it, none writes it yet;
    2. move it first (``NEW,OLD``) and restart: it encodes from now on.
    Drop ``OLD`` only once no open workflow (and no history you still want to read) holds payloads under it.
    """

    _kind = "encryption key"

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        # cryptography is imported where used: workflow code imports this module (unauthenticated_reason),
        # and cryptography imported inside the workflow sandbox crashes the worker.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        super().__init__(keys, current)
        self._ciphers = {key_id: AESGCM(bytes(key)) for key_id, key in keys.items()}

    _derive_key_id = staticmethod(key_id_for)

    def _seal(self, payload: Payload) -> Payload:
        # Every payload, whatever its encoding: nothing leaves this process in clear (its binding inside).
        return self.encrypt(payload)

    def encrypt(self, payload: Payload) -> Payload:
        key_id = self.current
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(nonce, payload.SerializeToString(), _aad(key_id))
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id.encode("ascii")},
            data=nonce + sealed,
        )

    def decrypt(self, payload: Payload) -> Payload:
        return self._open(payload)

    def _open(self, payload: Payload) -> Payload:
        from cryptography.exceptions import InvalidTag

        encoding = payload.metadata.get("encoding", b"")
        if encoding != ENCODING:
            # Fail closed: plaintext here was written by someone without the key.
            shown = encoding[:40].decode("ascii", "replace") or "none"
            raise DecryptionError(f"refusing a payload that is not encrypted (encoding {shown!r})")
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode("ascii", "replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise DecryptionError(f"payload encrypted with an unknown key id {key_id[:64]!r}")
        if len(payload.data) < NONCE_BYTES + TAG_BYTES:
            raise DecryptionError("encrypted payload is truncated")
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            plain = cipher.decrypt(nonce, sealed, _aad(key_id))
        except InvalidTag:
            raise DecryptionError(f"payload failed authentication under key {key_id!r}: tampered or wrong key") from None
        try:
            return Payload.FromString(plain)
        except DecodeError:  # authentic but not a payload: a bug, never accept it
            raise DecryptionError("decrypted data is not a payload") from None


def _aad(key_id: str) -> bytes:
    return _AAD_PREFIX + key_id.encode("ascii")


# -- key files -----------------------------------------------------------------------------------------


def write_key_file(path: str | Path, keys_b64: Sequence[str]) -> Path:
    """Write keys (current first), readable by the owner only. Refuses to replace an existing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{k}\n" for k in keys_b64))
    return path


def ensure_key_file(path: str | Path, codec: type[_KeyedCodec] = EncryptionCodec) -> Path:
    """The key file at ``path``, created with a fresh key the first time.

    ``firebreak up --encrypt`` for the encryption key; ``codec=PayloadAuthCodec`` for the payload key.
    """
    path = Path(path)
    if not path.exists():
        write_key_file(path, [codec.generate_key_b64()])
    codec.from_key_file(path)  # fail now, not at the first payload
    return path
