"""Agents as identities: their tokens, their receipt keys, the audit log and the rate limits.

An agent's bearer token is shown once (written 0600 to ``STATE/agents/NAME.token``);
the roster keeps only its SHA-256. The MCP server keeps the agent's receipt key
(``STATE/mcp/keys/NAME.pem``, 0600): the agent never holds a key, only its token.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml

from firebreak import signing
from firebreak.contracts import canonical_json
from firebreak.roster import Agent, Roster, RosterSource, agent_entry_yaml, token_digest

TOKEN_PREFIX = "fbagent_"
MAX_TOKEN_CHARS = 512


def token_path(state_dir: str | Path, name: str) -> Path:
    return Path(state_dir) / "agents" / f"{name}.token"


def receipt_key_path(state_dir: str | Path, name: str) -> Path:
    return Path(state_dir) / "mcp" / "keys" / f"{name}.pem"


def audit_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "mcp" / "audit.jsonl"


def create_agent(state_dir: str | Path, roster_path: str | Path, name: str, owner: str, *,
                 expires: datetime | None = None, tools: list[str] | None = None) -> Path:
    """Add an agent to the roster; its token goes to ``STATE/agents/NAME.token`` (0600). Returns that path.

    The entry is put before ``people:``, so that appending a ``firebreak keys new`` entry to the
    file still adds a person.
    """
    state_dir, roster_path = Path(state_dir), Path(roster_path)
    roster = Roster.load(roster_path)
    if roster.agent(name) is not None or roster.get(name) is not None:
        raise ValueError(f"{name!r} is already in the roster {roster_path}")
    if roster.get(owner) is None:
        raise ValueError(f"owner {owner!r} is not a person in the roster {roster_path}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = signing.generate_key()
    key_file = receipt_key_path(state_dir, name)
    key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    signing.write_private_key(key_file, key)
    expires = expires or datetime.now(UTC) + timedelta(days=30)
    entry = agent_entry_yaml(name, owner, expires, token_digest(token), signing.public_pem(key), tools)
    text = roster_path.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if data.get("agents"):
        text = re.sub(r"(?m)^agents:[ \t]*\n", lambda m: m.group(0) + entry, text, count=1)
    else:
        text = re.sub(r"(?m)^agents:.*\n", "", text)
        text = "agents:\n" + entry + text
    Roster.parse(text, str(roster_path))  # never write a roster that does not load
    roster_path.write_text(text, encoding="utf-8")
    path = token_path(state_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return path


def read_token_file(path: str | Path) -> str:
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"{path}: no agent token in it")
    return token


def arguments_digest(arguments: Mapping[str, Any] | None) -> str:
    """SHA-256 of the arguments' canonical JSON: the log names what was asked without keeping it."""
    try:
        data = canonical_json(dict(arguments or {}))
    except (TypeError, ValueError):
        data = repr(arguments).encode("utf-8", "replace")
    return hashlib.sha256(data).hexdigest()


Outcome = Literal["ok", "error", "refused"]


class AuditLog:
    """Append-only JSONL: one line per tool call and per refusal, fsynced before the answer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def record(self, *, agent: str | None, owner: str | None, tool: str, arguments: Mapping[str, Any] | None,
               outcome: Outcome, detail: str = "", transport: str = "") -> None:
        line = json.dumps({
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "agent": agent, "owner": owner, "tool": tool, "arguments_sha256": arguments_digest(arguments),
            "outcome": outcome, "detail": detail[:500], "transport": transport,
        }, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class RateLimits:
    """Per agent, over sliding windows: every call, and proposals (which open incidents) apart."""

    calls_per_minute: int = 60
    proposals_per_hour: int = 20
    _calls: dict[str, deque[float]] = field(default_factory=dict)
    _proposals: dict[str, deque[float]] = field(default_factory=dict)

    def admit(self, agent: str, proposal: bool, now: float | None = None) -> str | None:
        """None if admitted (and counted), else why not."""
        now = time.monotonic() if now is None else now
        calls = _window(self._calls, agent, now, 60.0)
        if len(calls) >= self.calls_per_minute:
            return f"rate limit: agent {agent!r} made {len(calls)} calls in the last minute (at most {self.calls_per_minute})"
        if proposal:
            proposals = _window(self._proposals, agent, now, 3600.0)
            if len(proposals) >= self.proposals_per_hour:
                return (f"rate limit: agent {agent!r} made {len(proposals)} proposals in the last hour "
                        f"(at most {self.proposals_per_hour})")
            proposals.append(now)
        calls.append(now)
        return None


def _window(windows: dict[str, deque[float]], agent: str, now: float, span: float) -> deque[float]:
    window = windows.setdefault(agent, deque())
    while window and window[0] <= now - span:
        window.popleft()
    return window


class AgentRefused(Exception):
    """A credential or a call refused; the message says why (never the token)."""


class AgentGate:
    """Who is calling: the roster, reloaded on change, decides on every call (a revoked token stops at once)."""

    REFUSALS_RECORDED_PER_MINUTE = 120  # per agent, or for all unknown tokens together: a flood cannot fill the disk

    def __init__(self, roster_path: str | Path, audit: AuditLog, limits: RateLimits | None = None) -> None:
        self.roster = RosterSource(roster_path)
        self.audit = audit
        self.limits = limits or RateLimits()
        self._refusals: dict[str, deque[float]] = {}
        self._unrecorded: dict[str, int] = {}

    def authenticate(self, token: str | None) -> Agent:
        roster = self.roster.get()
        if roster is None:
            raise AgentRefused(f"no roster: {self.roster.error}")
        if not token:
            raise AgentRefused("no agent token (stdio: --token-file PATH; HTTP: Authorization: Bearer TOKEN)")
        if len(token) > MAX_TOKEN_CHARS:
            raise AgentRefused("agent token: too long")
        agent = roster.agent_by_token(token)
        if agent is None:
            raise AgentRefused("agent token: not a token of any agent in the roster")
        why = agent.refusal()
        if why is not None:
            raise AgentRefused(why)
        if roster.get(agent.owner) is None:
            raise AgentRefused(f"agent {agent.name!r}: its owner {agent.owner!r} is no longer in the roster")
        return agent

    def refuse(self, token: str | None, tool: str, arguments: Mapping[str, Any] | None, why: str,
               transport: str) -> None:
        """Record a refusal; the agent is named when the token is one, whatever its state."""
        roster = self.roster.get()
        agent = roster.agent_by_token(token) if roster is not None and token and len(token) <= MAX_TOKEN_CHARS else None
        who = agent.name if agent else ""
        window = _window(self._refusals, who, time.monotonic(), 60.0)
        if len(window) >= self.REFUSALS_RECORDED_PER_MINUTE:
            self._unrecorded[who] = self._unrecorded.get(who, 0) + 1  # counted, and said in the next line recorded
            return
        window.append(time.monotonic())
        unrecorded = self._unrecorded.pop(who, 0)
        if unrecorded:
            why += f" (and {unrecorded} earlier refusal(s) over the recording limit, not recorded one by one)"
        self.audit.record(agent=agent.name if agent else None, owner=agent.owner if agent else None, tool=tool,
                          arguments=arguments, outcome="refused", detail=why, transport=transport)


DEMO_AGENT, DEMO_AGENT_OWNER = "assistant", "bob"


def ensure_demo_agent(state_dir: str | Path, roster_path: str | Path) -> Path:
    """The embedded stack's demo agent `assistant`, owned by bob; its token at STATE/agents/assistant.token."""
    path = token_path(state_dir, DEMO_AGENT)
    if Roster.load(roster_path).agent(DEMO_AGENT) is None:
        return create_agent(state_dir, roster_path, DEMO_AGENT, DEMO_AGENT_OWNER)
    return path


def revoke_agent(roster_path: str | Path, name: str) -> None:
    """Mark an agent revoked in the roster file: the MCP server refuses its next call (it reloads on change)."""
    roster_path = Path(roster_path)
    text = roster_path.read_text(encoding="utf-8")
    line = f"    name: {json.dumps(name)}\n"
    if Roster.parse(text, str(roster_path)).agent(name) is None or text.count(line) != 1:
        raise ValueError(f"no agent {name!r} written as `firebreak mcp` writes them in {roster_path}")
    text = text.replace(line, line + "    revoked: true\n")
    Roster.parse(text, str(roster_path))
    roster_path.write_text(text, encoding="utf-8")
