"""Run the broker: in-process for tests (:class:`BrokerServer`) or as a process."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import TracebackType

import uvicorn

from firebreak.broker.app import Broker, create_app


class BrokerServer:
    """The real broker over real HTTP on a free port, in a background thread.

    ``start()`` returns once it accepts connections; ``stop()`` shuts it down.
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
    ) -> None:
        self.state_dir = Path(state_dir)
        self._kwargs = dict(
            roster_path=roster_path, runbooks_dir=runbooks_dir, agent_token=agent_token, admin_token=admin_token
        )
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.broker: Broker | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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

    def start(self, timeout_s: float = 10.0) -> BrokerServer:
        app = create_app(self.state_dir, **self._kwargs)  # type: ignore[arg-type]
        self.broker = app.state.broker
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="firebreak-broker", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("broker did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> BrokerServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run(
    *,
    host: str,
    port: int,
    state_dir: str | Path,
    roster_path: str | Path | None = None,
    runbooks_dir: str | Path | None = None,
) -> None:
    """Serve until interrupted (``python -m firebreak.broker`` / ``firebreak broker``)."""
    app = create_app(state_dir, roster_path=roster_path, runbooks_dir=runbooks_dir)
    broker: Broker = app.state.broker
    print(
        f"firebreak broker on http://{host}:{port}  state {broker.dir}  kid {broker.kid}  "
        f"runbooks {sorted(broker.runbooks)}  frozen={broker.state.frozen}",
        flush=True,
    )
    # access_log off: request lines are not secrets, but there is nothing to gain.
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
