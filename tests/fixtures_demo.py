"""Fixtures for the demo fleet and its Prometheus/Alertmanager tests.

Imported by tests/test_fleet.py and tests/test_demo_prometheus.py (the lead owns
conftest.py). Tokens are real: minted with firebreak.signing and checked by a
real TargetVerifier holding the matching public key.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from demo.fleet import FleetServer
from firebreak.contracts import canonical_json
from firebreak.signing import TargetVerifier, generate_key, key_id, mint_token

AGENT = "firebreak-agent"


@dataclass
class Minter:
    """Mints broker-style tokens for tests with a real Ed25519 key."""

    key: Ed25519PrivateKey
    kid: str

    def __call__(self, verb: str, resource: str, **kwargs: Any) -> str:
        return self.mint(verb, resource, **kwargs)[0]

    def mint(self, verb: str, resource: str, *, audience: str = "fleet", step_id: str = "step-1",
             ttl_s: float = 60, req: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """The token and its claims (the jti is what a revocation names)."""
        return mint_token(
            self.key, self.kid,
            issuer="firebreak-broker-test", subject=AGENT, audience=audience,
            verb=verb, resource=resource, ttl_s=ttl_s,
            workflow_id="shop.checkout.error-rate", run_id=uuid.uuid4().hex, activity_id="1",
            step_id=step_id, plan_hash="0" * 64, extra={"req": req} if req is not None else None,
        )

    def write(self, verb: str, resource: str, body: Any = None, *, key: str | None = None,
              raw: bytes | None = None, **kwargs: Any) -> dict[str, Any]:
        """httpx kwargs for one write, as the broker mints it: the token binds this key and these bytes."""
        content = raw if raw is not None else canonical_json(body if body is not None else {})
        key = key or uuid.uuid4().hex
        req = {"idempotency_key": key, "body_sha256": hashlib.sha256(content).hexdigest()}
        token = self.mint(verb, resource, req=req, **kwargs)[0]
        return {"content": content, "headers": {"Authorization": f"Bearer {token}", "Idempotency-Key": key,
                                                "Content-Type": "application/json"}}

    def headers(self, verb: str, resource: str, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self(verb, resource, **kwargs)}"}

    def verifier(self, audience: str = "fleet") -> TargetVerifier:
        return TargetVerifier(audience, {self.kid: self.key.public_key()})


@pytest.fixture
def minter() -> Minter:
    key = generate_key()
    return Minter(key, key_id(key))


@pytest.fixture
def chaos_token() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture
def fleet_server(minter: Minter, chaos_token: str) -> Iterator[FleetServer]:
    """The fleet on a free port over real HTTP, in a background thread."""
    server = FleetServer(verifier=minter.verifier(), chaos_token=chaos_token)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class WebhookReceiver:
    """A tiny HTTP server standing in for Firebreak's intake: records every POST."""

    url: str
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.received)


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    holder: dict[str, WebhookReceiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            receiver = holder["r"]
            with receiver.lock:
                receiver.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:  # quiet: headers hold a bearer token
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["r"] = WebhookReceiver(url=f"http://127.0.0.1:{server.server_address[1]}/v1/alerts/alertmanager")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield holder["r"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
