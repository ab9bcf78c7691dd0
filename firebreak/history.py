"""An incident's history as a readable table: the story an operator would read in the UI.

Each row is (event id, ISO time, event type, detail). Approvals read with who, what they said (a
comment, or a rejection's reason) and whether they counted; a refused one reads REFUSED, whether it
came as a signal (judged in the workflow: see its status) or as an update (failed with the reason).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter


async def decode_json(payloads: list[Payload], converter: DataConverter) -> list[Any]:
    """Payloads as plain JSON values (through the codec); a refused payload reads as the refusal marker."""
    if not payloads:
        return []
    if converter.payload_codec:
        payloads = [await _decode_or_mark(converter, p) for p in payloads]
    out = []
    for payload in payloads:
        try:
            out.append(json.loads(payload.data) if payload.data else None)
        except ValueError:
            out.append(None)
    return out


async def _decode_or_mark(converter: DataConverter, payload: Payload) -> Payload:
    """A payload the codec refuses (an outsider's signal, an SDK patch marker) reads as the refusal."""
    from firebreak.codec import DecryptionError, unauthenticated_marker

    assert converter.payload_codec is not None
    try:
        [decoded] = await converter.payload_codec.decode([payload])
        return decoded
    except DecryptionError as exc:
        return unauthenticated_marker(str(exc))


def _grants(value: Any) -> list[str]:
    """Grant ids anywhere in a result: proof that each activity held its own credential."""
    found: list[str] = []
    if isinstance(value, dict):
        # "grant": the activity's credential; "grants": one per read of a catalog walk.
        held = [value.get("grant"), *(value.get("grants") if isinstance(value.get("grants"), list) else [])]
        for grant in held:
            if isinstance(grant, dict) and "grant_id" in grant:
                found.append(f"grant {grant['grant_id']} {grant.get('scope', '')} "
                             f"until {str(grant.get('expires_at', ''))[11:19]}")
        for key, inner in value.items():
            if key not in ("grant", "grants"):
                found += _grants(inner)
    elif isinstance(value, list):
        for inner in value:
            found += _grants(inner)
    return list(dict.fromkeys(found))


class HistoryRow(NamedTuple):
    event_id: int
    time: str  # ISO 8601, UTC
    kind: str
    detail: str


def _approval_words(body: dict[str, Any]) -> str:
    """What an approval or rejection said, e.g. ` from alice: approve s1; comment "scale only"`."""
    words = f" from {body['approver']}" if body.get("approver") else ""
    if body.get("decision"):
        words += f": {body['decision']}" + (f" {', '.join(map(str, body['steps']))}" if body.get("steps") else "")
    if body.get("comment"):
        label = "reason" if body.get("decision") == "reject" else "comment"
        words += f"; {label} \"{' '.join(str(body['comment']).split())[:300]}\""
    return words


async def _failure_message(failure: Any, converter: DataConverter) -> str:
    """A failure's message, decoded when the codec encoded it (only with --encrypt)."""
    if converter.payload_codec:
        await converter.payload_codec.decode_failure(failure)
    message = failure.message
    if failure.HasField("encoded_attributes"):
        # decode_failure above already ran the codec over it: read it as JSON, not through the codec twice.
        try:
            decoded = json.loads(failure.encoded_attributes.data) if failure.encoded_attributes.data else None
        except ValueError:
            decoded = None
        message = decoded.get("message", message) if isinstance(decoded, dict) else message
    return str(message)


async def _memo_words(fields: Any, converter: DataConverter) -> str:
    """What the workflow wrote to its memo: what it waits for, or the status approvers read without a worker."""
    from firebreak.incidents import MEMO_KEY, WAITING_KEY

    words: list[str] = []
    if WAITING_KEY in fields:
        [waiting] = await decode_json([fields[WAITING_KEY]], converter)
        words.append(f"memo: waiting for {waiting}")
    if MEMO_KEY in fields:
        [memo] = await decode_json([fields[MEMO_KEY]], converter)
        phase = memo.get("phase") if isinstance(memo, dict) else None
        words.append(f"memo: status ({phase}), readable without a worker")
    return "; ".join(words)


# Rows only Temporal and the SDK need: patch markers, activity starts, memo writes (what `list` and
# `status` read), updates admitted before being accepted. `history --all` shows them.
_INTERNAL = frozenset({"marker_recorded", "activity_task_started", "workflow_properties_modified",
                       "workflow_execution_update_admitted"})
_ENDED = {"ACTIVITY_TASK_COMPLETED": "activity_task_completed_event_attributes",
          "ACTIVITY_TASK_FAILED": "activity_task_failed_event_attributes",
          "ACTIVITY_TASK_TIMED_OUT": "activity_task_timed_out_event_attributes",
          "ACTIVITY_TASK_CANCELED": "activity_task_canceled_event_attributes"}
_SDK_ATTRIBUTE = "TemporalChangeVersion"  # the SDK's record of `workflow.patched`


async def history_rows(history: WorkflowHistory, converter: DataConverter, *,
                       everything: bool = True) -> list[HistoryRow]:
    """Every event's row in event order; ``everything=False``: what an operator reads, in time order.

    The operator's view leaves out the SDK's bookkeeping (:data:`_INTERNAL`, patch versions) and an
    activity's "scheduled" row once its ending row (which repeats what it was) is there.
    """
    rows = await _all_rows(history, converter)
    if everything:
        return rows
    ended: set[int] = set()
    for event in history.events:
        attrs = _ENDED.get(EventType.Name(event.event_type).removeprefix("EVENT_TYPE_"))
        if attrs:
            ended.add(getattr(event, attrs).scheduled_event_id)
    shown: list[HistoryRow] = []
    for row in rows:
        if row.kind in _INTERNAL or (row.kind == "activity_task_scheduled" and row.event_id in ended):
            continue
        if row.kind == "upsert_workflow_search_attributes":
            detail = ", ".join(part for part in row.detail.split(", ") if not part.startswith(_SDK_ATTRIBUTE))
            if not detail:
                continue
            row = row._replace(detail=detail)
        shown.append(row)
    # Signals and updates are written when their workflow task ends, so event order is not time order.
    return sorted(shown, key=lambda r: (r.time, r.event_id))


async def _all_rows(history: WorkflowHistory, converter: DataConverter) -> list[HistoryRow]:
    rows: list[HistoryRow] = []
    scheduled: dict[int, str] = {}
    for event in history.events:
        kind = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")
        if kind.startswith("WORKFLOW_TASK"):
            continue  # bookkeeping, not part of the story
        summary = ""
        if event.HasField("user_metadata") and event.user_metadata.HasField("summary"):
            decoded = await decode_json([event.user_metadata.summary], converter)
            summary = str(decoded[0] or "")
        detail = summary
        if kind == "ACTIVITY_TASK_SCHEDULED":
            scheduled[event.event_id] = summary or event.activity_task_scheduled_event_attributes.activity_type.name
        elif kind == "ACTIVITY_TASK_COMPLETED":
            attrs = event.activity_task_completed_event_attributes
            result = await decode_json(list(attrs.result.payloads), converter)
            detail = "; ".join([scheduled.get(attrs.scheduled_event_id, "")] + _grants(result))
        elif kind == "ACTIVITY_TASK_FAILED":
            attrs = event.activity_task_failed_event_attributes
            detail = f"{scheduled.get(attrs.scheduled_event_id, '')}: {await _failure_message(attrs.failure, converter)}"
        elif kind == "WORKFLOW_EXECUTION_SIGNALED":
            attrs = event.workflow_execution_signaled_event_attributes
            args = await decode_json(list(attrs.input.payloads), converter)
            body = args[0] if args and isinstance(args[0], dict) else {}
            detail = f"signal {attrs.signal_name}" + _approval_words(body)
            if isinstance(body.get("alerts"), list):
                statuses = [a.get("status", "?") for a in body["alerts"] if isinstance(a, dict)]
                detail += ": " + ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))
            receipt = body.get("receipt")
            if isinstance(receipt, dict) and receipt.get("signer") not in (None, "intake", receipt.get("requested_by")):
                # Only an AI agent's receipt (firebreak mcp) names someone other than its signer: its owner.
                detail += f" (raised for {receipt.get('requested_by')} by agent {receipt.get('signer')})"
        elif kind == "WORKFLOW_EXECUTION_UPDATE_ACCEPTED":
            attrs = event.workflow_execution_update_accepted_event_attributes
            args = await decode_json(list(attrs.accepted_request.input.args.payloads), converter)
            body = args[0] if args and isinstance(args[0], dict) else {}
            detail = f"update {attrs.accepted_request.input.name}" + _approval_words(body)
        elif kind == "WORKFLOW_EXECUTION_UPDATE_COMPLETED":
            attrs = event.workflow_execution_update_completed_event_attributes
            if attrs.outcome.HasField("failure"):
                # A refused approval fails its update ("refused: REASON").
                message = await _failure_message(attrs.outcome.failure, converter)
                detail = f"REFUSED: {message.removeprefix('refused: ')}"
            else:
                out = await decode_json(list(attrs.outcome.success.payloads), converter)
                if out and isinstance(out[0], dict):
                    reason = out[0].get("reason", "")
                    if out[0].get("counted"):
                        detail = "counted" + (f": {reason}" if reason and reason != "counted" else "")
                    else:
                        detail = f"REFUSED: {reason}"
        elif kind == "UPSERT_WORKFLOW_SEARCH_ATTRIBUTES":
            fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
            detail = ", ".join(f"{k}={json.loads(v.data)}" for k, v in fields.items())
        elif kind == "TIMER_STARTED":
            attrs = event.timer_started_event_attributes
            detail = f"{summary or 'timer'} in {attrs.start_to_fire_timeout.ToTimedelta()}"
        elif kind == "WORKFLOW_EXECUTION_COMPLETED":
            result = await decode_json(list(event.workflow_execution_completed_event_attributes.result.payloads), converter)
            if result and isinstance(result[0], dict):
                detail = f"{result[0].get('phase')}: {result[0].get('outcome')}"
        elif kind == "WORKFLOW_PROPERTIES_MODIFIED":
            detail = await _memo_words(event.workflow_properties_modified_event_attributes.upserted_memo.fields,
                                       converter)
        elif kind == "WORKFLOW_EXECUTION_FAILED":
            # An ending that needs a human: "failed: ...", "expired: ...", "rollback_failed: ...".
            detail = await _failure_message(event.workflow_execution_failed_event_attributes.failure, converter)
        at = event.event_time.ToDatetime().isoformat(timespec="milliseconds") + "Z"
        rows.append(HistoryRow(event.event_id, at, kind.lower(), detail))
    return rows
