"""What the catalog walk and the per-dependency evidence say, for plans, tickets and escalations. Pure.

Safe inside workflow code: everything here is computed from evidence already in history.
"""

from __future__ import annotations

from collections.abc import Iterable

from firebreak.blast_radius import BlastRadius, compute
from firebreak.catalog import CatalogEntry, CatalogWalk
from firebreak.contracts import Evidence, Hypothesis, Plan
from firebreak.diagnosis import PER_DEPENDENCY

# The evidence id of calls to the alerting service itself, by caller (mesh client metrics).
CALLERS = "callers"


def walk_of(evidence: Iterable[Evidence]) -> CatalogWalk | None:
    return next((ev.catalog for ev in evidence if ev.kind == "catalog" and ev.catalog is not None), None)


def calls_to(target: str, evidence: Iterable[Evidence]) -> dict[str, float]:
    """Calls/s to ``target`` by caller, from its ``dep_traffic:{target}`` evidence (mesh client metrics)."""
    for ev in evidence:
        if ev.ok and ev.id.endswith(f"{PER_DEPENDENCY}{target}") and ev.id.startswith("dep_traffic"):
            return {s.labels.get("source", "?"): s.samples[-1].v for s in ev.series if s.samples}
    return {}


def traffic_to(target: str, service: str, evidence: Iterable[Evidence]) -> tuple[dict[str, float], str]:
    """Calls/s to ``target`` by caller, and why there are none ("" when there are).

    Read from ``dep_traffic:{target}`` (a dependency's callers) or, for the alerting service itself,
    from its ``callers`` evidence. The reason says what happened: not asked, not answered, or no calls.
    """
    wanted = CALLERS if target == service else f"dep_traffic{PER_DEPENDENCY}{target}"
    ev = next((e for e in evidence if e.id == wanted), None)
    if ev is None:
        return {}, f"this runbook does not read the calls to {target} by caller"
    if not ev.ok:
        return {}, f"Prometheus did not answer ({ev.gap or 'no reason given'})"[:300]
    calls = {s.labels.get("source", "?"): s.samples[-1].v for s in ev.series if s.samples}
    if not calls or sum(calls.values()) <= 0:
        return {}, f"Prometheus answered: no calls to {target} by caller in the query's window"
    return calls, ""


def catalog_unread(evidence: Iterable[Evidence]) -> str:
    """Why the catalog walk is missing from the evidence, or "" when it is there."""
    walks = [e for e in evidence if e.kind == "catalog"]
    if not walks:
        return "this runbook does not read the catalog"
    if not any(e.ok and e.catalog is not None for e in walks):
        return f"the catalog read failed: {walks[0].gap or 'no reason given'}"[:300]
    return ""

def step_target(resource: str) -> str:
    """``service/payments`` -> ``payments``."""
    return resource.partition("/")[2] or resource


def impact_of(plan: Plan, evidence: list[Evidence], *, truthful: bool = False) -> dict[str, BlastRadius]:
    """Each step's blast radius: its target's transitive dependents, owners, lifecycle and traffic shares.

    ``truthful``: what was not read says so, with why (dependents unknown, traffic not asked or not
    answered). False computes the radius as plans proposed before that did: it is hashed with the plan,
    so an incident that proposed one replays with the same.
    """
    walk = walk_of(evidence)
    service = (plan.params or {}).get("service", "")
    unread = catalog_unread(evidence)
    out: dict[str, BlastRadius] = {}
    for step in plan.steps:
        target = step_target(step.resource)
        if not truthful:
            out[step.id] = compute(target, walk, calls_to(target, evidence) or None)
            continue
        calls, why = traffic_to(target, service, evidence)
        out[step.id] = compute(target, walk, calls or None, unread=unread, traffic_note=why)
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
