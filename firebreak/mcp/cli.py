"""`firebreak mcp`: the MCP server for AI agents, over stdio (one agent) or streamable HTTP (bearer per agent)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from firebreak.cli_common import Refused, Usage, settings_of


def register(sub: Any, common: argparse.ArgumentParser, run: Callable[[Any], Any]) -> None:
    p = sub.add_parser("mcp", parents=[common],
                       help="serve AI agents over MCP: they read and propose; only people approve")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--token-file", metavar="PATH", help="stdio: the agent token this client authenticates with")
    how.add_argument("--http", action="store_true", help="streamable HTTP at /mcp; each agent sends its bearer token")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--calls-per-minute", type=int, default=60, help="per agent")
    p.add_argument("--proposals-per-hour", type=int, default=20, help="per agent")
    p.set_defaults(func=run(_mcp))

    a = sub.add_parser("mcp-agent", help="add or revoke an AI agent of `firebreak mcp`")
    asub = a.add_subparsers(dest="agent_command", required=True)
    add = asub.add_parser("add", parents=[common], help="a new agent in the roster; its token is written 0600 under STATE_DIR/agents")
    add.add_argument("name")
    add.add_argument("--owner", required=True, help="the roster person it acts for (they cannot approve its proposals)")
    add.add_argument("--days", type=int, default=30, help="until it expires (default 30)")
    add.add_argument("--tool", action="append", default=None, help="a tool it may call (default: every tool); repeatable")
    revoke = asub.add_parser("revoke", parents=[common], help="refused from its next call on")
    revoke.add_argument("name")
    a.set_defaults(func=run(_mcp_agent))


async def _mcp_agent(args: argparse.Namespace) -> int:
    from datetime import datetime, timedelta, timezone

    from firebreak.mcp.identity import create_agent, revoke_agent
    from firebreak.mcp.server import TOOLS
    from firebreak.roster import RosterError

    settings = settings_of(args)
    try:
        if args.agent_command == "revoke":
            revoke_agent(settings.resolved_roster(), args.name)
            print(f"agent {args.name} revoked in {settings.resolved_roster()}")
            return 0
        unknown = sorted(set(args.tool or []) - set(TOOLS))
        if unknown or args.days < 1:
            raise Usage(f"--tool: no tool {unknown} (tools: {sorted(TOOLS)})" if unknown else "--days must be at least 1")
        path = create_agent(settings.state_dir, settings.resolved_roster(), args.name, args.owner,
                            expires=datetime.now(timezone.utc) + timedelta(days=args.days), tools=args.tool)
    except (ValueError, RosterError) as exc:
        raise Refused(str(exc)) from None
    print(f"agent {args.name} (for {args.owner}) added; its token, shown nowhere else: {path}")
    return 0


def components(settings: Any, calls_per_minute: int = 60, proposals_per_hour: int = 20,
               stdio_token: str | None = None) -> Any:
    from firebreak.mcp.identity import AgentGate, AuditLog, RateLimits, audit_path
    from firebreak.mcp.server import Firebreak

    gate = AgentGate(settings.resolved_roster(), AuditLog(audit_path(settings.state_dir)),
                     RateLimits(calls_per_minute=calls_per_minute, proposals_per_hour=proposals_per_hour))
    return Firebreak(settings, gate, stdio_token=stdio_token)


async def _mcp(args: argparse.Namespace) -> int:
    from firebreak.mcp.identity import AgentRefused, read_token_file
    from firebreak.mcp.server import build_server

    if args.calls_per_minute < 1 or args.proposals_per_hour < 0:
        raise Usage("--calls-per-minute must be at least 1 and --proposals-per-hour at least 0")
    settings = settings_of(args)
    if args.http:
        fb = components(settings, args.calls_per_minute, args.proposals_per_hour)
        await serve_http(build_server(fb), fb, args.host, args.port)
        return 0
    try:
        token = read_token_file(args.token_file)
    except (OSError, ValueError) as exc:
        raise Usage(f"--token-file: {exc}") from None
    fb = components(settings, args.calls_per_minute, args.proposals_per_hour, stdio_token=token)
    try:
        agent = fb.gate.authenticate(token)
    except AgentRefused as exc:
        fb.gate.refuse(token, "connect", None, str(exc), "stdio")
        raise Refused(f"refused: {exc}") from None
    print(f"firebreak mcp: serving agent {agent.name} (for {agent.owner}) over stdio", file=sys.stderr)
    await build_server(fb).run_stdio_async()
    return 0


def http_app(server: Any, fb: Any) -> Any:
    """The streamable HTTP app behind a bearer check: no agent token, no session (and the refusal recorded)."""
    app = server.streamable_http_app()

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        scheme, _, token = headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        try:
            fb.gate.authenticate(token or None)
        except Exception as exc:  # noqa: BLE001 - AgentRefused, or a roster that does not load: refused either way
            fb.gate.refuse(token or None, "connect", None, str(exc), "http")
            body = json.dumps({"error": f"refused: {exc}"}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"www-authenticate", b'Bearer realm="firebreak-mcp"')]})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    # The session manager runs in the app's lifespan: keep it reachable through the wrapper.
    guarded.router = getattr(app, "router", None)  # type: ignore[attr-defined]
    return _Lifespan(app, guarded)


class _Lifespan:
    """Lifespan events go to the inner app (it starts the session manager); requests to the guard."""

    def __init__(self, inner: Any, guarded: Any) -> None:
        self.inner, self.guarded = inner, guarded

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.inner(scope, receive, send)
        else:
            await self.guarded(scope, receive, send)


async def serve_http(server: Any, fb: Any, host: str, port: int) -> None:
    import uvicorn

    config = uvicorn.Config(http_app(server, fb), host=host, port=port, log_level="warning")
    print(f"firebreak mcp: streamable HTTP at http://{host}:{port}/mcp", file=sys.stderr)
    await uvicorn.Server(config).serve()
