"""The blast radius of a step, from the catalog graph and the traffic. Pure: safe inside workflow code.

Who is hurt if the step's target misbehaves while it changes: every component that depends on it,
transitively (from the catalog walk's ``dependents``), with its owner and lifecycle, and the share of
the target's calls each direct caller makes (from the mesh's client metrics, when they were read).

What was not read is never shown as nothing: a target whose dependents were not read from the catalog
says "dependents unknown (not read)" with why (``unread``), and a missing traffic figure says why it is
missing (not asked, Prometheus did not answer, or it answered with no calls).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from firebreak.catalog import CatalogWalk

NOT_READ = "dependents unknown (not read)"
# What plans proposed before `unread` existed say of a target that was not read (their notes[0]).
_LEGACY_NOT_READ = "was not read from the catalog"


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
    unread: str = Field(default="", description=(
        "why the target's dependents are unknown (not read from the catalog); empty when they were read"))

    @model_serializer(mode="wrap")
    def _unread_only_when_set(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Plans hash their canonical JSON: a radius that was read serializes exactly as before this field,
        # so plans proposed (and approved) before it keep their hash.
        data = handler(self)
        if isinstance(data, dict) and not data.get("unread"):
            data.pop("unread", None)
        return data

    @property
    def dependents_unknown(self) -> bool:
        return bool(self.unread) or (not self.dependents and any(_LEGACY_NOT_READ in n for n in self.notes))

    def line(self) -> str:
        """One line for a ticket or a card: what is known, and what is not, with why."""
        owner = f"{self.target} (owner {self.owner or 'unknown'})"
        if self.dependents_unknown:
            return f"{owner}: {NOT_READ}" + (f": {self.unread}" if self.unread else "")
        if not self.dependents:
            return f"{owner}: no dependents in the catalog"
        shown = ", ".join(
            f"{d.name} ({d.owner or 'owner unknown'}, {d.lifecycle or 'lifecycle unknown'}"
            + (f", {d.traffic_share:.0%} of its calls" if d.traffic_share is not None else "")
            + (f", via {d.via}" if d.via else "") + ")"
            for d in self.dependents)
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        return (f"{owner}: {len(self.dependents)} "
                f"dependent{'s' if len(self.dependents) != 1 else ''}: {shown}{notes}")


def compute(target: str, walk: CatalogWalk | None, calls_by_source: Mapping[str, float] | None = None,
            max_dependents: int = 50, *, unread: str | None = None, traffic_note: str | None = None) -> BlastRadius:
    """The target's transitive dependents from the walk; ``calls_by_source`` is calls/s to the target by caller.

    ``unread`` (why the walk is missing, e.g. "the catalog read failed: ...") and ``traffic_note`` (why
    there are no traffic figures, "" when there are) make the radius say how it knows; left None, the radius
    reads as plans proposed before them did (what running incidents replay with).
    """
    truthful = unread is not None or traffic_note is not None
    if walk is None or walk.entry(target) is None:
        if not truthful:
            return BlastRadius(target=target, notes=[f"{target} {_LEGACY_NOT_READ}: dependents unknown"])
        why = unread or (f"{target} is not among the entities the catalog walk read" if walk is not None
                         else "the catalog was not read")
        return BlastRadius(target=target, unread=why)
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
    if not truthful:
        notes = [] if calls_by_source else ["no traffic figures (Prometheus did not answer)"]
        return BlastRadius(target=target, owner=entry.owner, dependents=out, notes=notes)
    notes = [f"no traffic figures: {traffic_note}"] if traffic_note and out else []
    # A dependent whose own dependents were not asked (the walk's bound): who depends on it is not known.
    unasked = [d.name for d in out if f"dependents of {d.name}" not in walk.reads]
    if unasked and walk.reads:
        notes.append(f"who depends on {', '.join(unasked[:5])} was not read")
    return BlastRadius(target=target, owner=entry.owner, dependents=out, notes=notes)
