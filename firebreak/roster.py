"""The roster: the people who may approve, their groups and their public keys.

```yaml
people:
  - name: alice
    groups: [oncall-checkout]
    public_key: |
      -----BEGIN PUBLIC KEY-----
      ...
      -----END PUBLIC KEY-----
```

Later an OIDC identity provider can stand in for this file; the broker and the
approval checks only need :meth:`Roster.get`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from firebreak import signing

PersonName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")]


class RosterError(ValueError):
    """A roster that failed to load; the message names the file and the entry."""


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PersonName
    groups: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list)
    public_key: str = Field(description="Ed25519 public key, PEM SubjectPublicKeyInfo")
    _key: Ed25519PublicKey | None = PrivateAttr(default=None)

    @field_validator("public_key")
    @classmethod
    def _ed25519(cls, value: str) -> str:
        signing.load_public_key(value)  # raises ValueError with what is wrong
        return value

    @property
    def key(self) -> Ed25519PublicKey:
        if self._key is None:
            self._key = signing.load_public_key(self.public_key)
        return self._key


class Agent(BaseModel):
    """An AI agent: reads and proposes over MCP (``firebreak mcp``), never approves.

    Not a person: :meth:`Roster.get` never returns one, so no approval signed in its
    name verifies. It authenticates with a bearer token, of which only the SHA-256 is
    kept here; the MCP server signs its receipts with the key whose public half is here,
    naming its ``owner``, who is then a requester and may not approve what it proposes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["agent"]
    name: PersonName
    owner: PersonName = Field(description="the roster person it acts for")
    expires: datetime = Field(description="RFC 3339, with a timezone; refused from then on")
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    public_key: str = Field(description="Ed25519 public key (PEM) of the MCP server's receipt key for this agent")
    revoked: bool = False
    tools: list[Annotated[str, Field(pattern=r"^[a-z_]{1,64}$")]] | None = Field(
        default=None, description="the MCP tools it may call (default: every one the server offers)")
    _key: Ed25519PublicKey | None = PrivateAttr(default=None)

    @field_validator("public_key")
    @classmethod
    def _ed25519(cls, value: str) -> str:
        signing.load_public_key(value)
        return value

    @field_validator("expires")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("expires needs a timezone (e.g. 2026-12-31T00:00:00Z)")
        return value

    @property
    def key(self) -> Ed25519PublicKey:
        if self._key is None:
            self._key = signing.load_public_key(self.public_key)
        return self._key

    def refusal(self, now: datetime | None = None) -> str | None:
        """Why this agent may not act at ``now`` (revoked, expired), else None."""
        if self.revoked:
            return f"agent {self.name!r} is revoked"
        now = now or datetime.now(timezone.utc)
        if now >= self.expires:
            return f"agent {self.name!r} expired at {self.expires.isoformat()}"
        return None


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Roster(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    people: list[Person] = Field(default_factory=list)
    agents: list[Agent] = Field(default_factory=list)
    source: str = Field(default="<roster>", exclude=True)

    def agent(self, name: str) -> Agent | None:
        return next((a for a in self.agents if a.name == name), None)

    def agent_by_token(self, token: str) -> Agent | None:
        """The agent whose token this is (revoked or expired ones too: the caller says why it refuses)."""
        digest = token_digest(token)
        found = None
        for agent in self.agents:  # every entry compared, in constant time
            if hmac.compare_digest(agent.token_sha256, digest):
                found = agent
        return found

    def get(self, name: str) -> Person | None:
        return next((p for p in self.people if p.name == name), None)

    def names(self) -> list[str]:
        return [p.name for p in self.people]

    @classmethod
    def parse(cls, text: str, source: str = "<roster>") -> Roster:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RosterError(f"{source}: not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RosterError(f"{source}: a roster is a mapping with a 'people' list")
        people = data.get("people", [])
        if not isinstance(people, list):
            raise RosterError(f"{source}: people: must be a list")
        extra = set(data) - {"people", "agents"}
        if extra:
            raise RosterError(f"{source}: unknown top-level fields {sorted(extra)}")
        parsed: list[Person] = []
        seen: set[str] = set()
        for i, entry in enumerate(people):
            where = f"{source}: people[{i}]"
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                where += f" ({entry['name']})"
            try:
                person = Person.model_validate(entry)
            except ValidationError as exc:
                raise RosterError(f"{where}: {_first_error(exc)}") from None
            if person.name in seen:
                raise RosterError(f"{where}: duplicate name {person.name!r}")
            seen.add(person.name)
            parsed.append(person)
        agents = _parse_agents(data.get("agents", []), source, seen)
        return cls(people=parsed, agents=agents, source=source)

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RosterError(f"{path}: cannot read roster: {exc.strerror}") from None
        return cls.parse(text, str(path))


class RosterSource:
    """A roster file, reloaded when it changes, so adding a person needs no restart.

    Fails closed: a missing or broken roster verifies nobody, and ``error`` says why.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self._roster: Roster | None = None
        self.error: str | None = None

    def get(self) -> Roster | None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._roster, self._mtime, self.error = None, None, f"no roster at {self.path}"
            return None
        if mtime != self._mtime:
            try:
                self._roster, self.error = Roster.load(self.path), None
            except RosterError as exc:
                self._roster, self.error = None, str(exc)
            self._mtime = mtime
        return self._roster


def _parse_agents(entries: object, source: str, people: set[str]) -> list[Agent]:
    if not isinstance(entries, list):
        raise RosterError(f"{source}: agents: must be a list")
    parsed: list[Agent] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{source}: agents[{i}]"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            where += f" ({entry['name']})"
        try:
            agent = Agent.model_validate(entry)
        except ValidationError as exc:
            raise RosterError(f"{where}: {_first_error(exc)}") from None
        # One namespace: an agent's name in a requester list must never be mistaken for a person's.
        if agent.name in people or agent.name in seen:
            raise RosterError(f"{where}: duplicate name {agent.name!r}")
        if agent.owner not in people:
            raise RosterError(f"{where}: owner: {agent.owner!r} is not a person in this roster")
        seen.add(agent.name)
        parsed.append(agent)
    return parsed


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(entry)"
    message = "unknown field (typo?)" if err["type"] == "extra_forbidden" else err["msg"]
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{field}: {message}{more}"


def entry_yaml(name: str, groups: list[str], public_key_pem: str) -> str:
    """One roster entry, ready to paste under ``people:`` (PEM as a literal block)."""
    pem = "\n".join("      " + line for line in public_key_pem.strip().splitlines())
    # JSON scalars are valid YAML and quote anything unusual in a name or group.
    return (
        f"  - name: {json.dumps(name)}\n"
        f"    groups: {json.dumps(groups)}\n"
        f"    public_key: |\n{pem}\n"
    )


def agent_entry_yaml(name: str, owner: str, expires: datetime, token_sha256: str, public_key_pem: str,
                     tools: list[str] | None = None) -> str:
    """One ``agents:`` entry (JSON scalars are valid YAML)."""
    pem = "\n".join("      " + line for line in public_key_pem.strip().splitlines())
    return (
        f"  - kind: agent\n"
        f"    name: {json.dumps(name)}\n"
        f"    owner: {json.dumps(owner)}\n"
        f"    expires: {json.dumps(expires.isoformat(timespec='seconds'))}\n"
        f"    token_sha256: {json.dumps(token_sha256)}\n"
        + (f"    tools: {json.dumps(tools)}\n" if tools is not None else "")
        + f"    public_key: |\n{pem}\n"
    )
