"""Wire formats of the broker's HTTP API (shared by the app and the client)."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from firebreak.contracts import Approval, Grant, Plan, Receipt

Name = Annotated[str, Field(min_length=1, max_length=200)]


@functools.cache
def _adapter(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation)


class StrictRequest(BaseModel):
    """A request that refuses unknown fields at every depth.

    The contracts models it carries (plans, approvals, receipts) ignore unknown fields, because they
    also travel in Temporal payloads that must decode across versions. A request to the broker is not
    such a payload: a field the broker does not know is refused, not silently dropped.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_nested_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            if name not in data or isinstance(data[name], BaseModel):
                continue
            try:
                _adapter(field.annotation).validate_python(data[name], extra="forbid")
            except ValidationError as exc:  # other errors are reported by the validation proper
                unknown = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
                if unknown:
                    raise ValueError(f"{'.'.join(str(p) for p in (name, *unknown[0]))}: unknown field") from None
        return data


class MintRequest(StrictRequest):
    model_config = ConfigDict(extra="forbid")

    audience: Name
    verb: Annotated[str, Field(pattern=r"^[a-z]+\.[a-z_]+$")]
    resource: Annotated[str, Field(min_length=1, max_length=300)]
    ttl_s: float = Field(gt=0, description="capped at 900 s by the broker")
    workflow_id: Name
    run_id: Name
    activity_id: Name
    step_id: str = Field(default="", max_length=200, description="plan step (writes); evidence/step id for reads")
    runbook: Name
    params: dict[str, str] = Field(default_factory=dict)
    plan: Plan | None = None
    approvals: list[Approval] = Field(default_factory=list, max_length=50)
    receipts: list[Receipt] = Field(default_factory=list, max_length=50,
                                    description="who raised the incident, signed by the intake or the person")
    undo: bool = Field(default=False, description="the step's undo, not its write")
    attempt: int = Field(default=1, ge=1, le=1_000_000,
                         description="the activity's attempt: a write slot is held by one attempt at a time")

    @property
    def is_read(self) -> bool:
        return self.verb.endswith(".read")


class MintResponse(BaseModel):
    grant_id: str
    token: str = Field(repr=False)
    audience: str
    scope: dict[str, str]
    expires_at: datetime
    audit_seq: int | None = None


class ApprovalCheckRequest(StrictRequest):
    model_config = ConfigDict(extra="forbid")

    approval: Approval


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grant_id: Annotated[str, Field(min_length=1, max_length=64)]
    wrote: bool = Field(default=False, description="the target took the write: the step's slot is spent for good")
    # What the target answered, as far as an undo needs it: a later attempt whose answer was lost gets it
    # back with the refusal. Scalars only, bounded; never a secret (it is in the step's result in history).
    result: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=256)] | int | float | bool] = (
        Field(default_factory=dict, max_length=20))


class RunClosedRequest(BaseModel):
    """The workflow's word that its run closed (and the run its plan names, if another one)."""

    model_config = ConfigDict(extra="forbid")

    workflow_id: Name
    run_ids: list[Name] = Field(min_length=1, max_length=4)
    outcome: str = Field(default="", max_length=200)


class FreezeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=500)
    by: str = Field(default="", max_length=64, description="who pulled (or released) the kill switch")


class RotateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_s: float | None = Field(default=None, ge=0, le=30 * 86400,
                                    description="how long the old credential or key still works (default per kind)")
    reason: str = Field(default="", max_length=500)
    by: str = Field(default="", max_length=64, description="who rotated it")


class IssuedCredential(BaseModel):
    """A minted credential as the activity holds it.

    The token is excluded from ``model_dump``/JSON and from repr/str, so that
    returning or logging this object can never put the secret in history.
    """

    model_config = ConfigDict(frozen=True)

    grant_id: str
    token: str = Field(repr=False, exclude=True)
    audience: str
    scope: dict[str, str]
    expires_at: datetime
    audit_seq: int | None = None

    @property
    def scope_str(self) -> str:
        return f"{self.scope['verb']}:{self.scope['resource']}"

    @property
    def grant(self) -> Grant:
        return Grant(grant_id=self.grant_id, audience=self.audience, scope=self.scope_str, expires_at=self.expires_at,
                     audit_seq=self.audit_seq)

    @property
    def authorization(self) -> str:
        """The header value for the target request."""
        return f"Bearer {self.token}"

    def __repr__(self) -> str:
        return (
            f"IssuedCredential(grant_id={self.grant_id!r}, audience={self.audience!r}, "
            f"scope={self.scope_str!r}, expires_at={self.expires_at.isoformat()!r}, token=<redacted>)"
        )

    __str__ = __repr__
