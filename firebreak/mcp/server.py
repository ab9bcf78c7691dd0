"""The MCP server: tools that read and propose, resources that show what may be proposed.

No tool approves, rejects, mints or thaws: those stay with people (signed approvals)
and the broker. A proposal opens an incident exactly as an alert source would
(:func:`firebreak.intake.route_alerts`, :func:`firebreak.intake.deliver_routed`);
the runbook alone decides the investigation and the actions.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.resources import FunctionResource
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_REQUEST, CallToolResult, TextContent, ToolAnnotations
from pydantic import Field, ValidationError

from firebreak import signing
from firebreak.config import Settings
from firebreak.contracts import LABEL_NAME, Alert, Phase
from firebreak.mcp.identity import AgentGate, AgentRefused, receipt_key_path
from firebreak.mcp.tools import TOOLS as TOOL_KINDS
from firebreak.receipts import agent_signer
from firebreak.roster import Agent
from firebreak.runbook import Runbook, json_schema, load_runbook, load_runbooks

log = logging.getLogger("firebreak.mcp")

# What each tool does (firebreak/mcp/tools.py, locked by `firebreak privileges`): none writes to production.
TOOLS: dict[str, str] = {name: f"{kind}: {does}" for name, (kind, does, _) in TOOL_KINDS.items()}
AUTHENTICATED = {"tools/call", "tools/list", "resources/list", "resources/read", "resources/templates/list",
                 "prompts/list", "prompts/get", "completion/complete"}
CANNOT = ["approve or reject a plan", "mint a credential", "thaw or unfreeze anything", "run a step",
          "change a runbook, the roster or the policy"]

IncidentIdArg = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,200}$", description="an incident id")]
RunIdArg = Annotated[str, Field(pattern=r"^[0-9A-Za-z-]{1,64}$", description="a run of the incident")]
FilterArg = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,200}$")]
RunbookArg = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,63}$", description="a runbook's name")]
LabelNameArg = Annotated[str, Field(pattern=LABEL_NAME.pattern)]
LabelValueArg = Annotated[str, Field(max_length=1024)]
MAX_HYPOTHESIS = 1500

current_agent: contextvars.ContextVar[Agent | None] = contextvars.ContextVar("firebreak_mcp_agent", default=None)


class Firebreak:
    """What the tools share: settings, the gate, the runbooks and one Temporal client."""

    def __init__(self, settings: Settings, gate: AgentGate, *, stdio_token: str | None = None) -> None:
        self.settings = settings
        self.gate = gate
        self.stdio_token = stdio_token
        self._client: Any = None

    async def temporal(self) -> Any:
        if self._client is None:
            from firebreak.cli_common import client

            self._client = await client(self.settings)
        return self._client

    def runbooks(self) -> list[Runbook]:
        return load_runbooks(self.settings.resolved_runbooks_dir())

    def agent(self) -> Agent:
        agent = current_agent.get()
        if agent is None:  # the middleware always sets it; a tool without it refuses
            raise ToolError("no authenticated agent")
        return agent


def build_server(fb: Firebreak) -> MCPServer:
    server = MCPServer(
        "firebreak", version="1",
        instructions=("Firebreak: read incidents, and propose a remediation by opening an incident from a "
                      "structured alert. A runbook decides the investigation and the actions; only people "
                      "approve. Read the runbooks resources to see what may be proposed."),
        middleware=[_Gatekeeper(fb)],
    )
    gatekeeper = server._lowlevel_server.middleware[-1]
    assert isinstance(gatekeeper, _Gatekeeper)
    gatekeeper.server = server
    _add_tools(server, fb)
    # The gatekeeper refuses any tool not in tools.TOOLS (the list `firebreak privileges` locks): keep them one list.
    assert set(server._tool_manager._tools) == set(TOOLS), "every tool is listed in firebreak/mcp/tools.py"  # noqa: SLF001
    _add_resources(server, fb)
    return server


class _Gatekeeper:
    """Every request that reads or acts is authenticated, on every call; every tool call is audited."""

    def __init__(self, fb: Firebreak) -> None:
        self.fb = fb
        self.server: MCPServer | None = None  # set by build_server: arguments are checked against its tools

    def _bad_arguments(self, tool: str, arguments: Mapping[str, Any] | None) -> str | None:
        """The first bad field of a tool call, named, without echoing its value (it is the caller's data)."""
        found = self.server._tool_manager.get_tool(tool) if self.server is not None else None
        if found is None:
            return None
        try:
            found.fn_metadata.arg_model.model_validate(dict(arguments or {}))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(arguments)"
            return f"{where}: {err['msg']}"
        return None

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        method = ctx.method
        if method not in AUTHENTICATED:
            return await call_next(ctx)
        params: Mapping[str, Any] = ctx.params or {}
        tool = str(params.get("name", ""))[:64] if method == "tools/call" else method
        arguments = params.get("arguments") if method == "tools/call" else None
        arguments = arguments if isinstance(arguments, Mapping) else None
        request = ctx.request
        transport = "http" if request is not None else "stdio"
        token = _bearer(request) if request is not None else self.fb.stdio_token
        try:
            agent = self.fb.gate.authenticate(token)
            if method == "tools/call":
                if tool not in TOOLS:
                    raise AgentRefused(f"no tool {tool!r}: this server has {sorted(TOOLS)}")
                if agent.tools is not None and tool not in agent.tools:
                    raise AgentRefused(f"agent {agent.name!r} may not call {tool!r} (its tools: {agent.tools})")
                why = self.fb.gate.limits.admit(agent.name, proposal=tool == "propose_remediation")
                if why is not None:
                    raise AgentRefused(why)
        except AgentRefused as exc:
            self.fb.gate.refuse(token, tool, arguments, str(exc), transport)
            raise MCPError(INVALID_REQUEST, f"refused: {exc}") from None
        if method == "tools/call":
            bad = self._bad_arguments(tool, arguments)
            if bad is not None:
                self.fb.gate.audit.record(agent=agent.name, owner=agent.owner, tool=tool, arguments=arguments,
                                          outcome="refused", detail=bad, transport=transport)
                return CallToolResult(content=[TextContent(type="text", text=f"refused: {bad}")], is_error=True)
        reset = current_agent.set(agent)
        try:
            result = await call_next(ctx)
        except Exception as exc:
            if method == "tools/call":
                self.fb.gate.audit.record(agent=agent.name, owner=agent.owner, tool=tool, arguments=arguments,
                                          outcome="error", detail=str(exc), transport=transport)
            raise
        finally:
            current_agent.reset(reset)
        if method == "tools/call":
            failed, detail = _failed(result)
            self.fb.gate.audit.record(agent=agent.name, owner=agent.owner, tool=tool, arguments=arguments,
                                      outcome="refused" if failed else "ok", detail=detail, transport=transport)
        return result


def _bearer(request: Any) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _failed(result: Any) -> tuple[bool, str]:
    if isinstance(result, CallToolResult):
        error, content = result.is_error, result.content
    elif isinstance(result, Mapping):
        error, content = bool(result.get("isError")), result.get("content") or []
    else:
        return False, ""
    if not error:
        return False, ""
    texts = [c.text if hasattr(c, "text") else str(c.get("text", "")) if isinstance(c, Mapping) else "" for c in content]
    return True, " ".join(texts)


# -- tools ---------------------------------------------------------------------------------


def _add_tools(server: MCPServer, fb: Firebreak) -> None:
    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

    @server.tool(annotations=read_only)
    async def list_incidents(
        phase: Phase | None = None,
        service: FilterArg | None = None,
        runbook: FilterArg | None = None,
        open: bool | None = None,
        limit: Annotated[int, Field(ge=1, le=200)] = 50,
    ) -> list[dict[str, Any]]:
        """Incidents, newest first, as `firebreak list --json` shows them."""
        from firebreak.listing import Filters
        from firebreak.listing import list_incidents as listed

        filters = Filters(phase=phase, service=service, runbook=runbook, open=open)
        try:
            filters.query()
        except ValueError as exc:
            raise ToolError(str(exc).replace("--", "")) from None
        return [row.as_json() for row in await listed(await fb.temporal(), filters, limit=limit)]

    @server.tool(annotations=read_only)
    async def get_incident(incident_id: IncidentIdArg) -> dict[str, Any]:
        """One incident's card (phase, hypotheses, plan, approvals), as `firebreak status ID --json` shows it."""
        from firebreak.cli_incidents import status_json
        from firebreak.incidents import WorkerDown, read_status

        temporal = await fb.temporal()
        try:
            status, _ = await read_status(temporal.get_workflow_handle(incident_id), fb.settings.worker_wait)
        except WorkerDown as exc:
            raise ToolError(f"incident_id: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - told apart in _missing, and never shown beyond its type
            raise ToolError(_missing(exc, incident_id)) from None
        return status_json(status)

    @server.tool(annotations=read_only)
    async def get_history(incident_id: IncidentIdArg, run_id: RunIdArg | None = None) -> list[dict[str, Any]]:
        """One incident's history, event by event, as `firebreak history ID --json` shows it."""
        from firebreak.history import history_rows

        temporal = await fb.temporal()
        try:
            history = await temporal.get_workflow_handle(incident_id, run_id=run_id).fetch_history()
        except Exception as exc:  # noqa: BLE001 - told apart in _missing, and never shown beyond its type
            raise ToolError(_missing(exc, incident_id)) from None
        return [row._asdict() for row in await history_rows(history, temporal.data_converter)]

    @server.tool(annotations=read_only)
    async def privileges() -> dict[str, Any]:
        """What this agent identity may do, and what no agent can."""
        agent = fb.agent()
        allowed = [t for t in TOOLS if agent.tools is None or t in agent.tools]
        limits = fb.gate.limits
        return {
            "agent": agent.name, "owner": agent.owner, "expires": agent.expires.isoformat(),
            "tools": [{"name": t, "does": TOOLS[t]} for t in allowed],
            "rate_limits": {"calls_per_minute": limits.calls_per_minute,
                            "proposals_per_hour": limits.proposals_per_hour},
            "requester": (f"what {agent.name} proposes is raised for {agent.owner}: a receipt signed for it names "
                          f"{agent.owner}, who therefore cannot approve it"),
            "cannot": CANNOT,
        }

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                             open_world_hint=False))
    async def propose_remediation(
        runbook: RunbookArg,
        labels: Annotated[dict[LabelNameArg, LabelValueArg], Field(min_length=1, max_length=64,
                                                                  description="the alert's labels, as an alert source "
                                                                              "would send them")],
        hypothesis: Annotated[str, Field(min_length=1, max_length=MAX_HYPOTHESIS,
                                         description="your hypothesis: attached unverified, never changes the plan")],
    ) -> dict[str, Any]:
        """Open an incident from a structured alert, exactly as an alert source would.

        The runbook decides what is investigated and which actions are proposed; people approve.
        Your hypothesis is shown on the incident marked unverified and never changes the plan.
        """
        from firebreak.intake import deliver_routed, route_alerts

        agent = fb.agent()
        runbooks = fb.runbooks()
        chosen = next((r for r in runbooks if r.name == runbook), None)
        if chosen is None:
            raise ToolError(f"runbook: no runbook named {runbook!r} (known: {sorted(r.name for r in runbooks)})")
        labels = dict(labels)
        labels.setdefault("alertname", chosen.match.alertnames[0])
        alert = Alert(
            source="mcp",
            fingerprint=hashlib.sha256(f"{agent.name}\n{sorted(labels.items())}".encode()).hexdigest()[:32],
            labels=labels,
            # Data only: the card shows annotations through markdown_text (intake.run_details), never raw.
            annotations={
                "summary": f"Proposed by AI agent {agent.name} for {agent.owner}",
                "description": (f"UNVERIFIED hypothesis from AI agent {agent.name} (not checked by Firebreak; the "
                                f"runbook alone decides the investigation and the plan): {hypothesis}"),
                "firebreak_agent": agent.name,
                "firebreak_agent_owner": agent.owner,
            },
            starts_at=datetime.now(UTC),
        )
        routing = route_alerts(runbooks, [alert])
        if routing.refused:
            refused = routing.refused[0]
            raise ToolError(f"{refused.field}: {refused.reason}")
        if not routing.routed:
            raise ToolError(f"labels: {routing.unrouted[0].reason}")
        group = routing.routed[0]
        if group.runbook.name != chosen.name:
            raise ToolError(f"labels: these labels route to runbook {group.runbook.name!r}, not {runbook!r}")
        key_file = receipt_key_path(fb.settings.state_dir, agent.name)
        if not key_file.exists():
            raise ToolError(f"this server holds no receipt key for agent {agent.name!r}")
        receipt = agent_signer(agent.name, agent.owner, signing.load_private_key(key_file))
        # Raised for its owner: the signed receipt names the owner (and the agent as its signer), so the broker and
        # the workflow count the owner among the requesters, and separation of duties keeps them from approving.
        delivered = await deliver_routed(await fb.temporal(), group, task_queue=fb.settings.temporal.task_queue,
                                         requested_by=agent.owner, receipt=receipt, delivery_id=f"mcp-{agent.name}-{alert.fingerprint}")
        return {
            "incident_id": delivered.incident_id, "run_id": delivered.run_id, "runbook": group.runbook.name,
            "previous_run_id": delivered.previous_run_id, "skipped": delivered.skipped,
            "requester": agent.owner, "proposed_by": agent.name,
            "next": "the runbook investigates and proposes; people approve. Follow it with get_incident.",
        }


def _missing(exc: BaseException, incident_id: str) -> str:
    from firebreak.cli_common import not_found

    if not_found(exc):
        return f"incident_id: no incident {incident_id!r}"
    return f"incident_id: could not read {incident_id!r}: {type(exc).__name__}"


# -- resources -------------------------------------------------------------------------------


def _add_resources(server: MCPServer, fb: Firebreak) -> None:
    server.add_resource(FunctionResource.from_function(
        json_schema, uri="firebreak://runbooks/schema.json", name="runbook-schema",
        description="The JSON Schema every runbook follows", mime_type="application/schema+json"))
    directory = Path(fb.settings.resolved_runbooks_dir())
    for path in sorted(directory.glob("*.y*ml")):
        try:
            book = load_runbook(path)
        except Exception:  # noqa: BLE001, S112 - a broken runbook is the loader's to report, not an agent's to read
            continue
        server.add_resource(FunctionResource.from_function(
            _reader(path), uri=f"firebreak://runbooks/{book.name}", name=book.name,
            description=f"runbook {book.name} v{book.version}: alerts {', '.join(book.match.alertnames)}",
            mime_type="application/yaml"))


def _reader(path: Path) -> Any:
    return lambda: path.read_text(encoding="utf-8")
