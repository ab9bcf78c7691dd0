"""The `firebreak` command. Exit codes: 0 success, 1 refused or failed, 2 bad usage.

The console script is :func:`entry`: it runs :func:`main`, flushes, and leaves with ``os._exit`` so
that the Temporal client's runtime is never finalized by the interpreter. Without that, about one
run in eight aborted at exit with code 134 (``PyGILState_Release ... finalizing``, sdk-python#300).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from firebreak import cli_incidents
from firebreak.cli_common import Refused, Usage, client, out, settings_of, stack_value, temporal_down

# Light on purpose: `firebreak --version` imports this module and nothing heavy. Settings (pydantic),
# runbooks, asyncio and the Temporal SDK are imported by the commands that use them (issue 26).
if TYPE_CHECKING:
    from firebreak.config import Settings

SAMPLES: dict[str, dict[str, Any]] = {
    "bad-deploy": {
        "service": "checkout", "fault": "bad_deploy", "alertname": "HighErrorRate", "severity": "critical",
        "shows": 'sum(rate(http_requests_total{namespace="shop",service="checkout",code=~"5.."}[1m])) / '
                 'sum(rate(http_requests_total{namespace="shop",service="checkout"}[1m])) > 0.05',
        "summary": "checkout 5xx error ratio above 5%",
    },
    "saturation": {
        "service": "inventory", "fault": "saturation", "alertname": "HighCPUSaturation", "severity": "warning",
        "shows": 'service_cpu_utilization{namespace="shop",service="inventory"} > 0.8',
        "summary": "inventory CPU above 80%",
    },
    # payments fails (a bad deploy its callers cannot absorb); the alert comes from checkout's side.
    "dependency": {
        "service": "checkout", "fault": "dependency", "fault_service": "payments", "alertname": "HighErrorRate",
        "severity": "critical",
        "shows": 'sum(rate(http_requests_total{namespace="shop",service="checkout",code=~"5.."}[1m])) / '
                 'sum(rate(http_requests_total{namespace="shop",service="checkout"}[1m])) > 0.05',
        "summary": "checkout 5xx error ratio above 5%",
    },
    "stuck": {
        "service": "payments", "fault": "stuck", "alertname": "ServiceStuck", "severity": "critical",
        "shows": 'sum(rate(http_requests_total{namespace="shop",service="payments"}[15s])) == 0',
        "summary": "payments serves no requests",
    },
}


__all__ = ["Refused", "Usage", "build_parser", "entry", "main"]
_settings = settings_of
_print = out


# -- up / down -----------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from firebreak import stack

    settings = _settings(args)
    info = stack.up(settings.state_dir, with_prometheus=not args.no_prometheus, encrypt=args.encrypt)
    c = info["components"]
    _print(
        "Firebreak is up.",
        f"  Temporal      {c['temporal']}",
        f"  Temporal UI   {c['ui']}   <- watch incidents here",
        f"  intake API    {c['api']}",
        f"  broker        {c['broker']}",
        f"  demo fleet    {c['fleet']}",
        f"  Prometheus    {c['prometheus'] or 'not installed'}",
        f"  Alertmanager  {c['alertmanager'] or 'not installed'}",
        f"  security      {c['security_receiver']} (the agent's own misuse alerts; tickets in "
        f"{info['demo']['security_tickets']})",
        f"  state         {settings.state_dir} (stack.json, logs/, keys/, tickets/)",
        f"  demo people   alice, bob (on call), carol (SRE lead); keys in {settings.state_dir / 'keys'}",
        *([f"  codec         {c['codec']} (payloads encrypted; decode with "
           f"--codec-endpoint {c['codec']} --codec-auth \"Bearer $(cat {info['demo']['codec_token_file']})\")"]
          if c.get("codec") else []),
        *[f"  note: {note}" for note in info.get("notes", [])],
        "Try:  firebreak alert --sample bad-deploy",
    )
    if args.detach:
        return 0
    _print("Running; Ctrl-C stops everything.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stack.down(settings.state_dir)
        _print("stopped")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from firebreak import stack

    stopped = stack.down(_settings(args).state_dir)
    _print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


# -- alerts --------------------------------------------------------------------


def _sample_alert(name: str, settings: Settings) -> dict[str, Any]:
    """Inject the sample's fault into the demo fleet, wait until the metrics show it."""
    import httpx

    sample = SAMPLES[name]
    info = json.loads(settings.stack_file.read_text()) if settings.stack_file.exists() else {}
    chaos = info.get("demo", {}).get("chaos_token")
    if not chaos:
        raise Refused("samples need the embedded stack: run `firebreak up` first")
    prometheus = settings.targets.get("prometheus")
    if info.get("components", {}).get("prometheus"):
        _wait_for_history(prometheus)
    faulty = sample.get("fault_service", sample["service"])
    response = httpx.post(f"{settings.targets['fleet']}/demo/faults", json={"service": faulty, "kind": sample["fault"]},
                          headers={"Authorization": f"Bearer {chaos}"}, timeout=10)
    if response.status_code >= 400:
        raise Refused(f"the demo fleet refused the fault: HTTP {response.status_code} {response.text[:200]}")
    print(f"injected {sample['fault']} into {faulty}", file=sys.stderr)
    if info.get("components", {}).get("prometheus"):
        _wait_for_query(prometheus, sample["shows"], timeout=90)
        print("the fault shows in the metrics", file=sys.stderr)
    now = datetime.now(timezone.utc)
    return {
        "source": "cli",
        "fingerprint": f"sample-{name}-{sample['service']}",
        "status": "firing",
        "labels": {"alertname": sample["alertname"], "namespace": "shop", "service": sample["service"],
                   "severity": sample["severity"]},
        "annotations": {"summary": sample["summary"], "description": f"firebreak alert --sample {name}"},
        "starts_at": now.isoformat(),
    }


def _wait_for_history(prometheus: str, seconds: int = 15) -> None:
    """A before/after comparison needs some history from before the fault (scrapes are 1 s apart)."""
    _poll_prometheus(prometheus, f"min(count_over_time(up[1m])) >= {seconds}", timeout=60)


def _wait_for_query(prometheus: str, query: str, timeout: float) -> None:
    if not _poll_prometheus(prometheus, query, timeout):
        raise Refused(f"the fault did not show in Prometheus within {timeout:.0f}s: {query}")


def _poll_prometheus(prometheus: str, query: str, timeout: float) -> bool:
    """True once the query returns any series, False at the timeout."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=5).json()["data"]["result"]:
                return True
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(1)
    return False


async def _alert(args: argparse.Namespace) -> int:
    from firebreak.intake import deliver_routed, route_alerts
    from firebreak.runbook import load_runbooks

    settings = _settings(args)
    if args.sample:
        raw: Any = [_sample_alert(args.sample, settings)]
    else:
        raw = _read_alert_file(Path(args.file))
    raw = raw if isinstance(raw, list) else [raw]
    alerts = _parse_alerts(args.file or "sample", raw)
    routing = route_alerts(load_runbooks(settings.resolved_runbooks_dir()), alerts)
    for item in routing.unrouted:
        print(f"unrouted: {item.alert.name}: {item.reason}", file=sys.stderr)
    for item in routing.refused:
        print(f"refused: {item.alert.name}: {item.field}: {item.reason}", file=sys.stderr)
    if not routing.routed:
        raise Refused("no alert was routed to a runbook")
    temporal = await client(settings)
    requested_by = args.as_ or (_demo_requester(settings) if args.sample else None)
    receipt = _receipt_signer(settings, requested_by)
    for group in routing.routed:
        await deliver_routed(temporal, group, task_queue=settings.temporal.task_queue, requested_by=requested_by,
                             receipt=receipt)
        print(f"{group.runbook.name}: {len(group.alerts)} alert(s) -> incident", file=sys.stderr)
    for group in routing.routed:
        print(group.incident_id)
    return 0 if not routing.refused else 1


def _read_alert_file(path: Path) -> Any:
    """The file's JSON, or a short usage error (exit 2) naming what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise Usage(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise Usage(f"{path}: not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Usage(f"{path}: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _parse_alerts(source: str, raw: list[Any]) -> list[Any]:
    """Alerts in Firebreak's format; the first bad field is named, e.g. `[0].labels.alertname`."""
    from pydantic import ValidationError

    from firebreak.contracts import Alert

    alerts = []
    for index, item in enumerate(raw):
        try:
            alerts.append(Alert.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in first["loc"])
            raise Usage(f"{source}: alert [{index}]{where}: {first['msg']}") from None
    return alerts


def _receipt_signer(settings: Settings, requested_by: str | None) -> Any:
    """Who raised it, signed: the person with their own key, else this host's intake key.

    Without a receipt the broker will authorize no write for the incident, so say so.
    """
    from firebreak import receipts, signing

    if requested_by:
        path = settings.state_dir / "keys" / f"{requested_by}.pem"
        if not path.exists():
            raise Refused(f"{requested_by} must sign what they raise: no key at {path}")
        return receipts.person_signer(requested_by, signing.load_private_key(path))
    if receipts.intake_key_path(settings.state_dir).exists():
        return receipts.intake_signer(receipts.ensure_intake_key(settings.state_dir))
    print("warning: no requester key and no intake key here: the incident can propose but never execute "
          "(send alerts through `firebreak api`, or use --as NAME)", file=sys.stderr)
    return None


def _demo_requester(settings: Settings) -> str | None:
    if settings.stack_file.exists():
        return json.loads(settings.stack_file.read_text()).get("demo", {}).get("requested_by")
    return None


# -- approvals -----------------------------------------------------------------


def _key_path(args: argparse.Namespace, settings: Settings) -> Path:
    if args.key:
        return Path(args.key)
    if args.as_:
        path = settings.state_dir / "keys" / f"{args.as_}.pem"
        if not path.exists():
            raise Refused(f"no key for {args.as_} at {path}; use --key PATH")
        return path
    raise Usage("say who you are: --key PATH (or --as NAME for a demo person)")


async def _incident_status(settings: Settings, incident_id: str) -> tuple[Any, str]:
    """The incident's status from the API (no Temporal access needed), else from Temporal itself."""
    import httpx

    from firebreak.contracts import IncidentStatus

    token = settings.intake_token or _stack_value(settings, "intake_token")
    if token:
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                response = await http.get(f"{settings.api_url}/v1/incidents/{incident_id}",
                                          headers={"Authorization": f"Bearer {token}"})
            if response.status_code == 200:
                via = response.headers.get("x-firebreak-source", "the workflow")
                return IncidentStatus.model_validate(response.json()), f"{via}, through the API at {settings.api_url}"
            if response.status_code == 404:
                raise Refused(f"no incident {incident_id!r}")
        except httpx.HTTPError:
            pass
    from firebreak.cli_common import reading_incident
    from firebreak.incidents import read_status

    temporal = await client(settings)
    with reading_incident(incident_id):
        status, source = await read_status(temporal.get_workflow_handle(incident_id), settings.worker_wait)
    return status, f"{source}, Temporal at {settings.temporal.address}"


_stack_value = stack_value


def _approval_window(settings: Settings, runbook: str) -> timedelta:
    """The longest an approval may be valid: the runbook's approval window (2 h if unknown here)."""
    from firebreak.runbook import RunbookError, load_runbooks, parse_duration

    try:
        books = {b.name: b for b in load_runbooks(settings.resolved_runbooks_dir())}
    except (RunbookError, OSError):
        books = {}
    book = books.get(runbook)
    return parse_duration(book.remediate.windows.expire_after) if book else timedelta(hours=2)


class OutcomeUnknown(Exception):
    """The approval may have reached the incident, and no answer said whether it counted."""

    def __init__(self, why: str, detail: str = "") -> None:
        super().__init__(why)
        self.detail = detail  # the answer in full, for the note


def _note(line: str) -> None:
    print(f"note: {line}", file=sys.stderr)


def _error_text(response: Any) -> str:
    """An API error answer's message, on one line."""
    try:
        why = response.json().get("error") or response.text
    except ValueError:
        why = response.text
    return " ".join(str(why).split())[:300]


async def _submit(settings: Settings, incident_id: str, signed: Any) -> Any:
    """Through the API, authenticated by the signature alone; straight to Temporal if the API is not there.

    The workflow's outcome, or None when it was queued as a signal (no worker answered). Raises
    OutcomeUnknown when the approval may have reached the incident with no answer saying whether it
    counted: the caller looks it up before saying anything. "Unreachable" is said only when nothing
    was sent; an API that answered 503 is named as such.
    """
    import httpx

    from firebreak.contracts import ApprovalOutcome

    try:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(f"{settings.api_url}/v1/incidents/{incident_id}/approvals",
                                       json=signed.model_dump(mode="json"))
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent
        not_via_api = f"the API at {settings.api_url} is unreachable ({type(exc).__name__})"
    except httpx.HTTPError as exc:  # sent, and no answer came back
        raise OutcomeUnknown(f"the API at {settings.api_url} took it and gave no answer ({type(exc).__name__})") \
            from None
    else:
        if response.status_code in (200, 409) and "counted" in response.text:
            return ApprovalOutcome.model_validate(response.json())
        if response.status_code == 202:
            return None  # queued as a signal: no worker answered
        why = _error_text(response)
        if response.status_code == 404:  # closed since its status was read
            raise Refused(why)
        if response.status_code != 503:
            raise Refused(f"the API refused it: HTTP {response.status_code}: {why}")
        if response.headers.get("x-firebreak-delivery") != "none":
            # "unknown", or an API too old to say: Temporal may have recorded it.
            raise OutcomeUnknown("the API answered 503 while delivering it", f"the API answered 503: {why}")
        not_via_api = "the API answered 503 (it could not reach Temporal; nothing was delivered)"
    _note(f"{not_via_api}; sending to Temporal directly")
    from temporalio.client import WorkflowUpdateFailedError

    from firebreak.cli_common import not_found
    from firebreak.incidents import submit_approval

    try:
        temporal = await client(settings)
    except Refused as exc:
        raise Refused(f"not delivered: {not_via_api}, and {exc}") from None
    sent: list[bool] = []
    try:
        return await submit_approval(temporal.get_workflow_handle(incident_id), signed, settings.worker_wait,
                                     sending=lambda: sent.append(True))
    except WorkflowUpdateFailedError as exc:
        raise Refused(f"refused: {exc.cause.message if exc.cause else exc}") from None
    except Exception as exc:  # whatever failed: sent or not decides what may be said
        from firebreak.api.gateway import is_unavailable
        from firebreak.incidents import WorkerDown

        if not_found(exc):
            raise Refused(f"no incident {incident_id!r}") from None
        if isinstance(exc, WorkerDown):  # nothing was sent: no worker, and nothing proposed to approve
            raise Refused(str(exc)) from None
        if not is_unavailable(exc):
            raise  # a definite answer from Temporal: said as it is
        if sent:
            raise OutcomeUnknown(f"Temporal at {settings.temporal.address} stopped answering while the approval "
                                 f"was being delivered ({type(exc).__name__})") from None
        raise Refused(f"not delivered: {not_via_api}, and Temporal at {settings.temporal.address} did not answer "
                      f"({type(exc).__name__}): run `firebreak up`") from None


def _counted_record(status: Any, approver: str, decision: str) -> Any:
    """This approver's counted approval (or rejection) of the plan the incident holds now, if any."""
    return next((a for a in status.approvals if a.approver == approver and a.decision == decision and a.counted
                 and a.plan_hash == status.plan_hash), None)


def _record_words(record: Any) -> str:
    steps = f" (steps {', '.join(record.steps)})" if record.steps else ""
    return f"received {record.received_at:%H:%M:%S} UTC via {record.via}{steps}"


def _now_words(decision: str, status: Any) -> str:
    """What happens next, read from the incident itself: held and closed say so."""
    if status.phase.closed:
        return f"the incident is closed: {status.phase.value}" + (f" ({status.outcome})" if status.outcome else "")
    if status.held:
        return _held_words(status.held)
    waiting = [f"{n.step}: {n.approvers - len(n.approved_by)} more from {', '.join(n.groups)}"
               for n in status.needed if not n.met]
    if decision == "approve" and waiting and status.phase.value == "awaiting_approval":
        return "still waiting for " + "; ".join(waiting)
    return f"phase {status.phase.value}"


def _held_words(held: str) -> str:
    return ("held: nothing executes until credentials are thawed (`firebreak creds thaw`): "
            + held.removeprefix("held: "))


def _outcome_words(decision: str, outcome: Any) -> str:
    """What a counted approval leads to. Held: nothing claims execution before the thaw."""
    if decision == "reject" and outcome.decided:
        return "rejected: nothing will execute"
    held = _held_words(outcome.held) if outcome.held else ""
    if outcome.decided:
        return f"approved, but {held}" if held else "approved: executing now"
    waiting = "still waiting for " + "; ".join(outcome.waiting_for)
    return f"{waiting}; {held}" if held else waiting


async def _settle_unknown(settings: Settings, incident_id: str, decision: str, approver: str, why: str,
                          detail: str = "") -> None:
    """An approval whose outcome is unknown, looked up before anything is said about it.

    Counted: say so (exit 0). Otherwise the outcome stays unknown, and the answer says how to check.
    """
    _note(f"{detail or why}; looking the approval up in the incident")
    retry = (f"check with `firebreak status {incident_id}`; running this `firebreak {decision}` again is safe: it "
             "says so if yours already counted")
    try:
        status, source = await _incident_status(settings, incident_id)
    except Exception as exc:  # noqa: BLE001 - down, or not answering: the lookup says so, nothing more
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise Refused(f"{decision} by {approver}: outcome unknown ({why}), and the incident could not be read: "
                      f"{reason}. It may have counted. Once Temporal answers again, {retry}.") from None
    record = _counted_record(status, approver, decision)
    if record is None:
        raise Refused(f"{decision} by {approver}: outcome unknown ({why}): the incident ({source}) shows no counted "
                      f"{decision} by {approver} yet, and it may still be judged; {retry}.")
    _print(f"{decision} by {approver} counted ({_record_words(record)}; confirmed from {source}); "
           f"{_now_words(decision, status)}")


async def _decide(args: argparse.Namespace, decision: str) -> int:
    import secrets

    from firebreak import signing
    from firebreak.cli_common import load_key
    from firebreak.contracts import Approval
    from firebreak.plan_view import render_plan
    from firebreak.roster import Roster

    settings = _settings(args)
    key_path = _key_path(args, settings)
    key = load_key(key_path)
    roster = Roster.load(settings.resolved_roster())
    public = signing.public_pem(key).strip()
    person = next((p for p in roster.people if p.public_key.strip() == public), None)
    approver = person.name if person else (args.as_ or key_path.stem)
    status, source = await _incident_status(settings, args.id)
    # A retry of what already counted: say so, sign nothing (one person counts once).
    prior = _counted_record(status, approver, decision) if status.plan_hash else None
    if prior is not None:
        _print(f"{decision} by {approver} already counted ({_record_words(prior)}); nothing sent. "
               f"{_now_words(decision, status)}")
        return await _maybe_wait(args, settings)
    if status.phase.closed:
        raise Refused(f"{args.id} is closed ({status.phase.value}): nothing to {decision}"
                      + (f"; {status.outcome}" if status.outcome else ""))
    plan = status.plan
    if plan is None or status.plan_hash is None:
        raise Refused(f"{args.id} has no plan to decide on (phase {status.phase.value})")
    window = _approval_window(settings, plan.runbook)
    valid_for = timedelta(minutes=args.valid_for)
    if not timedelta(0) < valid_for <= window:
        raise Usage(f"--valid-for must be between 1 and {int(window.total_seconds() // 60)} minutes "
                    f"(the runbook's approval window)")
    # What you see is what you sign: render every field, hash what was rendered, sign that.
    shown_hash = plan.hash
    _print(f"Incident {args.id} ({status.phase.value}), from {source}",
           *([f"HELD: {_held_words(status.held).removeprefix('held: ')}"] if status.held else []),
           f"Plan (workflow {plan.incident_id}, run {plan.run_id}), every field:", *render_plan(plan),
           f"Plan hash, recomputed here: {shown_hash}")
    if plan.incident_id != args.id:
        raise Refused(f"the plan shown is for {plan.incident_id!r}, not {args.id!r}: refusing to sign")
    if status.plan_hash != shown_hash:
        raise Refused(f"the workflow says the plan hash is {status.plan_hash}, but the plan shown hashes to "
                      f"{shown_hash}: refusing to sign")
    approval = Approval(
        workflow_id=args.id, plan_hash=shown_hash, decision=decision,  # type: ignore[arg-type]
        steps=list(getattr(args, "steps", None) or []), nonce=secrets.token_hex(16),
        expires_at=(datetime.now(timezone.utc) + valid_for).isoformat(timespec="seconds"),
        approver=approver, comment=(args.comment if decision == "approve" else args.reason) or "",
    )
    try:
        outcome = await _submit(settings, args.id, signing.sign_approval(approval, key))
    except OutcomeUnknown as exc:
        await _settle_unknown(settings, args.id, decision, approver, str(exc), exc.detail)
        return await _maybe_wait(args, settings)
    if outcome is None:
        held = f" The incident is {_held_words(status.held)}." if status.held else ""
        _print(f"{decision} by {approver} recorded, not yet counted: no worker is answering right now (down, or too "
               "busy to answer in time); it will be judged as soon as a worker picks the incident up. Follow it "
               f"with `firebreak status {args.id}`.{held}")
    elif not outcome.counted:
        # Refused: maybe because an earlier one of the same person already counted (a retry after a lost answer).
        try:
            again, _ = await _incident_status(settings, args.id)
        except Exception:  # noqa: BLE001 - the refusal stands as answered
            again = None
        prior = _counted_record(again, approver, decision) if again is not None else None
        if prior is None:
            if outcome.held:
                print(f"note: the incident is held: {outcome.held}", file=sys.stderr)
            raise Refused(f"{decision} by {approver} refused: {outcome.reason}")
        _print(f"{decision} by {approver} already counted ({_record_words(prior)}); this one was not needed. "
               f"{_now_words(decision, again)}")
    else:
        _print(f"{decision} by {approver} counted; {_outcome_words(decision, outcome)}")
    return await _maybe_wait(args, settings)


async def _maybe_wait(args: argparse.Namespace, settings: Settings) -> int:
    """--wait: follow the incident to its end, through the API like the approval (Temporal if it is down)."""
    if not getattr(args, "wait", False):
        return 0
    final = await cli_incidents.follow_to_end(lambda: _read_status_only(settings, args.id), args.interval)
    return cli_incidents.exit_code(final)


async def _read_status_only(settings: Settings, incident_id: str) -> Any:
    status, _ = await _incident_status(settings, incident_id)
    return status


# -- runbooks ------------------------------------------------------------------


def cmd_runbook(args: argparse.Namespace) -> int:
    from firebreak.runbook import RunbookError, json_schema, load_runbook

    if args.runbook_command == "schema":
        print(json_schema())
        return 0
    failed = 0
    for path in args.paths:
        try:
            book = load_runbook(path)
            print(f"ok: {path}: {book.name} v{book.version}, {len(book.remediate.actions)} action(s)")
        except RunbookError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
        except OSError as exc:
            print(f"error: {path}: {exc.strerror}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


# -- parser --------------------------------------------------------------------


def _async(fn: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import asyncio  # here: building the parser (and `--version`) needs no event loop

        return asyncio.run(fn(args))  # type: ignore[no-any-return]

    return run


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        mine = version("firebreak")
    except PackageNotFoundError:
        mine = "unknown (not installed)"
    try:
        sdk = version("temporalio")
    except PackageNotFoundError:
        sdk = "?"
    return f"firebreak {mine} (temporalio {sdk})"


# The commands defined here; any other word loads the broker's, the API's and the other extensions'
# commands. Each of those imports a lot (cryptography, FastAPI), and `status` or `list` must start fast.
_CORE = frozenset({"up", "down", "alert", "status", "list", "inbox", "history", "approve", "reject", "runbook"})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command`` (the first word given) lets a core command skip loading the extensions."""
    parser = argparse.ArgumentParser(prog="firebreak", description="Remediation runbooks as durable Temporal workflows.")
    parser.add_argument("--version", action="version", version=_version())
    if command == "--version":
        return parser  # it prints and exits before any command is looked at: load none of them
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=None, help="default: $FIREBREAK_STATE_DIR or ~/.firebreak")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", parents=[common], help="start the embedded stack")
    p.add_argument("--detach", action="store_true", help="return once everything answers")
    p.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus/Alertmanager")
    p.add_argument("--encrypt", action="store_true",
                   help="encrypt payloads (AES-GCM) and start a decode-only codec server for the UI; sticky per state dir")
    p.set_defaults(func=cmd_up)
    sub.add_parser("down", parents=[common], help="stop what `up --detach` started").set_defaults(func=cmd_down)

    p = sub.add_parser("alert", parents=[common], help="send an alert file or a named sample")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="JSON: one alert or a list (firebreak's Alert format)")
    src.add_argument("--sample", choices=sorted(SAMPLES))
    p.add_argument("--as", dest="as_", default=None, help="who raises it (the requester)")
    p.set_defaults(func=_async(_alert))

    cli_incidents.register(sub, common, _async)

    for name, decision in (("approve", "approve"), ("reject", "reject")):
        p = sub.add_parser(name, parents=[common], help=f"{name} an incident's plan, signed with your key")
        p.add_argument("id")
        p.add_argument("--key", default=None, help="your Ed25519 private key (PEM)")
        p.add_argument("--as", dest="as_", default=None, help="demo person: uses STATE_DIR/keys/NAME.pem")
        p.add_argument("--valid-for", type=int, default=15,
                       help="minutes the signature stays valid (default 15, at most the runbook's approval window)")
        if decision == "approve":
            p.add_argument("--steps", nargs="*", help="approve only these step ids")
            p.add_argument("--comment", default="")
        else:
            p.add_argument("--reason", required=True)
        p.add_argument("--wait", action="store_true",
                       help="then follow the incident to its end; exit 0 only if it resolved")
        p.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --wait")
        p.set_defaults(func=_async(lambda args, d=decision: _decide(args, d)))

    p = sub.add_parser("runbook", help="check runbooks or print their JSON Schema")
    rsub = p.add_subparsers(dest="runbook_command", required=True)
    c = rsub.add_parser("check")
    c.add_argument("paths", nargs="+")
    rsub.add_parser("schema")
    p.set_defaults(func=cmd_runbook)

    if command in _CORE:
        return parser
    from firebreak.api.cli import register as register_api
    from firebreak.broker.cli import register as register_broker
    from firebreak.cli_upgrade import register as register_upgrade
    from firebreak.config import load_settings
    from firebreak.privileges_cli import register as register_privileges

    register_broker(sub, load_settings)
    register_privileges(sub, load_settings)
    register_api(sub, load_settings)
    register_upgrade(sub, common, _async)
    from firebreak.mcp.cli import register as register_mcp  # `firebreak mcp` (issue 31)
    register_mcp(sub, common, _async)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. (argparse's own errors raise SystemExit(2), --version SystemExit(0).)"""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(words[0] if words else None)
    args = parser.parse_args(words)
    try:
        return int(args.func(args) or 0)
    except Refused as exc:
        print(f"firebreak: {exc}", file=sys.stderr)
        return 1
    except Usage as exc:
        print(f"firebreak: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0  # `firebreak list | head`: the reader had enough, which is not an error
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI says what failed, without a traceback
        from temporalio.service import RPCError, RPCStatusCode

        from firebreak.config import load_settings

        if isinstance(exc, RPCError):
            if exc.status == RPCStatusCode.UNAVAILABLE:
                print(f"firebreak: {temporal_down(load_settings(getattr(args, 'state_dir', None)))}", file=sys.stderr)
            else:
                print(f"firebreak: Temporal: {' '.join(exc.message.split())[:500]}", file=sys.stderr)
            return 1
        print(f"firebreak: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}", file=sys.stderr)  # one line
        return 1


def entry() -> None:
    """The console script: the command's exit code, and never an abort at exit (sdk-python#300)."""
    try:
        code = main()
    except SystemExit as exc:  # argparse: usage errors (2), --help and --version (0)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    _leave(code)


def _leave(code: int) -> None:
    """Flush what was printed, then exit without finalizing the interpreter.

    The Temporal client's Rust runtime can abort the process while Python finalizes (exit 134);
    ``os._exit`` skips finalization. Nothing is lost: output is flushed here, and no command leaves
    work in the background. A reader that closed the pipe early is not an error.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
