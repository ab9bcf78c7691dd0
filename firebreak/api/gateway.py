"""The API's one way to Temporal: a lazily connected client and a deadline on every call.

The API must start, answer ``/healthz`` and refuse alerts with a 503 while
Temporal is down, then work again when it returns, without a restart. So the
client is made on first use (and re-made after a failed connect), and every
call runs under a deadline below the senders' own timeouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

ClientFactory = Callable[[], Awaitable[Client]]
T = TypeVar("T")

# Statuses that mean "Temporal is not there or not coping now": the sender should retry.
_RETRYABLE = {
    RPCStatusCode.UNAVAILABLE,
    RPCStatusCode.DEADLINE_EXCEEDED,
    RPCStatusCode.RESOURCE_EXHAUSTED,
    RPCStatusCode.CANCELLED,
    RPCStatusCode.ABORTED,
}


class TemporalUnavailable(Exception):
    """Temporal could not be reached in time: answered 503 with Retry-After."""


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (asyncio.TimeoutError, TemporalUnavailable, ConnectionError)):
        return True
    if isinstance(exc, RPCError):
        return exc.status in _RETRYABLE
    # The SDK raises a plain RuntimeError when the connection cannot be made at all.
    return isinstance(exc, RuntimeError) and "connect" in str(exc).lower()


class TemporalGateway:
    def __init__(self, factory: ClientFactory, timeout_s: float) -> None:
        self._factory = factory
        self._client: Client | None = None
        self._lock = asyncio.Lock()
        self.timeout_s = timeout_s

    async def client(self) -> Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                try:
                    self._client = await asyncio.wait_for(self._factory(), self.timeout_s)
                except Exception as exc:
                    if is_unavailable(exc):
                        raise TemporalUnavailable(f"cannot connect to Temporal: {type(exc).__name__}") from exc
                    raise
            return self._client

    async def call(self, operation: Callable[[Client], Awaitable[T]]) -> T:
        """Run ``operation`` under the deadline; unreachable or slow Temporal is TemporalUnavailable."""
        try:
            return await asyncio.wait_for(self._run(operation), self.timeout_s)
        except TemporalUnavailable:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                raise TemporalUnavailable(f"Temporal did not answer: {type(exc).__name__}") from exc
            raise

    async def _run(self, operation: Callable[[Client], Awaitable[T]]) -> T:
        return await operation(await self.client())

    async def healthy(self) -> bool:
        try:
            client = await self.client()
            return await asyncio.wait_for(client.service_client.check_health(), min(self.timeout_s, 2.0))
        except Exception:
            return False
