"""`firebreak privileges`: the report, its drift against the committed lock, and its usage."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from firebreak import privileges
from firebreak.broker import agent_credential
from firebreak.cli_common import Usage
from firebreak.config import Settings
from firebreak.runbook import RunbookError, load_runbooks, parse_duration

REPO_LOCK = Path(__file__).resolve().parent.parent / privileges.LOCK_FILE


def register(subparsers: Any, settings_loader: Callable[[str | None], Settings]) -> None:
    p = subparsers.add_parser("privileges", help="every privilege the agent can hold, classified")
    p.add_argument("--state-dir", default=None)
    p.add_argument("--runbooks-dir", default=None, help="default: the configured runbooks")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true")
    shape.add_argument("--markdown", action="store_true")
    p.add_argument("--usage", action="store_true", help="join with the broker's audit log: uses and last use")
    p.add_argument("--window", default="30d", help="with --usage: how far back (default 30d)")
    p.add_argument("action", nargs="?", choices=["diff", "lock"],
                   help="diff: name every widening against the lock (exit 1); lock: write the lock")
    p.add_argument("--lock", default=str(REPO_LOCK), help=f"default: {privileges.LOCK_FILE} in the repo")
    p.set_defaults(func=lambda args: _run(args, settings_loader(args.state_dir)))


def identity_section(settings: Settings) -> dict[str, Any]:
    """The configured identity, and the bootstrap credential's age where the broker's state is readable."""
    identity = settings.identity
    issued = agent_credential.issued_at(settings.state_dir / "broker")
    section: dict[str, Any] = {**identity.summary(), "credential_issued_at": None, "credential_age_s": None,
                               "credential_overdue": None}
    if issued is not None:
        age = max(0.0, time.time() - issued)
        section |= {"credential_issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued)),
                    "credential_age_s": round(age, 1), "credential_overdue": age > identity.max_age_s}
    return section


def agents_section(settings: Settings) -> list[dict[str, Any]]:
    """Each AI agent in the roster and the MCP tools it may call (shown, never locked: the roster is configuration)."""
    from firebreak.mcp.tools import TOOLS
    from firebreak.roster import Roster, RosterError

    try:
        roster = Roster.load(settings.resolved_roster())
    except RosterError:
        return []
    return [{"name": a.name, "owner": a.owner, "expires": a.expires.isoformat(), "revoked": a.revoked,
             "tools": [t for t in TOOLS if a.tools is None or t in a.tools]} for a in roster.agents]


def _run(args: argparse.Namespace, settings: Settings) -> int:
    directory = Path(args.runbooks_dir) if args.runbooks_dir else settings.resolved_runbooks_dir()
    if not Path(directory).is_dir():
        # An empty report would say the agent can do nothing: never, for a directory that is not there.
        raise Usage(f"{directory}: no such runbooks directory")
    try:
        books = load_runbooks(directory)
    except RunbookError as exc:
        raise Usage(" ".join(str(exc).split())) from None
    window = None
    if args.usage:
        try:
            window = parse_duration(args.window).total_seconds()
        except ValueError as exc:
            raise Usage(f"--window: {exc}") from None
    current = privileges.report(books)
    lock = Path(args.lock)
    if args.action == "lock":
        try:
            lock.write_text(privileges.dump(current))
        except OSError as exc:
            raise Usage(f"{lock}: {exc.strerror or exc}") from None
        print(f"wrote {lock}: {len(current['privileges'])} privileges")
        return 0
    if args.action == "diff":
        if not lock.exists():
            print(f"no baseline at {lock}: run `firebreak privileges lock` and commit it", file=sys.stderr)
            return 1
        widen, narrow = privileges.diff(privileges.load_lock(lock), current)
        for line in narrow:
            print(f"narrowed: {line}")
        for line in widen:
            print(f"WIDENED: {line}")
        if widen:
            print(f"{len(widen)} widening(s) against {lock}: review them, then `firebreak privileges lock` "
                  "in the same commit", file=sys.stderr)
            return 1
        print(f"no widening against {lock} ({len(narrow)} narrowing(s))")
        return 0
    # Shown, never locked: the identity is the deployment's configuration, the lock is the runbooks'.
    current = {**current, "identity": identity_section(settings), "agents": agents_section(settings)}
    if args.usage:
        audit = settings.state_dir / "broker" / "audit.jsonl"
        records = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()] if audit.exists() else []
        current = privileges.usage(current, records, since=time.time() - (window or 0.0), runbooks=books)
    if args.json:
        print(json.dumps(current, indent=2, sort_keys=True))
    elif args.markdown or not args.usage:
        print(privileges.markdown(current), end="")
    if args.usage and not args.json:
        if not args.markdown:
            print("\n".join(privileges.identity_lines(current["identity"])))
        from firebreak.tables import render_table

        # One row per privilege of the report (its resource template), each mint counted once.
        print(f"Uses in the last {args.window}, from {audit}:")
        print(render_table(["uses", "last used", "kind", "target", "verb", "resource"],
                           [[str(row["uses"]), row["last_used"] or "never", row["kind"], row["target"], row["verb"],
                             row["resource"]] for row in current["privileges"]]))
        for key in current["never_used"]:
            print(f"unused: {key} (a candidate for removal)")
    return 0
