"""A real PostgreSQL server of its own, on loopback, from Debian's ``postgresql`` package.

Each cluster lives in a directory of the caller's (its data, socket and log) and listens on a port
of its own, so tests and demos run side by side. PostgreSQL refuses to run as root: when we are
root, the cluster runs as the ``postgres`` user that Debian's package creates, in a directory of
its own under /tmp (the caller's may sit below a root-only one, as pytest's do), removed on stop.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Self

from demo.prom import free_port


def pg_bindir() -> Path | None:
    """Debian installs the server under /usr/lib/postgresql/<major>/bin; the newest wins."""
    override = os.environ.get("FIREBREAK_PG_BINDIR")
    if override:
        return Path(override) if (Path(override) / "initdb").exists() else None
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


class PostgresCluster:
    """``initdb`` + ``pg_ctl start`` in ``directory``, listening on 127.0.0.1:``port``.

    Every login, the superuser's included, authenticates with a password (scram-sha-256), so a role's
    password and its ``VALID UNTIL`` are enforced by PostgreSQL as on a real server. The superuser's
    password is generated here and kept in :attr:`password` (and a 0600 file), never logged.
    """

    def __init__(self, directory: Path, *, port: int | None = None, superuser: str = "firebreak") -> None:
        self.directory = directory
        self.port = port or free_port()
        self.superuser = superuser
        bindir = pg_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL is not installed (Debian: apt-get install postgresql; "
                                    "bash scripts/setup installs it)")
        self.bindir = bindir
        self.as_postgres = os.geteuid() == 0
        self.home = Path(tempfile.mkdtemp(prefix="firebreak-pg-")) if self.as_postgres else directory
        self.password = secrets.token_urlsafe(24)

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = "postgres") -> str:
        """A libpq connection string for ``user`` (default: the superuser, with its password)."""
        user = user or self.superuser
        password = self.password if password is None and user == self.superuser else (password or "")
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user} password={password} connect_timeout=5"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def log(self) -> Path:
        return self.home / "postgres.log"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    def start(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            owner = pwd.getpwnam("postgres")
            os.chown(self.home, owner.pw_uid, owner.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            pwfile = self.home / "superuser.password"
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(self.password + "\n")
            if self.as_postgres:
                owner = pwd.getpwnam("postgres")
                os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            done = self._run("initdb", "-D", str(self.data), "-A", "scram-sha-256", "--pwfile", str(pwfile),
                             "-U", self.superuser, "-E", "UTF8")
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed: {done.stderr.strip()[-500:]}")
        options = f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1"
        done = self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")
        if done.returncode != 0:
            log = self.log.read_text()[-800:] if self.log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {done.stderr.strip()[-300:]} {log}")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        if self.as_postgres:
            if self.log.exists():
                shutil.copyfile(self.log, self.directory / "postgres.log")
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
