"""Receipts for opened incidents: who signs them, and where the intake's key lives.

The intake API holds its own Ed25519 key (``STATE/intake/receipt-key.pem``);
the broker reads only the public half (``receipt-key.pub``). The worker holds
neither, so it cannot claim that nobody, or somebody else, raised an incident.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from firebreak import signing
from firebreak.contracts import Approval, ApprovalArrival, Receipt, approval_sha256

INTAKE = "intake"
ReceiptSigner = Callable[[str], Receipt]


def intake_key_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "intake" / "receipt-key.pem"


def intake_public_path(state_dir: str | Path) -> Path:
    return intake_key_path(state_dir).with_suffix(".pub")


def ensure_intake_key(state_dir: str | Path) -> signing.Ed25519PrivateKey:
    """The intake's receipt key, created (0600) with its public half on first use."""
    path = intake_key_path(state_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        signing.write_private_key(path, signing.generate_key())
    key = signing.load_private_key(path)
    public = intake_public_path(state_dir)
    if not public.exists():
        public.write_text(signing.public_pem(key))
    return key


def load_intake_public_keys(state_dir: str | Path) -> list[signing.Ed25519PublicKey]:
    public = intake_public_path(state_dir)
    return [signing.load_public_key(public.read_text())] if public.exists() else []


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def intake_signer(key: signing.Ed25519PrivateKey) -> ReceiptSigner:
    """Receipts for deliveries from alert systems: no person raised them."""
    return lambda incident_id: signing.sign_receipt(
        Receipt(incident_id=incident_id, requested_by=None, signer=INTAKE, issued_at=_now()), key
    )


def person_signer(name: str, key: signing.Ed25519PrivateKey) -> ReceiptSigner:
    """Receipts for an alert a person raised by hand: signed with their own roster key."""
    return lambda incident_id: signing.sign_receipt(
        Receipt(incident_id=incident_id, requested_by=name, signer=name, issued_at=_now()), key
    )


def agent_signer(agent: str, owner: str, key: signing.Ed25519PrivateKey) -> ReceiptSigner:
    """Receipts for what an AI agent proposes over MCP (``firebreak mcp``).

    Signed by the MCP server with the agent's own receipt key (its public half is in the agent's
    roster entry), naming the person the agent acts for: the broker then counts its owner among
    the requesters, so the owner cannot approve it; the agent, not a person, never can.
    """
    return lambda incident_id: signing.sign_receipt(
        Receipt(incident_id=incident_id, requested_by=owner, signer=agent, issued_at=_now()), key
    )


# -- approval arrivals: when the API received an approval ---------------------------


def sign_arrival(approval: Approval, key: signing.Ed25519PrivateKey) -> ApprovalArrival:
    """The API's signed word that ``approval`` reached it now (microseconds: a deadline can be that close)."""
    arrival = ApprovalArrival(workflow_id=approval.workflow_id, approval_sha256=approval_sha256(approval),
                              received_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"))
    signature = key.sign(arrival.signing_payload())
    return arrival.model_copy(update={"signature": base64.b64encode(signature).decode("ascii")})


def verify_arrival(arrival: ApprovalArrival, approval: Approval,
                   intake_keys: list[signing.Ed25519PublicKey]) -> str | None:
    """None if ``arrival`` is the intake's genuine receipt of exactly this approval, else why not."""
    if arrival.signer != INTAKE:
        return f"arrival receipt signed by {arrival.signer!r}, not the intake"
    if arrival.workflow_id != approval.workflow_id or arrival.approval_sha256 != approval_sha256(approval):
        return "arrival receipt is for another approval"
    try:
        aware = arrival.received.tzinfo is not None
        signature = base64.b64decode(arrival.signature, validate=True)
    except (binascii.Error, ValueError):
        aware = False
    if not aware:
        return "arrival receipt is malformed"
    if not intake_keys:
        return "no intake key here to verify the arrival receipt with"
    for key in intake_keys:
        try:
            key.verify(signature, arrival.signing_payload())
            return None
        except InvalidSignature:
            continue
    return "arrival receipt signature does not verify"
