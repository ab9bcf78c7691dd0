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

import json
from pathlib import Path
from typing import Annotated

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


class Roster(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    people: list[Person] = Field(default_factory=list)
    source: str = Field(default="<roster>", exclude=True)

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
        extra = set(data) - {"people"}
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
        return cls(people=parsed, source=source)

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
