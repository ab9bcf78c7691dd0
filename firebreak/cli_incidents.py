"""`firebreak list`, `inbox`, `status [--watch]` and `history`: the on-call engineer's read commands.

They follow `temporal` and `kubectl`: a table with upper-case headers by default, `--json` for
scripts, filters as flags. Everything reads Temporal (visibility, the `status` query, or the memo
when no worker answers), so these work without the API.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from firebreak.cli_common import Refused, Usage, client, not_found, out, reading_incident, settings_of

if TYPE_CHECKING:  # the contracts (pydantic) are loaded by the commands, not by `firebreak --version`
    from firebreak.config import Settings
    from firebreak.contracts import IncidentStatus, Phase

AsyncCommand = Callable[[argparse.Namespace], Awaitable[int]]


def register(sub: Any, common: argparse.ArgumentParser, run: Callable[[AsyncCommand], Any]) -> None:
    """Add the read commands to the main parser; ``run`` turns an async command into a handler."""
    p = sub.add_parser("list", parents=[common], help="incidents, newest first (like `kubectl get`)")
    # Set after add_argument, which would read the choices at once (to check the metavar).
    p.add_argument("--phase").choices = _PhaseValues()
    p.add_argument("--service")
    p.add_argument("--runbook")
    p.add_argument("--open", action="store_true", help="only incidents still running")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run(_list))

    p = sub.add_parser("inbox", parents=[common], help="incidents awaiting an approval you can give")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--as", dest="as_", help="a person of the roster")
    who.add_argument("--key", help="your Ed25519 private key (PEM): you are whoever the roster says it is")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run(_inbox))

    p = sub.add_parser("status", parents=[common], help="an incident's card; --watch follows it to its end")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", "-w", action="store_true",
                   help="print each change until the incident closes; exit 0 only if it resolved")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --watch")
    p.add_argument("--links", action="store_true", help="print the evidence links in full (default: shortened)")
    p.set_defaults(func=run(_status))

    p = sub.add_parser("history", parents=[common], help="an incident's events as a table")
    p.add_argument("id")
    p.add_argument("--run", default=None, help="an earlier run (default: the latest)")
    p.add_argument("--all", action="store_true",
                   help="every event in event order, the SDK's bookkeeping too (default: what an operator reads, "
                        "in time order)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run(_history))


class _PhaseValues:
    """`--phase`'s choices, read from the contracts only when argparse looks at them (a `--phase`
    given, `--help`, an error): a plain `firebreak list` then never imports the pydantic models."""

    def _values(self) -> list[str]:
        from firebreak.contracts import Phase

        return [ph.value for ph in Phase]

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())


# -- list ------------------------------------------------------------------------------


async def _list(args: argparse.Namespace) -> int:
    from firebreak.listing import Filters, list_incidents
    from firebreak.tables import age, render_table

    filters = Filters(phase=_phase(args.phase) if args.phase else None, service=args.service, runbook=args.runbook,
                      open=True if args.open else None)
    try:
        filters.query()
    except ValueError as exc:
        raise Usage(str(exc)) from None
    rows = await list_incidents(await client(settings_of(args)), filters, limit=args.limit)
    if args.json:
        print(json.dumps([row.as_json() for row in rows], indent=2))
        return 0
    if not rows:
        out("no incidents" + (" match" if any(vars(filters).values()) else ""))
        return 0
    now = datetime.now(timezone.utc)
    out(render_table(
        ["id", "run", "status", "phase", "service", "runbook", "age", "waiting for"],
        [[r.incident_id, r.run_id, r.execution_status.lower(), r.phase or "-", r.service or "-", r.runbook or "-",
          age(r.started_at, now), r.waiting_for] for r in rows]))
    return 0


def _phase(value: str) -> Phase:
    from firebreak.contracts import Phase

    return Phase(value)


# -- inbox -----------------------------------------------------------------------------


def _who(args: argparse.Namespace, settings: Settings) -> tuple[str, list[str]]:
    from firebreak import signing
    from firebreak.roster import Roster

    roster = Roster.load(settings.resolved_roster())
    if args.as_:
        person = next((p for p in roster.people if p.name == args.as_), None)
        if person is None:
            raise Refused(f"{args.as_} is not in the roster {settings.resolved_roster()}")
        return person.name, list(person.groups)
    from firebreak.cli_common import load_key

    public = signing.public_pem(load_key(args.key)).strip()
    person = next((p for p in roster.people if p.public_key.strip() == public), None)
    if person is None:
        raise Refused(f"the key {args.key} belongs to nobody in the roster {settings.resolved_roster()}")
    return person.name, list(person.groups)


async def _inbox(args: argparse.Namespace) -> int:
    from firebreak.contracts import Phase
    from firebreak.inbox import inbox_items
    from firebreak.incidents import WorkerDown, read_status
    from firebreak.listing import Filters
    from firebreak.tables import render_table

    settings = settings_of(args)
    name, groups = _who(args, settings)
    temporal = await client(settings)
    statuses: list[IncidentStatus] = []
    query = Filters(phase=Phase.awaiting_approval, open=True).query()
    async for wf in temporal.list_workflows(query, limit=200):
        try:
            handle = temporal.get_workflow_handle(wf.id, run_id=wf.run_id)
            statuses.append((await read_status(handle, settings.worker_wait))[0])
        except WorkerDown:
            continue  # nothing proposed yet: nothing to approve
    items = inbox_items(statuses, name, groups)
    if args.json:
        print(json.dumps([vars(i) for i in items], indent=2))
        return 0
    if not items:
        out(f"nothing waits for {name}")
        return 0
    out(render_table(["incident", "runbook", "service", "escalated", "still needs"],
                     [[i.incident_id, i.runbook, i.service, "yes" if i.escalated else "no", "; ".join(i.steps)]
                      for i in items]),
        "", f"Approve with: firebreak approve INCIDENT {'--as ' + args.as_ if args.as_ else '--key ' + args.key}")
    return 0


# -- status ----------------------------------------------------------------------------


def status_json(status: IncidentStatus) -> dict[str, Any]:
    """`status --json`: the card's content, without the raw evidence series (see the API for those)."""
    return {
        "incident_id": status.incident_id,
        "phase": status.phase.value,
        "runbook": status.runbook,
        "runbook_version": status.runbook_version,
        "service": status.service,
        "severity": status.severity,
        "requested_by": status.requested_by,
        "opened_at": status.opened_at.isoformat(),
        "hypotheses": [h.model_dump(mode="json") for h in status.hypotheses],
        "gaps": status.gaps,
        "plan": {"hash": status.plan_hash, "steps": [s.model_dump(mode="json") for s in status.plan.steps]}
        if status.plan else None,
        "approvals": [{"approver": a.approver, "decision": a.decision, "counted": a.counted, "reason": a.reason,
                       "comment": a.comment, "steps": a.steps, "received_at": a.received_at.isoformat(),
                       "via": a.via} for a in status.approvals],
        "needed": [n.model_dump(mode="json") | {"met": n.met} for n in status.needed],
        "escalates_at": status.escalates_at.isoformat() if status.escalates_at else None,
        "expires_at": status.expires_at.isoformat() if status.expires_at else None,
        "held": status.held,
        "steps": [s.model_dump(mode="json") for s in status.steps],
        "tickets": [t.model_dump(mode="json") for t in status.tickets],
        "sink_gaps": status.sink_gaps,
        "closed_at": status.closed_at.isoformat() if status.closed_at else None,
        "outcome": status.outcome,
    }


async def _status(args: argparse.Namespace) -> int:
    from firebreak.incidents import read_status

    settings = settings_of(args)
    temporal = await client(settings)
    handle = temporal.get_workflow_handle(args.id)
    with reading_incident(args.id):
        if args.watch:
            # Follow this run, not whichever run the id names later (a closed incident can fire again).
            run_id = (await handle.describe()).run_id
            handle = temporal.get_workflow_handle(args.id, run_id=run_id)

            async def read() -> IncidentStatus:
                return (await read_status(handle, settings.worker_wait))[0]

            final = await follow_to_end(read, args.interval)
            if args.json:
                print(json.dumps(status_json(final), indent=2))
            return exit_code(final)
        status, source = await read_status(handle, settings.worker_wait)
    if args.json:
        print(json.dumps(status_json(status), indent=2))
        return 0
    from workflows.summary import plan_markdown

    if source != "the workflow":
        print(f"(from {source})", file=sys.stderr)
    titles = {e.link: e.title or e.id for e in status.evidence if e.link}
    if status.held:
        # First, before a phase such as "executing" that would claim what is not happening.
        out(f"HELD: nothing executes until credentials are thawed: {status.held.removeprefix('held: ')}", "")
    out(terminal_text(plan_markdown(status), titles, links=args.links))
    return 0


_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_MD_LINK = re.compile(r"\[([^\]]*)\]\((\S+?)\)")
_URL = re.compile(r"https?://[^\s)>\]]+")
_STRONG = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]*)`")
SHORT_URL = 60


def short_url(url: str) -> str:
    """The address without its query, at most SHORT_URL characters: enough to see where it goes."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    short = f"{parts.scheme}://{parts.netloc}{parts.path}"
    if parts.query or parts.fragment:
        short += "?…"
    return short if len(short) <= SHORT_URL else short[: SHORT_URL - 1] + "…"


def terminal_text(markdown: str, titles: dict[str, str] | None = None, *, links: bool = False) -> str:
    """The card's Markdown for a terminal: headings as plain lines, no emphasis marks or backticks.

    A link reads as its title (an evidence link as its evidence's title) and a shortened address;
    ``links`` prints each in full instead.
    """
    titles = titles or {}
    shortened = 0

    def url(match: re.Match[str]) -> str:
        nonlocal shortened
        address = match.group(0)
        title = titles.get(address)
        if links:
            return f"{title}: {address}" if title else address
        if short_url(address) != address:
            shortened += 1
        return f"{title} ({short_url(address)})" if title else short_url(address)

    lines: list[str] = []
    for line in markdown.splitlines():
        line = _MD_LINK.sub(lambda m: f"{m.group(1)} {m.group(2)}" if links else m.group(1), line)
        line = _URL.sub(url, line)
        line = _CODE.sub(lambda m: m.group(1), _STRONG.sub(lambda m: m.group(1), line))
        heading = _HEADING.match(line)
        if heading:
            level, text = len(heading.group(1)), heading.group(2).strip()
            line = text if level <= 3 else f"{text}:"
        lines.append(line)
    text = "\n".join(lines)
    if shortened:
        text += f"\n({shortened} link(s) shortened; --links prints them in full)"
    return text


def exit_code(final: IncidentStatus) -> int:
    """`--watch` and `approve --wait`: 0 only when the incident resolved (by Firebreak or by itself)."""
    from firebreak.watch import RESOLVED

    return 0 if final.phase in RESOLVED else 1


async def follow_to_end(read: Callable[[], Awaitable[IncidentStatus]], interval: float = 1.0) -> IncidentStatus:
    """Print a timestamped line per change until the incident closes."""
    from firebreak.watch import follow

    def emit(line: str) -> None:
        out(f"{datetime.now(timezone.utc):%H:%M:%S}  {line}")

    return await follow(read, emit, interval)


# -- history ---------------------------------------------------------------------------


async def _history(args: argparse.Namespace) -> int:
    from firebreak.history import history_rows
    from firebreak.tables import render_table

    temporal = await client(settings_of(args))
    try:
        history = await temporal.get_workflow_handle(args.id, run_id=args.run).fetch_history()
    except Exception as exc:
        if not_found(exc):
            raise Refused(f"no incident {args.id!r}" + (f" with run {args.run}" if args.run else "")) from None
        raise
    rows = await history_rows(history, temporal.data_converter, everything=args.all)
    if args.json:
        print(json.dumps([row._asdict() for row in rows], indent=2))
        return 0
    out(render_table(["event", "time", "type", "detail"],
                     [[r.event_id, r.time[11:19], r.kind, r.detail] for r in rows]))
    return 0


def run_async(fn: AsyncCommand) -> Callable[[argparse.Namespace], int]:
    import asyncio

    return lambda args: asyncio.run(fn(args))
