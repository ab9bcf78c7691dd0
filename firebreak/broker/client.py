"""The worker's side of the broker: ask for one credential, always give it back.

```python
async with broker.credential(audience="fleet", verb="fleet.rollback", ...) as cred:
    await http.post(url, headers={"Authorization": cred.authorization})
# revoked here: on success, on error, and on cancellation
```

Tokens stay inside the :class:`IssuedCredential`; its repr, str and JSON leave
the token out, and no exception raised here carries one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from firebreak.broker.models import IssuedCredential, MintRequest
from firebreak.broker.revocations import RevocationRetries
from firebreak.contracts import Approval, ApprovalCheck

log = logging.getLogger(__name__)

# Strong references to revocations still in flight (asyncio keeps only weak ones).
_PENDING_REVOKES: set[asyncio.Future[None]] = set()

__all__ = ["BrokerClient", "BrokerError", "CredentialsFrozen", "IssuedCredential", "MintRefused"]


class BrokerError(Exception):
    """The broker could not be asked, or answered unexpectedly (often worth a retry)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.status))


class MintRefused(BrokerError):
    """The broker refused (403 policy, 400 malformed, 401 bad bootstrap credential):
    retrying the same request will not help."""

    def __init__(self, reason: str, status: int = 403) -> None:
        super().__init__(reason, status)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.status))


class StepAlreadyWritten(MintRefused):
    """The broker's record says the target already took this step's write (an earlier attempt reported
    it): never minted again. ``result`` is what that attempt reported the target answered."""

    def __init__(self, reason: str, result: dict[str, Any], status: int = 403) -> None:
        super().__init__(reason, status)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.result, self.status))


class CredentialsFrozen(MintRefused):
    """The broker's kill switch is on: nothing is refused for good, the caller waits for a thaw.

    ``reason`` says who froze it, when and why."""


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error(response: httpx.Response) -> str:
    return str(_json(response).get("error") or "")


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("reason") or body.get("error") or response.reason_phrase)[:2000]
    except ValueError:
        return f"HTTP {response.status_code} {response.reason_phrase}"


class TokenFile:
    """The bootstrap credential kept in a file (the broker's ``agent-token``), read again whenever the
    file changes: after ``firebreak creds rotate`` the worker sends the new one from its next request,
    well inside the overlap, with no restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._token = ""

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r})"

    def __call__(self) -> str:
        try:
            info = self.path.stat()
        except OSError:
            return self._token  # gone for a moment (being replaced): keep the last one
        stamp = (info.st_mtime_ns, info.st_ino)
        if stamp != self._stamp:
            self._token, self._stamp = self.path.read_text(encoding="ascii").strip(), stamp
        return self._token


class BrokerClient:
    def __init__(self, base_url: str, agent_token: str | Callable[[], str], *, timeout_s: float = 10.0) -> None:
        """``agent_token``: the bootstrap credential, or a callable read before each request (:class:`TokenFile`)."""
        self.base_url = base_url.rstrip("/")
        self._agent_token = agent_token
        self._timeout = timeout_s
        self._http: httpx.AsyncClient | None = None
        # Revocations the broker could not take when their activity ended, retried until they land.
        self.retries = RevocationRetries(self.revoke)
        # Grants whose write the target took: their revocation tells the broker, which spends the step for good.
        self._wrote: dict[str, dict[str, Any]] = {}  # grant id -> what the target answered

    def __repr__(self) -> str:
        return f"BrokerClient({self.base_url!r})"

    def _client(self) -> httpx.AsyncClient:
        if self._http is None or self._http.is_closed:
            self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout)
        return self._http

    def _authorization(self) -> dict[str, str]:
        token = self._agent_token() if callable(self._agent_token) else self._agent_token
        return {"Authorization": f"Bearer {token}"}

    async def aclose(self) -> None:
        await self.retries.aclose()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self._client().post(path, json=body, headers=self._authorization())
        except httpx.HTTPError as exc:
            # The exception text names the URL only, but keep it to the type to be sure.
            raise BrokerError(f"broker at {self.base_url} unreachable: {type(exc).__name__}") from None

    async def mint(self, **fields: Any) -> IssuedCredential:
        """Fields of :class:`~firebreak.broker.models.MintRequest` (plan/approvals as models or dicts)."""
        body = MintRequest.model_validate(fields).model_dump(mode="json")
        response = await self._post("/v1/mint", body)
        if response.status_code == 423:
            raise CredentialsFrozen(_reason(response), 423)
        if response.status_code == 403 and _error(response) == "already_wrote":
            raise StepAlreadyWritten(_reason(response), _json(response).get("result") or {})
        if response.status_code in (400, 401, 403):
            raise MintRefused(_reason(response), response.status_code)
        if response.status_code != 200:
            raise BrokerError(f"mint failed: {_reason(response)}", response.status_code)
        return IssuedCredential.model_validate(response.json())

    async def check_approval(self, approval: Approval) -> ApprovalCheck:
        """The broker's one verdict on an approval's signature, with the instant it first arrived."""
        response = await self._post("/v1/approvals/check", {"approval": approval.model_dump(mode="json")})
        if response.status_code != 200:
            raise BrokerError(f"approval check failed: {_reason(response)}", response.status_code)
        return ApprovalCheck.model_validate(response.json())

    def mark_wrote(self, credential: IssuedCredential, result: dict[str, Any] | None = None) -> None:
        """The target took the write this credential was for: say so when it is revoked, with ``result``
        (the scalars of its answer an undo needs), which a later attempt gets back if this one's is lost."""
        self._wrote[credential.grant_id] = dict(result or {})

    async def revoke(self, grant_id: str) -> bool:
        """True if revoked now or before; False if the broker no longer knows it (expired)."""
        body: dict[str, Any] = {"grant_id": grant_id}
        if grant_id in self._wrote:
            body["wrote"] = True
            body["result"] = self._wrote[grant_id]
        response = await self._post("/v1/revoke", body)
        if response.status_code in (200, 404):
            self._wrote.pop(grant_id, None)
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise BrokerError(f"revoke of {grant_id} failed: {_reason(response)}", response.status_code)
        return True

    @asynccontextmanager
    async def credential(self, *, revoke_in_background: bool = False, **fields: Any) -> AsyncIterator[IssuedCredential]:
        """``revoke_in_background``: do not wait for the broker's answer to the revocation on the way out
        (it is sent at once, and retried until it lands, as always); what a read returns does not depend
        on it, so the caller need not wait. A write's credential is revoked before its activity returns."""
        cred = await self.mint(**fields)
        try:
            yield cred
        finally:
            # Its own task, shielded: a cancelled activity still gives its credential
            # back, even if the cancellation interrupts the wait for the answer.
            task = asyncio.ensure_future(self._revoke_quietly(cred))
            _PENDING_REVOKES.add(task)
            task.add_done_callback(_PENDING_REVOKES.discard)
            if not revoke_in_background:
                await asyncio.shield(task)

    async def run_closed(self, workflow_id: str, run_ids: list[str], outcome: str) -> list[str]:
        """Tell the broker a run closed: it mints nothing more for it. Idempotent."""
        response = await self._post("/v1/runs/closed", {"workflow_id": workflow_id, "run_ids": run_ids,
                                                        "outcome": outcome[:200]})
        if response.status_code != 200:
            raise BrokerError(f"run-closed report failed: {_reason(response)}", response.status_code)
        return list(response.json().get("newly_closed", []))

    async def settle(self, timeout_s: float) -> list[str]:
        """At shutdown: wait up to ``timeout_s`` for revocations still in flight and queued for retry;
        the grant ids the broker did not take (they expire on their own)."""
        pending = [t for t in _PENDING_REVOKES if t.get_loop() is asyncio.get_running_loop()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        return await self.retries.drain(timeout_s)

    async def _revoke_quietly(self, cred: IssuedCredential) -> None:
        try:
            await self.revoke(cred.grant_id)
        except Exception as exc:  # any failure at all: see below
            # Never mask the caller's error, and never leave the token valid: the retry queue keeps
            # asking until the broker takes it or the token expires. BrokerError texts are ours
            # (no secrets); others: the type only.
            detail = str(exc) if isinstance(exc, BrokerError) else type(exc).__name__
            log.warning("could not revoke grant %s now (%s): retrying in the background", cred.grant_id, detail)
            self.retries.submit(cred.grant_id, cred.expires_at.timestamp())
