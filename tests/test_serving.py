"""The services' listening sockets: every accepted connection has Nagle off.

asyncio sets TCP_NODELAY only on sockets whose proto says TCP; a socket made with the defaults (proto 0)
kept Nagle on, and each response written as headers then body waited for the client's delayed ACK
(40 ms a request, the broker's and the fleet's alike, until bench/pipeline.py showed it).
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from firebreak.serving import listening_socket


async def _nodelay_of_accepted(sock: socket.socket) -> int:
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(handle, sock=sock)
    async with server:
        host, port = sock.getsockname()
        _, writer = await asyncio.open_connection(host, port)
        value = await asyncio.wait_for(accepted, 5)
        writer.close()
    return value


@pytest.mark.integration
async def test_connections_accepted_on_a_service_socket_have_nagle_off() -> None:
    assert await _nodelay_of_accepted(listening_socket("127.0.0.1", 0)) != 0


@pytest.mark.integration
async def test_a_socket_made_with_the_defaults_would_keep_nagle_on() -> None:
    # What the services used before: the reason listening_socket exists.
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    plain.bind(("127.0.0.1", 0))
    assert await _nodelay_of_accepted(plain) == 0
