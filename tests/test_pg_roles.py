"""The broker's PostgreSQL step roles, enforced by a real PostgreSQL server (Debian's).

PostgreSQL itself refuses what a step's role was not granted, a role after its revocation or its
expiry, and a session of a role whose step ended. Nothing is mocked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from demo.postgres import PostgresCluster, pg_bindir
from firebreak.broker.pg_roles import PostgresRoleIssuer, RoleGrants, RoleRefused, role_name

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(pg_bindir() is None, reason="PostgreSQL not installed (scripts/setup installs it)")]

READ = RoleGrants(member_of=("pg_read_all_stats",))
CANCEL = RoleGrants(execute=("ops.cancel_blockers(integer, text)",))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    with PostgresCluster(tmp_path_factory.mktemp("pg")) as pg:
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute("CREATE TABLE payments_secrets (card text)")
            admin.execute("INSERT INTO payments_secrets VALUES ('4111-1111')")
            admin.execute("CREATE SCHEMA ops")
            # What an operator installs: the one remediation, SECURITY DEFINER, not PUBLIC's to call.
            admin.execute("""CREATE FUNCTION ops.cancel_blockers(older_than_s integer, key text) RETURNS integer
                             LANGUAGE sql SECURITY DEFINER AS $$ SELECT 0 $$""")
            admin.execute("REVOKE EXECUTE ON FUNCTION ops.cancel_blockers(integer, text) FROM PUBLIC")
            admin.execute("CREATE FUNCTION ops.drop_everything() RETURNS integer LANGUAGE sql AS $$ SELECT 1 $$")
            admin.execute("REVOKE EXECUTE ON FUNCTION ops.drop_everything() FROM PUBLIC")
        yield pg


@pytest.fixture
def issuer(cluster: PostgresCluster) -> PostgresRoleIssuer:
    return PostgresRoleIssuer(cluster.dsn())


def grant_id() -> str:
    return uuid.uuid4().hex


def soon(seconds: int = 120) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


def connect(cluster: PostgresCluster, credential) -> psycopg.Connection:
    return psycopg.connect(cluster.dsn(credential.role, credential.password), autocommit=True)


def test_a_read_role_sees_every_session_and_nothing_else(cluster, issuer):
    gid = grant_id()
    credential = issuer.mint(gid, soon(), READ)
    with connect(cluster, credential) as conn:
        # pg_read_all_stats: other roles' query text is visible, as an investigation needs.
        queries = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query <> '<insufficient privilege>'"
                               " AND usename <> current_user").fetchone()
        assert queries is not None
        for statement in ("SELECT * FROM payments_secrets", "DROP TABLE payments_secrets",
                          "SELECT ops.cancel_blockers(30, 'k')", "CREATE TABLE t (x int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    issuer.revoke(gid)


def test_a_write_role_calls_its_one_function_and_nothing_else(cluster, issuer):
    gid = grant_id()
    credential = issuer.mint(gid, soon(), CANCEL)
    with connect(cluster, credential) as conn:
        assert conn.execute("SELECT ops.cancel_blockers(30, 'incident-1/step-1')").fetchone() == (0,)
        for statement in ("SELECT ops.drop_everything()", "SELECT * FROM payments_secrets",
                          "DROP TABLE payments_secrets"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    issuer.revoke(gid)


def test_after_revoke_the_role_is_gone_and_its_open_session_is_ended(cluster, issuer):
    gid = grant_id()
    credential = issuer.mint(gid, soon(), READ)
    session = connect(cluster, credential)
    assert session.execute("SELECT 1").fetchone() == (1,)
    assert issuer.revoke(gid) is True
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")  # terminated by the broker, not left running with a dropped role
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(cluster, credential)
    assert issuer.revoke(gid) is False


def test_postgres_refuses_a_role_past_its_valid_until(cluster, issuer):
    gid = grant_id()
    credential = issuer.mint(gid, datetime.now(timezone.utc) + timedelta(seconds=2), READ)
    with connect(cluster, credential):
        pass
    time.sleep(2.5)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(cluster, credential)
    issuer.revoke(gid)


def test_one_session_at_a_time(cluster, issuer):
    gid = grant_id()
    credential = issuer.mint(gid, soon(), READ)
    with connect(cluster, credential):
        with pytest.raises(psycopg.OperationalError, match="too many connections"):
            connect(cluster, credential)
    issuer.revoke(gid)


def test_the_sweeper_drops_expired_and_unknown_roles_and_keeps_live_ones(cluster, issuer):
    live, expired, orphan = grant_id(), grant_id(), grant_id()
    issuer.mint(live, soon(), READ)
    issuer.mint(expired, datetime.now(timezone.utc) - timedelta(seconds=1), READ)
    issuer.mint(orphan, soon(), READ)  # a broker restart lost it: not in the live set
    dropped = issuer.sweep(datetime.now(timezone.utc), live=[live])
    assert set(dropped) == {role_name(expired), role_name(orphan)}
    assert issuer.sweep(datetime.now(timezone.utc), live=[]) == [role_name(live)]
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        assert admin.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'firebreak\\_%'").fetchone() == (0,)


def test_only_declared_grants_are_issued(issuer):
    for grants, field in ((RoleGrants(), "grants"), (RoleGrants(member_of=("pg_write_all_data",)), "member_of"),
                          (RoleGrants(execute=("ops.f(); DROP TABLE x",)), "execute")):
        with pytest.raises(RoleRefused, match=field):
            issuer.mint(grant_id(), soon(), grants)
