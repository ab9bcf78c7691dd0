"""The `firebreak` command. Exit codes: 0 success, 1 refused or failed, 2 bad usage."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from firebreak.config import Settings, load_settings
from firebreak.runbook import RunbookError, json_schema, load_runbook

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
    "stuck": {
        "service": "payments", "fault": "stuck", "alertname": "ServiceStuck", "severity": "critical",
        "shows": 'sum(rate(http_requests_total{namespace="shop",service="payments"}[15s])) == 0',
        "summary": "payments serves no requests",
    },
}


class Refused(Exception):
    """An operation that was refused or failed: exit code 1."""


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "state_dir", None))


def _print(*lines: str) -> None:
    print("\n".join(lines), flush=True)


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
    response = httpx.post(f"{settings.targets['fleet']}/demo/faults", json={"service": sample["service"], "kind": sample["fault"]},
                          headers={"Authorization": f"Bearer {chaos}"}, timeout=10)
    if response.status_code >= 400:
        raise Refused(f"the demo fleet refused the fault: HTTP {response.status_code} {response.text[:200]}")
    print(f"injected {sample['fault']} into {sample['service']}", file=sys.stderr)
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
    from firebreak.contracts import Alert
    from firebreak.intake import deliver_routed, route_alerts
    from firebreak.runbook import load_runbooks
    from firebreak.temporal import connect

    settings = _settings(args)
    if args.sample:
        raw: Any = [_sample_alert(args.sample, settings)]
    else:
        raw = json.loads(Path(args.file).read_text())
    raw = raw if isinstance(raw, list) else [raw]
    alerts = [Alert.model_validate(item) for item in raw]
    routing = route_alerts(load_runbooks(settings.resolved_runbooks_dir()), alerts)
    for item in routing.unrouted:
        print(f"unrouted: {item.alert.name}: {item.reason}", file=sys.stderr)
    for item in routing.refused:
        print(f"refused: {item.alert.name}: {item.field}: {item.reason}", file=sys.stderr)
    if not routing.routed:
        raise Refused("no alert was routed to a runbook")
    client = await connect(settings.temporal)
    requested_by = args.as_ or (_demo_requester(settings) if args.sample else None)
    receipt = _receipt_signer(settings, requested_by)
    for group in routing.routed:
        await deliver_routed(client, group, task_queue=settings.temporal.task_queue, requested_by=requested_by,
                             receipt=receipt)
        print(f"{group.runbook.name}: {len(group.alerts)} alert(s) -> incident", file=sys.stderr)
    for group in routing.routed:
        print(group.incident_id)
    return 0 if not routing.refused else 1


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


# -- status / history ----------------------------------------------------------


async def _status(args: argparse.Namespace) -> int:
    from firebreak.contracts import IncidentStatus
    from firebreak.temporal import connect

    client = await connect(_settings(args).temporal)
    status = await client.get_workflow_handle(args.id).query("status", result_type=IncidentStatus)
    if args.json:
        print(json.dumps({
            "incident_id": status.incident_id,
            "phase": status.phase.value,
            "runbook": status.runbook,
            "service": status.service,
            "hypotheses": [h.model_dump(mode="json") for h in status.hypotheses],
            "gaps": status.gaps,
            "plan": {"hash": status.plan_hash, "steps": [s.model_dump(mode="json") for s in status.plan.steps]}
            if status.plan else None,
            "approvals": [{"approver": a.approver, "decision": a.decision, "counted": a.counted, "reason": a.reason}
                          for a in status.approvals],
            "needed": [n.model_dump(mode="json") | {"met": n.met} for n in status.needed],
            "escalates_at": status.escalates_at.isoformat() if status.escalates_at else None,
            "expires_at": status.expires_at.isoformat() if status.expires_at else None,
            "steps": [s.model_dump(mode="json") for s in status.steps],
            "outcome": status.outcome,
        }, indent=2))
        return 0
    from workflows.summary import plan_markdown

    print(plan_markdown(status))
    return 0


async def _history(args: argparse.Namespace) -> int:
    from firebreak.history import history_rows
    from firebreak.temporal import connect

    settings = _settings(args)
    client = await connect(settings.temporal)
    history = await client.get_workflow_handle(args.id).fetch_history()
    rows = await history_rows(history, client.data_converter)
    width = max((len(r[2]) for r in rows), default=10)
    for event_id, at, kind, detail in rows:
        print(f"{event_id:>4}  {at}  {kind:<{width}}  {detail}")
    return 0


# -- approvals -----------------------------------------------------------------


def _key_path(args: argparse.Namespace, settings: Settings) -> Path:
    if args.key:
        return Path(args.key)
    if args.as_:
        path = settings.state_dir / "keys" / f"{args.as_}.pem"
        if not path.exists():
            raise Refused(f"no key for {args.as_} at {path}; use --key PATH")
        return path
    raise Refused("say who you are: --key PATH (or --as NAME for a demo person)")


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
    from firebreak.incidents import read_status
    from firebreak.temporal import connect

    client = await connect(settings.temporal)
    status, source = await read_status(client.get_workflow_handle(incident_id))
    return status, f"{source}, Temporal at {settings.temporal.address}"


def _stack_value(settings: Settings, key: str) -> str | None:
    if settings.stack_file.exists():
        return json.loads(settings.stack_file.read_text()).get("demo", {}).get(key)
    return None


def _approval_window(settings: Settings, runbook: str) -> timedelta:
    """The longest an approval may be valid: the runbook's approval window (2 h if unknown here)."""
    from firebreak.runbook import load_runbooks, parse_duration

    try:
        books = {b.name: b for b in load_runbooks(settings.resolved_runbooks_dir())}
    except (RunbookError, OSError):
        books = {}
    book = books.get(runbook)
    return parse_duration(book.remediate.windows.expire_after) if book else timedelta(hours=2)


async def _submit(settings: Settings, incident_id: str, signed: Any) -> Any:
    """Through the API, authenticated by the signature alone; straight to Temporal if the API is down."""
    import httpx

    from firebreak.contracts import ApprovalOutcome

    try:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(f"{settings.api_url}/v1/incidents/{incident_id}/approvals",
                                       json=signed.model_dump(mode="json"))
    except httpx.HTTPError:
        response = None
    if response is not None:
        if response.status_code in (200, 409) and "counted" in response.text:
            return ApprovalOutcome.model_validate(response.json())
        if response.status_code == 202:
            return None  # queued as a signal: no worker answered
        if response.status_code != 503:
            try:
                why = response.json().get("error") or response.text[:200]
            except ValueError:
                why = response.text[:200]
            raise Refused(f"the API refused it: HTTP {response.status_code}: {why}")
    from temporalio.client import WorkflowUpdateFailedError

    from firebreak.incidents import submit_approval
    from firebreak.temporal import connect

    print(f"note: the API at {settings.api_url} is unreachable; sending to Temporal directly", file=sys.stderr)
    client = await connect(settings.temporal)
    try:
        return await submit_approval(client.get_workflow_handle(incident_id), signed)
    except WorkflowUpdateFailedError as exc:
        raise Refused(f"refused: {exc.cause.message if exc.cause else exc}") from None


async def _decide(args: argparse.Namespace, decision: str) -> int:
    from firebreak import signing
    from firebreak.contracts import Approval
    from firebreak.plan_view import render_plan
    from firebreak.roster import Roster

    settings = _settings(args)
    key_path = _key_path(args, settings)
    key = signing.load_private_key(key_path)
    roster = Roster.load(settings.resolved_roster())
    public = signing.public_pem(key).strip()
    person = next((p for p in roster.people if p.public_key.strip() == public), None)
    approver = person.name if person else (args.as_ or key_path.stem)
    status, source = await _incident_status(settings, args.id)
    plan = status.plan
    if plan is None or status.plan_hash is None:
        raise Refused(f"{args.id} has no plan to decide on (phase {status.phase.value})")
    window = _approval_window(settings, plan.runbook)
    valid_for = timedelta(minutes=args.valid_for)
    if not timedelta(0) < valid_for <= window:
        raise Refused(f"--valid-for must be between 1 and {int(window.total_seconds() // 60)} minutes "
                      f"(the runbook's approval window)")
    # What you see is what you sign: render every field, hash what was rendered, sign that.
    shown_hash = plan.hash
    _print(f"Incident {args.id} ({status.phase.value}), from {source}",
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
    outcome = await _submit(settings, args.id, signing.sign_approval(approval, key))
    if outcome is None:
        _print(f"{decision} by {approver} recorded: no worker is answering right now (is it down?); it will be "
               "judged as soon as a worker picks the incident up. Follow it with `firebreak status`.")
        return 0
    if outcome.held:
        _print(f"note: the incident is held: {outcome.held}")
    if not outcome.counted:
        raise Refused(f"{decision} by {approver} refused: {outcome.reason}")
    if outcome.decided:
        nxt = "rejected: nothing will execute" if decision == "reject" else "approved: executing now"
    else:
        nxt = "still waiting for " + "; ".join(outcome.waiting_for)
    _print(f"{decision} by {approver} counted; {nxt}")
    return 0


# -- runbooks ------------------------------------------------------------------


def cmd_runbook(args: argparse.Namespace) -> int:
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
    return lambda args: asyncio.run(fn(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firebreak", description="Remediation runbooks as durable Temporal workflows.")
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

    p = sub.add_parser("status", parents=[common], help="an incident's status")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_async(_status))

    p = sub.add_parser("history", parents=[common], help="an incident's events as a table")
    p.add_argument("id")
    p.set_defaults(func=_async(_history))

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
        p.set_defaults(func=_async(lambda args, d=decision: _decide(args, d)))

    p = sub.add_parser("runbook", help="check runbooks or print their JSON Schema")
    rsub = p.add_subparsers(dest="runbook_command", required=True)
    c = rsub.add_parser("check")
    c.add_argument("paths", nargs="+")
    rsub.add_parser("schema")
    p.set_defaults(func=cmd_runbook)

    from firebreak.api.cli import register as register_api
    from firebreak.broker.cli import register as register_broker
    from firebreak.privileges_cli import register as register_privileges

    register_broker(sub, load_settings)
    register_privileges(sub, load_settings)
    register_api(sub, load_settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Refused as exc:
        print(f"firebreak: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI says what failed, without a traceback
        from temporalio.service import RPCError

        if isinstance(exc, RPCError):
            print(f"firebreak: Temporal: {exc.message}", file=sys.stderr)
            return 1
        print(f"firebreak: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
