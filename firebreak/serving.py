"""An ASGI app served by uvicorn in a background thread: the in-process form of each service.

The socket is bound before uvicorn starts (port 0 picks a free one), so there
is no race for the port, and ``start()`` returns only once it accepts requests.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Self

import uvicorn


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) (0: a free one), for ``uvicorn.Server.serve(sockets=[...])``.

    IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto
    says TCP, and accepted connections inherit it. With Nagle on, a response written as headers then body
    waits for the client's delayed ACK: every request took 40 ms more (measured by bench/pipeline.py).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class ThreadedServer:
    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, name: str = "server") -> None:
        self.app = app
        self.host = host
        self.port = port
        self.name = name
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> Self:
        sock = listening_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        # uvicorn installs signal handlers only on the main thread, so this thread leaves them alone.
        server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off"))
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
