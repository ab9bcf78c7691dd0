"""Fault proxies for the chaos suite: what the worker sees of the fleet and of Prometheus.

The fleet itself must never restart during a run: its change log and idempotency store are the record
the suite counts writes from. So "the target is down" happens between the worker and the fleet, in
:class:`FleetProxy`, an HTTP proxy that recognises each request's incident from its bearer token (the
broker's JWT names the workflow) and can, for that incident only,

* hold a request for a while before forwarding it (a window to kill the worker holding it: the write
  still reaches the fleet, its answer reaches no one);
* refuse it (the connection closes before the fleet sees anything);
* lose the answer (the fleet acts, the connection closes before the worker hears back).

Prometheus sits behind :class:`TcpSwitch`, a byte pump that can be switched off: new connections are
closed at once and open ones are cut, as when the process is gone.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["hold", "refuse", "lose_response"]


def workflow_of(headers: dict[str, str]) -> str | None:
    """The workflow id a request's bearer token was minted for (read only, never verified: a label)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    parts = token.split(".")
    if scheme.lower() != "bearer" or len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    value = claims.get("workflow_id") if isinstance(claims, dict) else None
    return value if isinstance(value, str) else None


@dataclass
class Rule:
    """What to do with the next ``times`` requests of one incident with this HTTP method."""

    workflow_id: str
    method: str
    action: Action
    hold_s: float = 0.0
    until: float = 0.0  # refuse: every matching request until this monotonic time
    times: int = 1
    hits: int = 0
    hit: asyncio.Event = field(default_factory=asyncio.Event)

    def matches(self, method: str, workflow_id: str | None) -> bool:
        if method != self.method or workflow_id != self.workflow_id:
            return False
        if self.action == "refuse":
            return time.monotonic() < self.until
        return self.hits < self.times


class _Listener:
    """A local listener on a free port in front of ``upstream_port``; subclasses serve each connection."""

    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream_port = upstream_port
        self.host = host
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class FleetProxy(_Listener):
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        super().__init__(upstream_port, host)
        self.rules: list[Rule] = []

    def add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    def _match(self, method: str, workflow_id: str | None) -> Rule | None:
        rule = next((r for r in self.rules if r.matches(method, workflow_id)), None)
        if rule is not None:
            rule.hits += 1
            rule.hit.set()
        return rule

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method = lines[0].split(" ", 1)[0]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            rule = self._match(method, workflow_of(headers))
            if rule is not None and rule.action == "refuse":
                return
            if rule is not None and rule.action == "hold":
                await asyncio.sleep(rule.hold_s)
            response = await self._forward(lines, body)
            if rule is not None and rule.action == "lose_response":
                return
            writer.write(response)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _forward(self, lines: list[str], body: bytes) -> bytes:
        """One request upstream on its own connection, ``Connection: close``: the answer ends at EOF,
        and tells the worker's client not to reuse its connection either."""
        kept = [line for line in lines[1:] if line and not line.lower().startswith("connection:")]
        request = "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1") + body
        upstream_reader, upstream_writer = await asyncio.open_connection(self.host, self.upstream_port)
        try:
            upstream_writer.write(request)
            await upstream_writer.drain()
            return await upstream_reader.read()
        finally:
            upstream_writer.close()


class TcpSwitch(_Listener):
    """A TCP pump to ``upstream_port`` that can be turned off (connections refused and cut) and on."""

    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        super().__init__(upstream_port, host)
        self.up = True
        self._open: set[asyncio.StreamWriter] = set()

    def set_up(self, up: bool) -> None:
        self.up = up
        if not up:
            for writer in list(self._open):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            writer.close()
            return
        self._open |= {writer, upstream_writer}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        try:
            await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))
        except asyncio.CancelledError:  # the suite is ending
            pass
        finally:
            self._open -= {writer, upstream_writer}
