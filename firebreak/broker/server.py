"""Run the broker: in-process for tests (:class:`BrokerServer`) or as a process."""

from __future__ import annotations

from pathlib import Path
from typing import Self

import uvicorn

from firebreak.broker.app import Broker, create_app
from firebreak.broker.checkpoints import checkpoints_path
from firebreak.identity import AgentIdentity
from firebreak.serving import ThreadedServer


class BrokerServer(ThreadedServer):
    """The real broker over real HTTP on a free port, in a background thread.

    ``start()`` returns once it accepts connections; ``stop()`` shuts it down and
    signs a checkpoint of the audit log's head.
    Start it again with the same ``state_dir`` to test what survives a restart.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        roster_path: str | Path | None = None,
        runbooks_dir: str | Path | None = None,
        agent_token: str | None = None,
        admin_token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        identity: AgentIdentity | None = None,
        catalog_url: str | None = None,
    ) -> None:
        super().__init__(None, host=host, port=port, name="firebreak-broker")
        self.state_dir = Path(state_dir)
        self._kwargs = dict(
            roster_path=roster_path, runbooks_dir=runbooks_dir, agent_token=agent_token, admin_token=admin_token,
            identity=identity, catalog_url=catalog_url,
        )
        self.broker: Broker | None = None

    def use_catalog(self, url: str | None) -> None:
        """Point the broker's own catalog reads at ``url`` (tests start the catalog after the broker)."""
        self._kwargs["catalog_url"] = url
        if self.broker is not None:
            self.broker.catalog.url = url.rstrip("/") if url else None
            self.broker.catalog.clear()

    @property
    def agent_token(self) -> str:
        assert self.broker is not None, "start() first"
        return self.broker.agent_token

    @property
    def admin_token(self) -> str:
        assert self.broker is not None, "start() first"
        return self.broker.admin_token

    @property
    def audit_path(self) -> Path:
        return self.state_dir / "broker" / "audit.jsonl"

    @property
    def checkpoints_path(self) -> Path:
        return checkpoints_path(self.audit_path)

    def start(self, timeout: float = 10.0) -> Self:
        # A new Broker on each start: a restart re-reads its state from state_dir.
        self.app = create_app(self.state_dir, **self._kwargs)  # type: ignore[arg-type]
        self.broker = self.app.state.broker
        return super().start(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        # ThreadedServer runs uvicorn with lifespan="off", so the app's shutdown hook never runs here:
        # sign the audit head ourselves, once no request can append any more.
        if self.broker is not None:
            self.broker.audit.close()


def run(
    *,
    host: str,
    port: int,
    state_dir: str | Path,
    roster_path: str | Path | None = None,
    runbooks_dir: str | Path | None = None,
    catalog_url: str | None = None,
) -> None:
    """Serve until interrupted (``python -m firebreak.broker`` / ``firebreak broker``)."""
    app = create_app(state_dir, roster_path=roster_path, runbooks_dir=runbooks_dir, catalog_url=catalog_url)
    broker: Broker = app.state.broker
    print(
        f"firebreak broker on http://{host}:{port}  state {broker.dir}  kid {broker.kid}  "
        f"runbooks {sorted(broker.runbooks)}  catalog {broker.catalog.url or '(none)'}  frozen={broker.state.frozen}",
        flush=True,
    )
    # access_log off: request lines are not secrets, but there is nothing to gain.
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
