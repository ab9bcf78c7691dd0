"""The service catalog, in Backstage's format, and the walk from an alerting service to its dependencies.

Firebreak reads ``kind: Component`` entities through the Backstage catalog REST API subset
(``GET /api/catalog/entities/by-name/{kind}/{namespace}/{name}`` and
``GET /api/catalog/entities?filter=...``), so a real Backstage is a ``targets: catalog:`` URL away.

A catalog is data written by many teams: every name in ``spec.dependsOn`` is validated against the
runbook's pattern *before* it is used in a request, and the walk refuses (with a reason, never a query)
a name that fails it, a cycle, an unknown entity or a walk deeper than its runbook allows.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Default pattern for entity names (a runbook's ``dependency`` param pattern takes precedence).
NAME_PATTERN = r"^[a-z][a-z0-9-]{0,30}$"
DEFAULT_NAMESPACE = "default"
ANNOTATION_PROMETHEUS_JOB = "prometheus.io/job"
ANNOTATION_RUNBOOK = "firebreak.dev/runbook"
# A catalog entry is written by other teams: what the walk keeps of one is bounded.
MAX_DEPENDS_ON = 50
MAX_ANNOTATION_CHARS = 200


def kept_annotations(annotations: dict[str, str]) -> dict[str, str]:
    """The annotations Firebreak reads (Prometheus job, runbook, firebreak.dev/*), each cut short."""
    return {k: str(v)[:MAX_ANNOTATION_CHARS] for k, v in annotations.items()
            if k == ANNOTATION_PROMETHEUS_JOB or k.startswith("firebreak.dev/")}


class _Loose(BaseModel):
    # Backstage entities carry many more fields than Firebreak reads: keep what we use, ignore the rest.
    model_config = ConfigDict(extra="ignore")


class EntityMetadata(_Loose):
    name: str
    namespace: str = DEFAULT_NAMESPACE
    title: str = ""
    annotations: dict[str, str] = Field(default_factory=dict)


class ComponentSpec(_Loose):
    type: str = "service"
    owner: str = ""
    system: str = ""
    lifecycle: str = ""
    dependsOn: list[str] = Field(default_factory=list)  # noqa: N815 - Backstage's field name


class Entity(_Loose):
    apiVersion: str = "backstage.io/v1alpha1"  # noqa: N815
    kind: str
    metadata: EntityMetadata
    spec: ComponentSpec = ComponentSpec()


class EntityRef(_Loose):
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind.lower()}:{self.namespace}/{self.name}"


class CatalogEntry(_Loose):
    """What an investigation keeps of one entity: enough for correlation, blast radius and tickets."""

    name: str
    owner: str = ""
    system: str = ""
    lifecycle: str = ""
    depends_on: list[str] = Field(default_factory=list, description="validated dependency names")
    dependents: list[str] = Field(default_factory=list, description="components whose dependsOn names this one")
    annotations: dict[str, str] = Field(default_factory=dict)
    depth: int = 0


class CatalogWalk(_Loose):
    """The walk from the alerting service: the entities reached, and every name refused, with why."""

    root: str
    entries: list[CatalogEntry] = Field(default_factory=list)
    refused: list[str] = Field(default_factory=list)
    reads: list[str] = Field(default_factory=list, description="every catalog request made, in order")

    def entry(self, name: str) -> CatalogEntry | None:
        return next((e for e in self.entries if e.name == name), None)

    @property
    def dependencies(self) -> list[str]:
        """Direct dependencies of the root that were read: the candidates a diagnosis ranks."""
        root = self.entry(self.root)
        return [n for n in (root.depends_on if root else []) if self.entry(n) is not None]


def parse_ref(ref: str, *, default_kind: str = "component") -> EntityRef:
    """``component:default/payments``, ``component:payments``, ``payments`` -> an EntityRef (not yet validated)."""
    kind, sep, rest = ref.partition(":")
    if not sep:
        kind, rest = default_kind, ref
    namespace, sep, name = rest.partition("/")
    if not sep:
        namespace, name = DEFAULT_NAMESPACE, rest
    return EntityRef(kind=kind.strip().lower(), namespace=namespace.strip(), name=name.strip())


def ref_problem(ref: EntityRef, pattern: str = NAME_PATTERN) -> str | None:
    """Why a reference may not be followed, or None."""
    if ref.kind != "component":
        return f"kind {ref.kind!r} is not a Component"
    if not re.fullmatch(NAME_PATTERN.removeprefix("^").removesuffix("$"), ref.namespace):
        return f"namespace {ref.namespace[:40]!r} does not match {NAME_PATTERN}"
    if not re.fullmatch(pattern.removeprefix("^").removesuffix("$"), ref.name):
        return f"name {ref.name[:40]!r} does not match {pattern}"
    return None


class WalkRefused(Exception):
    """A read the walk may not make (e.g. the broker refused its credential): recorded, not followed."""


# fetch(name) -> the entity, or None when the catalog has no such entity (404); may raise WalkRefused
Fetch = Callable[[str], Awaitable[Entity | None]]


async def walk(root: str, fetch: Fetch, *, max_depth: int = 2, pattern: str = NAME_PATTERN,
               max_entities: int = 20) -> CatalogWalk:
    """Breadth first from ``root`` along ``spec.dependsOn``, at most ``max_depth`` hops.

    ``fetch`` is only ever called with a name that matched ``pattern``. A refused name is recorded
    with its reason and not followed; the rest of the walk goes on.
    """
    result = CatalogWalk(root=root)
    problem = ref_problem(parse_ref(root), pattern)
    if problem is not None:
        result.refused.append(f"{root[:40]!r}: {problem}")
        return result
    seen: set[str] = set()
    queue: list[tuple[str, int, tuple[str, ...]]] = [(root, 0, ())]
    while queue:
        name, depth, path = queue.pop(0)
        if name in seen:
            continue
        if len(seen) >= max_entities:
            result.refused.append(f"{name!r}: the walk stops at {max_entities} entities")
            continue
        seen.add(name)
        result.reads.append(name)
        try:
            entity = await fetch(name)
        except WalkRefused as exc:
            result.refused.append(f"{name!r}: {exc}")
            continue
        if entity is None:
            result.refused.append(f"{name!r}: unknown entity (the catalog has no component {name!r})"
                                  + (f", named by {path[-1]!r}" if path else ""))
            continue
        if entity.kind.lower() != "component" or entity.metadata.name != name:
            result.refused.append(f"{name!r}: the catalog answered with {entity.kind} {entity.metadata.name[:40]!r}")
            continue
        entry = CatalogEntry(name=name, owner=entity.spec.owner[:100], system=entity.spec.system[:100],
                             lifecycle=entity.spec.lifecycle[:50],
                             annotations=kept_annotations(entity.metadata.annotations), depth=depth)
        if len(entity.spec.dependsOn) > MAX_DEPENDS_ON:
            result.refused.append(f"{name}.dependsOn: {len(entity.spec.dependsOn)} entries, only the first "
                                  f"{MAX_DEPENDS_ON} followed")
        for raw in entity.spec.dependsOn[:MAX_DEPENDS_ON]:
            ref = parse_ref(raw)
            why = ref_problem(ref, pattern)
            if why is not None:
                result.refused.append(f"{name}.dependsOn {raw[:60]!r}: {why}")
                continue
            if ref.name == name or ref.name in path:
                cycle = " -> ".join((*path, name, ref.name))
                result.refused.append(f"{name}.dependsOn {ref.name!r}: a cycle ({cycle})")
                continue
            entry.depends_on.append(ref.name)
            if depth + 1 <= max_depth:
                queue.append((ref.name, depth + 1, (*path, name)))
        result.entries.append(entry)
    return result


def dependents_of(target: str, entities: list[Entity], pattern: str = NAME_PATTERN) -> list[str]:
    """Names of the components whose ``dependsOn`` names ``target`` (validated names only)."""
    out: list[str] = []
    for entity in entities:
        name = entity.metadata.name
        if ref_problem(parse_ref(name), pattern) is not None:
            continue
        if any(parse_ref(r).name == target for r in entity.spec.dependsOn) and name not in out:
            out.append(name)
    return out


def entity_from_json(data: Any) -> Entity:
    return Entity.model_validate(data)
