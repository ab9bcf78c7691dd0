"""What the catalog walk and the per-dependency evidence say, for plans, tickets and escalations. Pure.

Safe inside workflow code: everything here is computed from evidence already in history.
"""

from __future__ import annotations

from collections.abc import Iterable

from firebreak.blast_radius import BlastRadius, compute
from firebreak.catalog import CatalogEntry, CatalogWalk
from firebreak.contracts import Evidence, Hypothesis, Plan
from firebreak.diagnosis import PER_DEPENDENCY


def walk_of(evidence: Iterable[Evidence]) -> CatalogWalk | None:
    return next((ev.catalog for ev in evidence if ev.kind == "catalog" and ev.catalog is not None), None)


def calls_to(target: str, evidence: Iterable[Evidence]) -> dict[str, float]:
    """Calls/s to ``target`` by caller, from its ``dep_traffic:{target}`` evidence (mesh client metrics)."""
    for ev in evidence:
        if ev.ok and ev.id.endswith(f"{PER_DEPENDENCY}{target}") and ev.id.startswith("dep_traffic"):
            return {s.labels.get("source", "?"): s.samples[-1].v for s in ev.series if s.samples}
    return {}


def step_target(resource: str) -> str:
    """``service/payments`` -> ``payments``."""
    return resource.partition("/")[2] or resource


def impact_of(plan: Plan, evidence: list[Evidence]) -> dict[str, BlastRadius]:
    """Each step's blast radius: its target's transitive dependents, owners, lifecycle and traffic shares."""
    walk = walk_of(evidence)
    out: dict[str, BlastRadius] = {}
    for step in plan.steps:
        target = step_target(step.resource)
        out[step.id] = compute(target, walk, calls_to(target, evidence) or None)
    return out


def entry(name: str, evidence: Iterable[Evidence]) -> CatalogEntry | None:
    walk = walk_of(evidence)
    return walk.entry(name) if walk else None


def pointed_at(top: Hypothesis | None, service: str) -> str:
    """The service the evidence points at: the dependency a per-dependency hypothesis blames, or the service."""
    if top is not None and top.params.get("dependency"):
        return top.params["dependency"]
    return service


def correlation_lines(top: Hypothesis | None, service: str, evidence: list[Evidence],
                      plan: Plan | None) -> list[str]:
    """For tickets and notifications: the failing dependency, its owner and who depends on it."""
    lines: list[str] = []
    target = pointed_at(top, service)
    found = entry(target, evidence)
    if target != service:
        lines.append(f"failing dependency: {target} (owner {found.owner if found and found.owner else 'unknown'}"
                     f"{', ' + found.lifecycle if found and found.lifecycle else ''}), called by {service}")
    if plan is not None and plan.impact:
        lines += [f"blast radius of {step_id}: {radius.line()}" for step_id, radius in plan.impact.items()]
    walk = walk_of(evidence)
    if walk is not None and walk.refused:
        lines += [f"catalog refused: {why}" for why in walk.refused[:5]]
    return lines


def owner_to_escalate(top: Hypothesis | None, service: str, evidence: list[Evidence]) -> str | None:
    """The owning team of the service the evidence points at, when it is a dependency; else None."""
    target = pointed_at(top, service)
    if target == service:
        return None
    found = entry(target, evidence)
    return found.owner if found and found.owner else None
