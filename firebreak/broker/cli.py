"""``firebreak creds|audit|broker|keys``: the broker's commands.

The main ``firebreak`` command calls :func:`register`; each subcommand sets
``func`` (``args -> exit code``) with ``set_defaults``. ``settings_loader`` is
``firebreak.config.load_settings`` or anything with its signature.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import httpx

from firebreak import signing
from firebreak.broker.audit import verify_chain
from firebreak.broker.checkpoints import checkpoints_path
from firebreak.broker.checkpoints import read as read_checkpoints
from firebreak.broker.signing_keys import retired_public_keys
from firebreak.broker.state import broker_dir
from firebreak.config import Settings
from firebreak.roster import entry_yaml

if TYPE_CHECKING:  # temporalio is imported only when history is walked
    from firebreak.audit_history import HistoryGrants

SettingsLoader = Callable[[str | Path | None], Settings]
ADMIN_TOKEN_ENV = "FIREBREAK_BROKER_ADMIN_TOKEN"


def _state_dir_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: do not overwrite a --state-dir given to the parent parser.
    parser.add_argument("--state-dir", default=argparse.SUPPRESS, help="Firebreak state directory")


def register(subparsers: argparse._SubParsersAction, settings_loader: SettingsLoader) -> None:  # type: ignore[type-arg]
    def settings(args: argparse.Namespace) -> Settings:
        return settings_loader(getattr(args, "state_dir", None))

    # -- creds freeze | thaw | rotate | rotate-key --
    creds = subparsers.add_parser("creds", help="credential kill switch and rotation")
    creds_sub = creds.add_subparsers(dest="creds_command", required=True)
    for name, helptext in (("freeze", "refuse every mint and revoke live grants"), ("thaw", "issue credentials again")):
        p = creds_sub.add_parser(name, help=helptext)
        p.add_argument("--reason", required=name == "freeze", default="",
                       help="why: recorded in the audit log and shown on every incident it holds")
        p.add_argument("--as", dest="by", default=None, help="who does it (default: your login name)")
        p.add_argument("--broker-url", default=None)
        _state_dir_option(p)
        p.set_defaults(func=lambda args, _name=name: _creds(args, _name, settings(args)))
    for name, helptext, default in (
        ("rotate", "replace the worker's bootstrap credential; the old one works until the overlap ends", "1h"),
        ("rotate-key", "replace the broker's token signing key; the JWKS keeps the old one for the overlap",
         f"{signing.KEY_OVERLAP_S}s"),
    ):
        p = creds_sub.add_parser(name, help=helptext)
        p.add_argument("--overlap", default=default,
                       help=f"how long the old one still works (default {default}; 0s: refuse it at once)")
        p.add_argument("--reason", default="", help="why: recorded in the audit log")
        p.add_argument("--as", dest="by", default=None, help="who does it (default: your login name)")
        p.add_argument("--broker-url", default=None)
        _state_dir_option(p)
        p.set_defaults(func=lambda args, _name=name: _rotate(args, _name, settings(args)))

    # -- audit verify --
    audit = subparsers.add_parser("audit", help="the broker's audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify",
        help="check the audit log: hash chain, signed checkpoints, and the grants Temporal history recorded",
        description="Broken if a record was edited, removed or reordered; if a checkpoint is not signed by the "
        "broker's key, names a record past the log's end (tail cut off) or a record with another hash (log "
        "rewritten and re-hashed); if unsigned records, or a newest checkpoint other than a shutdown's, are "
        "older than the broker's checkpoint interval allows (later checkpoints removed); or if a grant in "
        "Temporal history names an audit record that is missing or is not that grant's mint. An intact log's "
        "verdict lists the repairs the broker recorded (torn writes it cut off). Exit 0 intact, 1 broken.",
    )
    verify.add_argument("--file", type=Path, default=None, help="default: STATE_DIR/broker/audit.jsonl")
    verify.add_argument("--checkpoints", type=Path, default=None, help="default: audit.checkpoints.jsonl beside the log")
    key_source = verify.add_mutually_exclusive_group()
    key_source.add_argument(
        "--public-key", type=Path, default=None,
        help="the broker's key, PEM (public, or the private key file); default: derived from "
        "STATE_DIR/broker/signing-key.pem",
    )
    key_source.add_argument("--jwks", default=None, help="the broker's JWKS instead: a URL or a file")
    history = verify.add_mutually_exclusive_group()
    history.add_argument(
        "--history", dest="history", action="store_const", const="require", default="auto",
        help="require the cross-check against IncidentWorkflow histories (fail if Temporal is unreachable); "
        "by default it runs when Temporal answers and is reported as skipped when it does not",
    )
    history.add_argument("--no-history", dest="history", action="store_const", const="off",
                         help="skip the Temporal history cross-check")
    _state_dir_option(verify)
    verify.set_defaults(func=lambda args: _audit_verify(args, settings(args)))

    # -- broker --
    broker = subparsers.add_parser("broker", help="run the credential broker")
    broker.add_argument("--host", default=None, help="default: from broker_url")
    broker.add_argument("--port", type=int, default=None, help="default: from broker_url")
    broker.add_argument("--roster", type=Path, default=None)
    broker.add_argument("--runbooks-dir", type=Path, default=None)
    broker.add_argument("--catalog-url", default=None,
                        help="the service catalog the broker reads itself (default: targets.catalog)")
    _state_dir_option(broker)
    broker.set_defaults(func=lambda args: _broker(args, settings(args)))

    # -- keys new --
    keys = subparsers.add_parser("keys", help="approver keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="make an approver key and print its roster entry")
    new.add_argument("--name", required=True)
    new.add_argument("--group", action="append", default=[], help="roster group (repeatable)")
    new.add_argument("--out", type=Path, default=None, help="default: STATE_DIR/keys")
    _state_dir_option(new)
    new.set_defaults(func=lambda args: _keys_new(args, settings(args)))


def _admin_token(settings: Settings) -> str | None:
    if settings.broker_admin_token:
        return settings.broker_admin_token
    if os.environ.get(ADMIN_TOKEN_ENV):
        return os.environ[ADMIN_TOKEN_ENV]
    path = broker_dir(settings.state_dir) / "admin-token"
    return path.read_text(encoding="ascii").strip() if path.exists() else None


def _admin_post(args: argparse.Namespace, settings: Settings, path: str, what: str,
                body: dict[str, object]) -> dict[str, object] | int:
    """POST an admin request to the broker as who runs the command: its JSON answer, or an exit code."""
    token = _admin_token(settings)
    if not token:
        print(f"no admin token: set {ADMIN_TOKEN_ENV} or run on the broker's host", file=sys.stderr)
        return 2
    url = (args.broker_url or settings.broker_url).rstrip("/")
    try:
        response = httpx.post(f"{url}{path}", json={**body, "reason": args.reason, "by": args.by or getpass.getuser()},
                              headers={"Authorization": f"Bearer {token}"}, timeout=10)
    except httpx.HTTPError as exc:
        print(f"{what} not done: no broker answered at {url} ({type(exc).__name__}): run `firebreak up`, or give "
              "--broker-url", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"{what} refused: HTTP {response.status_code}: {' '.join(response.text.split())[:300]}", file=sys.stderr)
        return 1
    return response.json()


def _creds(args: argparse.Namespace, action: str, settings: Settings) -> int:
    body = _admin_post(args, settings, f"/v1/{action}", action, {})
    if isinstance(body, int):
        return body
    if action == "freeze":
        print(f"broker frozen: every mint is refused; revoked {body.get('revoked', 0)} live grant(s)")
    else:
        print("broker thawed: credentials are issued again")
    return 0


def _rotate(args: argparse.Namespace, what: str, settings: Settings) -> int:
    from firebreak.runbook import parse_duration

    try:
        overlap = parse_duration(args.overlap).total_seconds()
    except ValueError as exc:
        print(f"--overlap: {exc}", file=sys.stderr)
        return 2
    path = "/v1/creds/rotate" if what == "rotate" else "/v1/keys/rotate"
    body = _admin_post(args, settings, path, what, {"overlap_s": overlap})
    if isinstance(body, int):
        return body
    if what == "rotate":
        # The credential itself is never printed: it is in the broker's file, 0600.
        print(f"bootstrap credential rotated: the new one is in {body['path']} (0600); workers that read that file "
              f"switch at their next request. The old one is accepted until {body['old_valid_until']}, then "
              "refused (401) and audited; deliver the new one to any other worker before then.")
    else:
        print(f"signing key rotated: {body['old_kid']} -> {body['kid']}. The JWKS publishes both until "
              f"{body['old_published_until']}; targets refuse the old key's tokens after that.")
        if overlap < signing.KEY_OVERLAP_S:
            print(f"note: an overlap under {signing.KEY_OVERLAP_S}s (the longest token TTL plus target leeway) "
                  "refuses tokens the old key signed before they expire", file=sys.stderr)
    return 0


def _audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    path = args.file or broker_dir(settings.state_dir) / "audit.jsonl"
    checkpoints = args.checkpoints or checkpoints_path(path)
    try:
        keys = _audit_keys(args, settings)
    except (OSError, ValueError, httpx.HTTPError) as exc:
        print(f"cannot load the broker's key: {exc}", file=sys.stderr)
        return 1
    if keys is None:
        signed = len(read_checkpoints(checkpoints))
        if signed:
            print(f"{signed} checkpoints in {checkpoints} but no broker key to check them: give --public-key or "
                  "--jwks", file=sys.stderr)
            return 1
        # A log from a broker without a key (or from before checkpoints): the chain is all there is.
        print(f"no broker key at {broker_dir(settings.state_dir) / 'signing-key.pem'}: checkpoints not checked, "
              "so a log cut short or rewritten whole would pass", file=sys.stderr)
    history, problem = _audit_history(args.history, settings)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    ok, bad_seq, message = verify_chain(
        path, public_key=keys, checkpoints=checkpoints, history=history.by_seq if history else None
    )
    if ok and history is not None and history.conflicts:
        ok, message = False, history.conflicts[0]
    if ok and history is None and args.history == "auto":
        # Said with the verdict, not only on stderr: "intact" here vouches for less.
        message += ("\nnot cross-checked with Temporal history (unreachable, see above): a tail cut with its"
                    " checkpoints is caught only by the checkpoints' age")
    print(message, file=sys.stdout if ok else sys.stderr)
    if not ok:
        if bad_seq is not None:
            print(f"first broken record: seq {bad_seq}", file=sys.stderr)
        return 1
    if history is not None and history.without_seq:
        print(f"note: {len(history.without_seq)} grants in history carry no audit_seq (older runs) and were not "
              "checked", file=sys.stderr)
    return 0


def _audit_keys(args: argparse.Namespace, settings: Settings) -> dict[str, signing.Ed25519PublicKey] | None:
    """kid -> the broker's public key, from --public-key, --jwks or the broker's own key file; None if none."""
    if args.jwks:
        if urlparse(args.jwks).scheme in ("http", "https"):
            response = httpx.get(args.jwks, timeout=10)
            response.raise_for_status()
            document = response.json()
        else:
            document = json.loads(Path(args.jwks).read_text())
        keys = signing.jwks_keys(document)
        if not keys:
            raise ValueError(f"{args.jwks} holds no Ed25519 key")
        return keys
    path = args.public_key or broker_dir(settings.state_dir) / "signing-key.pem"
    if args.public_key is None and not path.exists():
        return None
    text = path.read_bytes()
    # Only the public half is kept: verifying needs nothing more.
    public = (signing.load_private_key(path).public_key() if b"PRIVATE KEY" in text
              else signing.load_public_key(text))
    keys = {signing.key_id(public): public}
    if args.public_key is None:
        # Checkpoints signed before a key rotation verify with the keys the broker rotated out.
        keys |= retired_public_keys(broker_dir(settings.state_dir))
    return keys


def _audit_history(mode: str, settings: Settings) -> tuple[HistoryGrants | None, str | None]:
    """(grants from Temporal history or None if not checked, a problem that fails the check or None)."""
    if mode == "off":
        return None, None
    import asyncio

    from firebreak.audit_history import history_grants
    from firebreak.temporal import connect

    async def gather() -> HistoryGrants:
        client = await asyncio.wait_for(connect(settings.temporal), timeout=10)
        return await history_grants(client)

    try:
        found = asyncio.run(gather())
    except Exception as exc:  # unreachable, TLS, visibility not supported: what failed, in one line
        reason = _temporal_problem(settings, exc)
        if mode == "require":
            return None, f"history cross-check failed: {reason}"
        print(f"history: not checked ({reason}); --history makes this an error. The grants Temporal recorded"
              " were not compared with the log.", file=sys.stderr)
        return None, None
    print(f"history: {found.workflows} IncidentWorkflow runs, {len(found.by_seq)} grants with an audit seq",
          file=sys.stderr)
    return found, None


def _temporal_problem(settings: Settings, exc: Exception) -> str:
    """Why Temporal could not be read, in one line; not reached at all says what to run."""
    import asyncio

    text = " ".join(str(exc).split())
    if isinstance(exc, (asyncio.TimeoutError, ConnectionError)) or (
            isinstance(exc, RuntimeError) and "connect" in text.lower()):
        # The SDK's own text here is a transport error's debug dump: the address and the remedy say more.
        return f"Temporal at {settings.temporal.address} did not answer: run `firebreak up`"
    return f"Temporal at {settings.temporal.address}: {type(exc).__name__}: {text[:200]}"


def _broker(args: argparse.Namespace, settings: Settings) -> int:
    from firebreak.broker.server import run  # uvicorn only when serving

    parsed = urlparse(settings.broker_url)
    run(
        host=args.host or parsed.hostname or "127.0.0.1",
        port=args.port or parsed.port or 8350,
        state_dir=settings.state_dir,
        roster_path=args.roster or settings.resolved_roster(),
        runbooks_dir=args.runbooks_dir or settings.resolved_runbooks_dir(),
        catalog_url=args.catalog_url or settings.targets.get("catalog"),
    )
    return 0


def _keys_new(args: argparse.Namespace, settings: Settings) -> int:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", args.name):
        # The name becomes a file name and a roster name: no paths, no surprises.
        print(f"{args.name!r} is not a valid roster name (letters, digits, '._@-')", file=sys.stderr)
        return 2
    out = args.out or settings.state_dir / "keys"
    path = out / f"{args.name}.pem"
    if path.exists():
        print(f"{path} already exists; not overwriting a key", file=sys.stderr)
        return 1
    key = signing.generate_key()
    signing.write_private_key(path, key)
    print(f"# private key written to {path} (mode 0600); add this entry under people: in the roster", file=sys.stderr)
    print(entry_yaml(args.name, args.group, signing.public_pem(key)), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m firebreak.broker.cli``) until the main CLI wires it."""
    from firebreak.config import load_settings

    parser = argparse.ArgumentParser(prog="firebreak")
    register(parser.add_subparsers(dest="command", required=True), load_settings)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
