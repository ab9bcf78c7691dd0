"""Approvals through the API: authenticated by the approver's own signature.

Approvers need no Temporal access and no payload key: the API checks the
signature against the roster before anything reaches Temporal, then submits it
as the workflow's ``submit_approval`` update. The workflow and the broker still
judge it themselves; this check only keeps unsigned noise out. An approval that
goes as a signal (no worker answered) carries the API's signed arrival receipt.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from firebreak import signing
from firebreak.api.auth import AuthError
from firebreak.api.sources import PayloadError
from firebreak.contracts import Approval, ApprovalArrival
from firebreak.receipts import sign_arrival
from firebreak.roster import RosterSource


class ApprovalGate:
    def __init__(self, roster_path: Path, arrival_key: signing.Ed25519PrivateKey | None = None) -> None:
        self.roster = RosterSource(roster_path)
        self.arrival_key = arrival_key

    def arrival(self, approval: Approval) -> ApprovalArrival | None:
        """The intake's signed receipt of when this approval reached the API: if no worker takes it before
        the approval deadline, this (not a worker's clock) says it came in time."""
        return sign_arrival(approval, self.arrival_key) if self.arrival_key is not None else None

    def parse(self, body: bytes, incident_id: str) -> Approval:
        try:
            approval = Approval.model_validate(json.loads(body), extra="forbid")  # the API stays strict
        except ValueError as exc:
            if isinstance(exc, ValidationError):
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "body"
                raise PayloadError(f"{field}: {first['msg']}", field) from None
            raise PayloadError("body is not JSON", "body") from None
        if approval.workflow_id != incident_id:
            raise PayloadError(f"the approval is signed for {approval.workflow_id!r}, not {incident_id!r}",
                               "workflow_id")
        return approval

    def authenticate(self, approval: Approval) -> None:
        roster = self.roster.get()
        if roster is None:
            raise AuthError(f"no approval can be verified: {self.roster.error}", "approver")
        check = signing.verify_approval(approval, roster)
        if not check.valid:
            raise AuthError(check.reason, "signature")
