"""The real Backstage catalog backend, run as a child process, with PostgreSQL as its database.

`demo/backstage-app/` holds the backend (npm's ``@backstage/backend-defaults`` and
``@backstage/plugin-catalog-backend``, pinned by its committed lock file; ``scripts/setup`` runs
``npm ci`` there with Debian's Node). This module writes its configuration (port, database,
catalog files), starts it, and waits until the catalog has ingested every entity it was given, so
a caller reads a catalog that is complete, exactly as Backstage itself serves it.

The default auth policy is disabled: the backend listens on loopback only and serves tests and
the demo; a real deployment points ``targets: catalog:`` at its own Backstage instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Self

import httpx
import yaml

from demo.postgres import PostgresCluster
from demo.prom import free_port

APP_DIR = Path(__file__).resolve().parent / "backstage-app"
KINDS = ["Component", "Resource", "System", "API", "Domain", "Group", "User", "Location"]


def backstage_installed() -> bool:
    """Node is on PATH and `npm ci` has run in demo/backstage-app (scripts/setup does both)."""
    return shutil.which("node") is not None and (APP_DIR / "node_modules" / "@backstage" / "backend-defaults").is_dir()


def expected_entities(files: Iterable[Path]) -> set[str]:
    """``kind:namespace/name`` of every entity in the catalog files, lower-cased as Backstage compares."""
    refs = set()
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                meta = doc["metadata"]
                refs.add(f"{doc['kind']}:{meta.get('namespace', 'default')}/{meta['name']}".lower())
    return refs


class BackstageProcess:
    """Backstage's catalog on ``url``, loading ``catalog_files`` (absolute paths, read as file locations)."""

    def __init__(self, directory: Path, catalog_files: list[Path], *, port: int | None = None) -> None:
        self.directory = directory
        self.catalog_files = [path.resolve() for path in catalog_files]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.postgres = PostgresCluster(directory / "postgres")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.directory / "backstage.log"

    def config(self) -> dict:
        return {
            "backend": {
                "baseUrl": self.url,
                "listen": {"port": self.port, "host": "127.0.0.1"},
                "database": {"client": "pg", "connection": {
                    "host": "127.0.0.1", "port": self.postgres.port, "user": self.postgres.superuser,
                    "password": self.postgres.password}},
                "auth": {"dangerouslyDisableDefaultAuthPolicy": True},
            },
            "catalog": {
                "rules": [{"allow": KINDS}],
                "locations": [{"type": "file", "target": str(path)} for path in self.catalog_files],
            },
        }

    def start(self, timeout: float = 90.0) -> Self:
        if not backstage_installed():
            raise FileNotFoundError("Backstage is not installed (bash scripts/setup runs npm ci in demo/backstage-app)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        config = self.directory / "app-config.yaml"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the database password
        with os.fdopen(fd, "w") as out:
            out.write(yaml.safe_dump(self.config(), sort_keys=False))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["node", str(APP_DIR / "index.js"), "--config", str(config)], cwd=APP_DIR,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "NODE_ENV": "development"},
            )
        try:
            self.wait_loaded(expected_entities(self.catalog_files), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_loaded(self, refs: set[str], timeout: float) -> None:
        """Until every entity in the catalog files is served, relations included (ingestion is async)."""
        deadline = time.monotonic() + timeout
        missing = refs
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Backstage exited with {self.process.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-1500:]}")
            try:
                served = httpx.get(f"{self.url}/api/catalog/entities",
                                   params={"fields": "kind,metadata.namespace,metadata.name,relations"}, timeout=5)
                if served.status_code == 200:
                    entities = served.json()
                    have = {f"{e['kind']}:{e['metadata']['namespace']}/{e['metadata']['name']}".lower()
                            for e in entities if e.get("relations") is not None}
                    missing = refs - have
                    if not missing:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Backstage did not serve {sorted(missing)[:5]} within {timeout:.0f}s; log: {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.postgres.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
