"""Running the API: in-process for tests and benchmarks, or as a service.

:class:`ApiServer` serves the app on the caller's event loop, on a port it
binds itself (port 0 = a free one, with no window for another process to take
it), so a test shares one loop and one Temporal client with the API.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

import uvicorn

from firebreak.api.app import create_app
from firebreak.api.gateway import ClientFactory
from firebreak.api.settings import ApiSettings
from firebreak.runbook import Runbook
from firebreak.serving import listening_socket


class ApiServer:
    """``async with ApiServer(settings, client_factory) as api: httpx.post(api.url + ...)``."""

    def __init__(
        self,
        settings: ApiSettings,
        client_factory: ClientFactory | None = None,
        *,
        runbooks: list[Runbook] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.app = create_app(settings, client_factory, runbooks=runbooks)
        self.host = host
        self._socket = listening_socket(host, port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> "ApiServer":
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="firebreak-api")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the API server stopped while starting")
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
        self._socket.close()

    async def __aenter__(self) -> "ApiServer":
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def serve(settings: ApiSettings, *, log_level: str = "info") -> None:
    """Run the API until interrupted (``python -m firebreak.api``, ``firebreak api``)."""
    from firebreak.telemetry import export_from_env

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    export_from_env("firebreak-api")
    app = create_app(settings)
    logging.getLogger("firebreak.api").info(
        "Firebreak API on %s (Temporal %s, namespace %s, task queue %s)", settings.url, settings.temporal.address,
        settings.temporal.namespace, settings.temporal.task_queue,
    )
    # Access logs carry method, path and status only: never a header, so never a token.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level.lower())
