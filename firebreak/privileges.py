"""What the agent can do: every privilege it can hold, derived from the runbooks and the broker's rules.

The broker issues nothing a runbook does not declare (``firebreak.broker.rules``), so the runbooks
are the agent's whole permission set:

* a **read** for each ``investigate`` entry and each catalog action's ``precondition`` read, issued on
  the declaration alone, for at most the broker's ``MAX_TTL_S``;
* a **write** for each catalog action (its verb), issued only with signed approvals that meet the
  action's policy, once per step and run, for at most the step's timeout; and its **undo** verb,
  issued only after that step's write, for the same time.

Nothing is granted without a declaration, and no write without approvals: the agent's standing
write access is none, by construction. ``privileges.lock.json`` is the reviewed baseline; ``diff``
names every widening so that a runbook change that widens privilege fails CI until the lock moves
in the same commit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from datetime import datetime
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from firebreak.escaping import placeholders
from firebreak.runbook import Runbook, parse_duration
from firebreak.signing import MAX_TTL_S

Kind = Literal["read", "write", "undo"]
Class = Literal["observability read", "change-record read", "catalog read", "low-risk write", "high-risk write"]
LOCK_FILE = "privileges.lock.json"


@dataclass
class Privilege:
    target: str
    verb: str
    resource: str  # the template, e.g. service/{service}
    params: dict[str, str]  # each param the template uses, with its pattern
    kind: Kind
    classification: Class
    risk: str = ""
    approvers: int = 0  # distinct people needed; 0 for reads
    groups: list[str] = field(default_factory=list)
    separation_of_duties: bool = False  # the requester and the agent never count
    max_ttl_s: float = MAX_TTL_S
    runbooks: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.kind} {self.target} {self.verb} {self.resource}"


def _classify(target: str, verb: str, kind: Kind, risk: str) -> Class:
    if kind == "read":
        if verb.startswith("catalog."):
            return "catalog read"
        if target == "prometheus" or verb.startswith("metrics."):
            return "observability read"
        return "change-record read"
    return "low-risk write" if risk == "low" else "high-risk write"


def _params(runbook: Runbook, template: str) -> dict[str, str]:
    return {name: runbook.params[name].pattern for name in sorted(placeholders(template)) if name in runbook.params}


def privileges(runbooks: Iterable[Runbook]) -> list[Privilege]:
    """Every privilege the agent can hold, merged across runbooks (the strictest policy wins nothing:
    where runbooks differ, the widest one is what the agent can get, so that is what is reported)."""
    merged: dict[str, Privilege] = {}

    def add(p: Privilege) -> None:
        seen = merged.get(p.key)
        if seen is None:
            merged[p.key] = p
            return
        seen.runbooks = sorted(set(seen.runbooks) | set(p.runbooks))
        seen.params = {**p.params, **seen.params}
        seen.max_ttl_s = max(seen.max_ttl_s, p.max_ttl_s)
        if p.kind != "read" and (p.approvers, len(p.groups)) != (seen.approvers, len(seen.groups)):
            seen.approvers = min(seen.approvers, p.approvers)
            seen.groups = sorted(set(seen.groups) | set(p.groups))

    for book in runbooks:
        for spec in book.investigate:
            add(Privilege(target=spec.target, verb=spec.scope, resource=spec.resource,
                          params=_params(book, spec.resource), kind="read",
                          classification=_classify(spec.target, spec.scope, "read", ""), runbooks=[book.name]))
            if spec.follow:  # a catalog walk's further reads: one named entity each
                add(Privilege(target=spec.target, verb=spec.scope, resource=spec.follow,
                              params=_params(book, spec.follow), kind="read",
                              classification=_classify(spec.target, spec.scope, "read", ""), runbooks=[book.name]))
        for name, action in book.remediate.actions.items():
            policy = book.remediate.policy_for(action)
            timeout = parse_duration(action.timeout).total_seconds()
            common = dict(target=action.target, resource=action.resource, params=_params(book, action.resource),
                          risk=action.risk, approvers=policy.approvers, groups=sorted(policy.groups),
                          separation_of_duties=True, max_ttl_s=min(timeout, MAX_TTL_S), runbooks=[book.name])
            add(Privilege(verb=action.verb, kind="write",
                          classification=_classify(action.target, action.verb, "write", action.risk), **common))
            if action.undo is not None:
                add(Privilege(verb=action.undo.verb, kind="undo",
                              classification=_classify(action.target, action.undo.verb, "undo", action.risk),
                              **common))
            if action.precondition is not None:
                verb = f"{action.target}.read"
                add(Privilege(target=action.target, verb=verb, resource=action.resource,
                              params=_params(book, action.resource), kind="read",
                              classification=_classify(action.target, verb, "read", ""), runbooks=[book.name]))
    return sorted(merged.values(), key=lambda p: (p.kind != "read", p.target, p.verb, p.resource, p.kind))


def report(runbooks: Iterable[Runbook]) -> dict[str, Any]:
    found = privileges(runbooks)
    return {
        "agent": "firebreak-agent",
        # Every write needs approvals the broker verifies itself; no verb is issued without a declaration.
        "standing_write_access": "none",
        "privileges": [asdict(p) for p in found],
        "mcp_tools": _mcp_tools(),
    }


def _mcp_tools() -> list[dict[str, Any]]:
    """The tools `firebreak mcp` offers AI agents (firebreak/mcp/tools.py): locked, like the runbooks' privileges."""
    from firebreak.mcp.tools import tools_report

    return tools_report()


def identity_lines(identity: dict[str, Any]) -> list[str]:
    """The agent identity (owner, environment, credential age) in words, for every human format."""
    lines = [f"Identity: `{identity['agent']}`, owner **{identity['owner']}**, environment **{identity['environment']}** "
             f"(every token's audience is `TARGET@{identity['environment']}`; a target in another environment "
             "refuses it)."]
    age = identity.get("credential_age_s")
    if age is None:
        lines.append(f"Bootstrap credential: not found here; maximum age {identity['credential_max_age']}.")
    else:
        state = ("OVERDUE: rotate it with `firebreak creds rotate`" if identity.get("credential_overdue")
                 else "within its maximum age")
        lines.append(f"Bootstrap credential: issued or last rotated {identity['credential_issued_at']}, "
                     f"{age / 86400:.1f} days old, maximum age {identity['credential_max_age']}: {state}.")
    return lines


def markdown(data: dict[str, Any]) -> str:
    lines = [f"# Privileges of {data['agent']}", ""]
    if data.get("identity"):
        lines += [*identity_lines(data["identity"]), ""]
    lines += [f"Standing write access: **{data['standing_write_access']}**.",
              "", "| class | kind | target | verb | resource | params | approval | max TTL | runbooks |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in data["privileges"]:
        params = ", ".join(f"`{k}` ~ `{v}`" for k, v in p["params"].items()) or "-"
        if p["kind"] == "read":
            approval = "declared read: no approval"
        elif p["kind"] == "undo":
            approval = f"only after its step's write ({p['approvers']} of {', '.join(p['groups'])} approved it)"
        else:
            approval = (f"{p['approvers']} of {', '.join(p['groups'])}"
                        + ("; never the requester or the agent" if p["separation_of_duties"] else ""))
        lines.append(f"| {p['classification']} | {p['kind']} | {p['target']} | `{p['verb']}` | `{p['resource']}` | "
                     f"{params} | {approval} | {p['max_ttl_s']:.0f}s | {', '.join(p['runbooks'])} |")
    if data.get("mcp_tools"):
        lines += ["", "AI agents' MCP tools (`firebreak mcp`): "
                  + ", ".join(f"`{t['name']}` ({t['kind']}{', writes' if t['writes'] else ''})"
                              for t in data["mcp_tools"]) + "."]
    for agent in data.get("agents", []):
        state = "REVOKED" if agent["revoked"] else f"expires {agent['expires']}"
        lines.append(f"- agent `{agent['name']}` for {agent['owner']} ({state}): "
                     + ", ".join(f"`{t}`" for t in agent["tools"]))
    return "\n".join(lines) + "\n"


def diff(baseline: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(widenings, narrowings), each a sentence naming the privilege and what changed."""
    before = {_key(p): p for p in baseline.get("privileges", [])}
    now = {_key(p): p for p in current.get("privileges", [])}
    widen: list[str] = []
    narrow: list[str] = []
    targets_before = {p["target"] for p in before.values()}
    for key, p in now.items():
        old = before.get(key)
        if old is None:
            new_target = "" if p["target"] in targets_before else f" (a new target, {p['target']!r})"
            widen.append(f"new {p['kind']} privilege: {p['verb']} on {p['target']} {p['resource']}{new_target}")
            continue
        for wider, change in _changes(old, p):
            (widen if wider else narrow).append(f"{key}: {change}")
    for key, p in before.items():
        if key not in now:
            narrow.append(f"removed {p['kind']} privilege: {p['verb']} on {p['target']} {p['resource']}")
    tools_before = {t["name"]: t for t in baseline.get("mcp_tools", [])}
    for tool in current.get("mcp_tools", []):
        old_tool = tools_before.pop(tool["name"], None)
        if old_tool is None:
            widen.append(f"new MCP tool for AI agents: {tool['name']} ({tool['kind']}"
                         + (", WRITE-CAPABLE)" if tool["writes"] else ")"))
        elif (tool["kind"], tool["writes"]) != (old_tool["kind"], old_tool["writes"]):
            widen.append(f"MCP tool {tool['name']}: {old_tool['kind']} -> {tool['kind']}"
                         + (", now WRITE-CAPABLE" if tool["writes"] and not old_tool["writes"] else ""))
    narrow.extend(f"removed MCP tool: {name}" for name in sorted(tools_before))
    if current.get("standing_write_access") != "none":
        widen.append(f"standing write access is {current.get('standing_write_access')!r}, not 'none'")
    return widen, narrow


def _key(p: dict[str, Any]) -> str:
    return f"{p['kind']} {p['target']} {p['verb']} {p['resource']}"


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[bool, str]]:
    """(widens?, what) for each difference between the baseline's privilege and the current one."""
    out: list[tuple[bool, str]] = []
    for name in sorted(set(old["params"]) | set(new["params"])):
        if old["params"].get(name) != new["params"].get(name):
            # Whether one regex matches more than another is not decidable in general: review any change.
            out.append((True, f"param {name!r} pattern {old['params'].get(name)!r} -> {new['params'].get(name)!r}"))
    if new["kind"] != "read":
        if new["approvers"] != old["approvers"]:
            out.append((new["approvers"] < old["approvers"], f"approvers {old['approvers']} -> {new['approvers']}"))
        added, removed = set(new["groups"]) - set(old["groups"]), set(old["groups"]) - set(new["groups"])
        if added:
            out.append((True, f"approver groups added {sorted(added)}"))
        if removed:
            out.append((False, f"approver groups removed {sorted(removed)}"))
        if old["separation_of_duties"] != new["separation_of_duties"]:
            out.append((old["separation_of_duties"],
                        "separation of duties " + ("removed" if old["separation_of_duties"] else "added")))
    if new["max_ttl_s"] != old["max_ttl_s"]:
        out.append((new["max_ttl_s"] > old["max_ttl_s"], f"max TTL {old['max_ttl_s']:.0f}s -> {new['max_ttl_s']:.0f}s"))
    return out


def load_lock(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def covers(privilege: dict[str, Any], kind: str, target: str, verb: str, resource: str) -> bool:
    """Whether a privilege of the report grants this (kind, target, verb) on this concrete resource."""
    if (privilege["kind"], privilege["target"], privilege["verb"]) != (kind, target, verb):
        return False
    parts, pos = [], 0
    for m in re.finditer(r"\{([a-z][a-z0-9_]*)\}", privilege["resource"]):
        parts.append(re.escape(privilege["resource"][pos:m.start()]))
        parts.append(f"(?:{privilege['params'].get(m.group(1), '.+').removeprefix('^').removesuffix('$')})")
        pos = m.end()
    parts.append(re.escape(privilege["resource"][pos:]))
    return re.fullmatch("".join(parts), resource) is not None


def incident_params(runbooks: Iterable[Runbook]) -> Callable[[str], dict[str, str] | None]:
    """An incident id -> the params its runbook's ``incident_key`` was rendered from (None if no runbook's).

    Matched as a prefix, each placeholder against its param's pattern: what a mint recorded (its
    workflow id) then says which template it used, where two templates cover the same resource.
    """
    keys: list[re.Pattern[str]] = []
    for book in runbooks:
        template, parts, pos = book.match.incident_key, [], 0
        for m in re.finditer(r"\{([a-z][a-z0-9_]*)\}", template):
            param = book.params.get(m.group(1))
            pattern = param.pattern.removeprefix("^").removesuffix("$") if param else "[^.]+"
            parts.append(re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>{pattern})")
            pos = m.end()
        keys.append(re.compile("".join(parts) + re.escape(template[pos:])))

    def params(incident_id: str) -> dict[str, str] | None:
        for key in keys:
            if (found := key.match(incident_id)) is not None:
                return found.groupdict()
        return None

    return params


def _bound(template: str, params: dict[str, str]) -> str | None:
    """The template with every placeholder filled from ``params``; None if one is not among them."""
    names = placeholders(template)
    if not names or any(n not in params for n in names):
        return None
    return re.sub(r"\{([a-z][a-z0-9_]*)\}", lambda m: params[m.group(1)], template)


def usage(data: dict[str, Any], audit_records: Iterable[dict[str, Any]], *, since: float,
          runbooks: Iterable[Runbook] = ()) -> dict[str, Any]:
    """Each privilege with its mints since ``since`` (count, last use) from the broker's audit log,
    and the never-used ones flagged, like a cloud IAM "last accessed" report.

    A mint counts once, for the template it was made from: the one its incident's params fill in
    exactly (``service/{service}`` for the alerting service), else one filled by a derived param
    (``service/{dependency}``). Where the incident cannot be told (no ``runbooks``, an unknown id), it
    counts for every template that covers it: "never used" then flags only what surely was not."""
    rows = [{**p, "uses": 0, "last_used": None} for p in data["privileges"]]
    params_of = incident_params(runbooks)
    for record in audit_records:
        if record.get("event") != "mint" or not isinstance(record.get("scope"), dict):
            continue
        if datetime.fromisoformat(str(record["at"]).replace("Z", "+00:00")).timestamp() < since:
            continue
        verb, resource = record["scope"].get("verb", ""), str(record["scope"].get("resource", ""))
        covering = [row for row in rows
                    if not (row["kind"] != "read" and verb.endswith(".read"))
                    and covers({**row, "kind": "x"}, "x", str(record.get("audience")), verb, resource)]
        params = params_of(str(record.get("workflow_id", "")))
        if params is not None and len(covering) > 1:
            exact = [row for row in covering if _bound(row["resource"], params) == resource]
            derived = [row for row in covering if placeholders(row["resource"]) - set(params)]
            covering = exact or derived or covering
        for row in covering:
            row["uses"] += 1
            row["last_used"] = max(row["last_used"] or "", str(record["at"]))
    return {**data, "usage_since": since, "privileges": rows,
            "never_used": [_key(r) for r in rows if r["uses"] == 0]}
