"""Earlier incidents of the same service and runbook, read from Temporal visibility, as evidence. Pure.

An earlier incident is what its search attributes (FirebreakPhase, FirebreakService, FirebreakRunbook)
and its memo (the plan's hypothesis) say. A hypothesis that was confirmed before (its plan ran and the
incident resolved) gains a bounded weight: never more than ``MAX_PRIOR`` of a score, so history can
break a near tie but never outvote the evidence of this incident.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

PRIOR_PER_INCIDENT = 0.05
MAX_PRIOR = 0.1


class PastIncident(BaseModel):
    model_config = ConfigDict(extra="ignore")

    incident_id: str
    run_id: str = ""
    phase: str
    hypothesis: str = Field(default="", description="the hypothesis its plan answered, if it proposed one")
    subject: str = Field(default="", description="the dependency that hypothesis blamed, for a per-dependency one")
    closed_at: datetime | None = None


class PastIncidents(BaseModel):
    model_config = ConfigDict(extra="ignore")

    service: str
    runbook: str
    window: str
    incidents: list[PastIncident] = Field(default_factory=list)

    @property
    def confirmed(self) -> Counter[tuple[str, str]]:
        """(hypothesis, subject) pairs whose plan ran and resolved the incident, with how often."""
        return Counter((i.hypothesis, i.subject) for i in self.incidents if i.phase == "resolved" and i.hypothesis)

    def summary(self) -> str:
        if not self.incidents:
            return f"no earlier {self.runbook} incident on {self.service} in {self.window}"
        parts: list[str] = []
        by_outcome = Counter((i.hypothesis or "no plan", i.phase) for i in self.incidents)
        for (hypothesis, phase), count in by_outcome.most_common():
            parts.append(f"{count} {hypothesis.replace('_', ' ')} {phase.replace('_', ' ')}")
        blamed = Counter(i.subject for i in self.incidents if i.subject)
        if blamed:
            parts.append("dependencies blamed: " + ", ".join(f"{name} x{n}" for name, n in blamed.most_common()))
        n = len(self.incidents)
        return f"{n} incident{'s' if n != 1 else ''} in {self.window}: " + ", ".join(parts)


def prior(past: PastIncidents | None, hypothesis: str, subject: str = "") -> float:
    """The bounded weight earlier confirmations add to ``hypothesis`` (about ``subject``, if per dependency)."""
    if past is None:
        return 0.0
    return min(MAX_PRIOR, PRIOR_PER_INCIDENT * past.confirmed.get((hypothesis, subject), 0))
