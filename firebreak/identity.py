"""The agent's own identity, governed like a privileged service account.

One identity per environment: the worker is ``firebreak-agent`` in one ``environment``, with a
named ``owner`` (who answers for it) and a ``credential_max_age`` by which its bootstrap credential
must have been rotated (``firebreak creds rotate``). The broker reads it from its configuration
(``identity:`` in ``FIREBREAK_CONFIG``, or ``FIREBREAK_AGENT_OWNER``, ``FIREBREAK_ENVIRONMENT``,
``FIREBREAK_CREDENTIAL_MAX_AGE``); ``firebreak privileges`` and the broker's ``/metrics`` show it.

The environment is put into every token's audience (``fleet@prod``, see
:func:`firebreak.signing.audience_for`), so a target in prod refuses a staging token.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Light on purpose: firebreak.config (read by every command) holds an AgentIdentity.
DEFAULT_ENVIRONMENT = "demo"
Environment = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
Duration = Annotated[str, Field(pattern=r"^(\d+)(ms|s|m|h|d)$")]  # as firebreak.runbook.Duration


class AgentIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    owner: str = Field(default="unassigned", min_length=1, max_length=100,
                       description="the team or person who answers for the agent identity")
    environment: Environment = Field(default=DEFAULT_ENVIRONMENT,
                                     description="the one environment this identity acts in; put in every audience")
    credential_max_age: Duration = Field(default="90d", description="rotate the bootstrap credential before this age")

    @property
    def agent(self) -> str:
        from firebreak.config import AGENT

        return AGENT

    @property
    def max_age_s(self) -> float:
        from firebreak.runbook import parse_duration

        return parse_duration(self.credential_max_age).total_seconds()

    def summary(self) -> dict[str, object]:
        return {"agent": self.agent, "owner": self.owner, "environment": self.environment,
                "credential_max_age": self.credential_max_age, "credential_max_age_s": self.max_age_s}
