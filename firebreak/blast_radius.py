"""The blast radius of a step, from the catalog graph and the traffic. Pure: safe inside workflow code.

Who is hurt if the step's target misbehaves while it changes: every component that depends on it,
transitively (from the catalog walk's ``dependents``), with its owner and lifecycle, and the share of
the target's calls each direct caller makes (from the mesh's client metrics, when Prometheus answered).
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from firebreak.catalog import CatalogWalk


class Dependent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    owner: str = ""
    lifecycle: str = ""
    via: str = Field(default="", description="the component through which it depends on the target")
    traffic_share: float | None = Field(default=None, description="its share of the calls the target receives")


class BlastRadius(BaseModel):
    model_config = ConfigDict(extra="ignore")

    target: str
    owner: str = ""
    dependents: list[Dependent] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    def line(self) -> str:
        """One line for a ticket or a card."""
        if not self.dependents:
            return f"{self.target} (owner {self.owner or 'unknown'}): no dependents in the catalog"
        shown = ", ".join(
            f"{d.name} ({d.owner or 'owner unknown'}, {d.lifecycle or 'lifecycle unknown'}"
            + (f", {d.traffic_share:.0%} of its calls" if d.traffic_share is not None else "")
            + (f", via {d.via}" if d.via else "") + ")"
            for d in self.dependents)
        return (f"{self.target} (owner {self.owner or 'unknown'}): {len(self.dependents)} "
                f"dependent{'s' if len(self.dependents) != 1 else ''}: {shown}")


def compute(target: str, walk: CatalogWalk | None, calls_by_source: Mapping[str, float] | None = None,
            max_dependents: int = 50) -> BlastRadius:
    """The target's transitive dependents from the walk; ``calls_by_source`` is calls/s to the target by caller."""
    if walk is None or walk.entry(target) is None:
        return BlastRadius(target=target, notes=[f"{target} was not read from the catalog: dependents unknown"])
    entry = walk.entry(target)
    assert entry is not None
    total = sum(calls_by_source.values()) if calls_by_source else 0.0
    out: list[Dependent] = []
    seen = {target}
    queue: list[tuple[str, str]] = [(name, "") for name in entry.dependents]
    while queue and len(out) < max_dependents:
        name, via = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        found = walk.entry(name)
        share = (calls_by_source or {}).get(name) if not via else None
        out.append(Dependent(
            name=name, owner=found.owner if found else "", lifecycle=found.lifecycle if found else "", via=via,
            traffic_share=round(share / total, 4) if share is not None and total > 0 else None,
        ))
        if found is not None:
            queue += [(n, via or name) for n in found.dependents]
    notes = [] if calls_by_source else ["no traffic figures (Prometheus did not answer)"]
    return BlastRadius(target=target, owner=entry.owner, dependents=out, notes=notes)
