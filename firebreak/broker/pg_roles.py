"""The broker mints PostgreSQL login roles: a database's native credential for one step, as Vault does.

The broker alone holds the database admin credential; the worker never does. For each grant it
creates a login role named after the grant (``firebreak_<jti>``) with a random password,
``VALID UNTIL`` the grant's expiry, one connection at a time, and exactly what the action declares:
membership in predefined roles (``pg_read_all_stats`` for an investigation's read) and ``EXECUTE``
on named remediation functions. Never free SQL: a write is a call to a function the operator
installed, with ``EXECUTE`` revoked from PUBLIC (see :data:`OPERATOR_NOTE`).

On revoke, and for any ``firebreak_%`` role past its expiry or no longer live (the sweeper), the
role's sessions are terminated and the role is dropped: nothing outlives its grant.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import sql

ROLE_PREFIX = "firebreak_"
# Identifiers the catalog may name: lower-case SQL identifiers, never quoted tricks.
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
FUNCTION = re.compile(r"(?P<schema>[a-z_][a-z0-9_]{0,62})\.(?P<name>[a-z_][a-z0-9_]{0,62})"
                      r"\((?P<args>(?:[a-z_][a-z0-9_ ]{0,62}(?:, ?[a-z_][a-z0-9_ ]{0,62})*)?)\)")
PREDEFINED_ROLES = frozenset({"pg_read_all_stats", "pg_monitor", "pg_read_all_settings", "pg_signal_backend"})

OPERATOR_NOTE = """\
A remediation function is installed by the operator, owned by a role that may do what it does,
SECURITY DEFINER, with EXECUTE revoked from PUBLIC (PostgreSQL grants it to PUBLIC by default):
    REVOKE EXECUTE ON FUNCTION ops.cancel_blockers(integer, text) FROM PUBLIC;
The broker then grants EXECUTE on it to one step's role, for that step only.
"""


class RoleRefused(ValueError):
    """What an action declares is not a grant the broker issues (the reason names the field)."""


@dataclass(frozen=True)
class RoleGrants:
    """What one step's role may do, from the runbook's catalog (never from the worker)."""

    member_of: tuple[str, ...] = ()
    execute: tuple[str, ...] = ()  # "schema.function(argtype, ...)"

    def problems(self) -> list[str]:
        out = [f"member_of: {r[:40]!r} is not a predefined role the broker grants" for r in self.member_of
                if r not in PREDEFINED_ROLES]
        out += [f"execute: {f[:80]!r} is not schema.function(argtypes)" for f in self.execute
                if not FUNCTION.fullmatch(f)]
        if not self.member_of and not self.execute:
            out.append("grants: none declared (a role with nothing to do is not issued)")
        return out


@dataclass(frozen=True)
class PostgresCredential:
    """Returned to the activity alone: it connects with it, and the broker drops it on revoke."""

    role: str
    password: str = field(repr=False)
    valid_until: datetime


def role_name(grant_id: str) -> str:
    name = ROLE_PREFIX + re.sub(r"[^a-z0-9]", "_", grant_id.lower())[:50]
    if not IDENTIFIER.fullmatch(name):
        raise RoleRefused(f"grant id {grant_id[:40]!r} makes no role name")
    return name


def _function(signature: str) -> sql.Composed:
    match = FUNCTION.fullmatch(signature)
    assert match is not None  # RoleGrants.problems checked it
    args = [a.strip() for a in match["args"].split(",") if a.strip()]
    return sql.SQL("{}.{}({})").format(sql.Identifier(match["schema"]), sql.Identifier(match["name"]),
                                      sql.SQL(", ").join(sql.SQL(a) for a in args))


class PostgresRoleIssuer:
    """Creates, drops and sweeps step roles with the admin connection string ``admin_dsn``.

    One issuer serves one database (the DSN's): a role's grants live there, so dropping it there
    leaves nothing behind. Connecting is PUBLIC's by default; what a role does is what it is granted.
    """

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(self.admin_dsn, autocommit=True)

    def mint(self, grant_id: str, valid_until: datetime, grants: RoleGrants) -> PostgresCredential:
        problems = grants.problems()
        if problems:
            raise RoleRefused("; ".join(problems))
        role, password = role_name(grant_id), secrets.token_urlsafe(24)
        ident = sql.Identifier(role)
        with self._admin() as conn, conn.transaction():
            # One transaction: a role exists with all of its grants, or not at all.
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} VALID UNTIL {} CONNECTION LIMIT 1").format(
                ident, sql.Literal(password), sql.Literal(valid_until.isoformat())))
            for member_of in grants.member_of:
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(member_of), ident))
            for signature in grants.execute:
                match = FUNCTION.fullmatch(signature)
                assert match is not None
                conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(match["schema"]), ident))
                conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(_function(signature), ident))
        return PostgresCredential(role=role, password=password, valid_until=valid_until)

    def revoke(self, grant_id: str) -> bool:
        """Terminate the role's sessions and drop it; False when it was already gone."""
        return self._drop(self._admin_roles(only=role_name(grant_id)))

    def sweep(self, now: datetime, live: Iterable[str] = ()) -> list[str]:
        """Drop every ``firebreak_%`` role past its expiry, or whose grant is not in ``live``."""
        keep = {role_name(g) for g in live}
        stale = [role for role, until in self._admin_roles().items()
                 if role not in keep or until is None or until <= now]
        self._drop({role: None for role in stale})
        return stale

    def _admin_roles(self, only: str | None = None) -> dict[str, datetime | None]:
        with self._admin() as conn:
            rows = conn.execute("SELECT rolname, rolvaliduntil FROM pg_roles WHERE rolname LIKE %s",
                                (only if only else ROLE_PREFIX.replace("_", r"\_") + "%",)).fetchall()
        return {name: until for name, until in rows}

    def _drop(self, roles: dict[str, datetime | None]) -> bool:
        if not roles:
            return False
        with self._admin() as conn:
            for role in roles:
                ident = sql.Identifier(role)
                # No new session first, then end the open ones, then drop what it was granted and it.
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
                conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s",
                             (role,))
                conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
                conn.execute(sql.SQL("DROP ROLE {}").format(ident))
        return True
