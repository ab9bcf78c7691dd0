"""The catalog walk as part of an investigation: each entity read holds its own ``catalog.read`` grant.

Reads the Backstage catalog REST API subset. A name reaches a URL only after the walk validated it
(firebreak.catalog.walk) and only as an escaped path segment or query value; each read asks the broker
for a credential naming exactly that entity (``component/payments``), so history shows one grant per read
and the broker refuses any read its runbook does not declare.
"""

from __future__ import annotations

from typing import Any

from temporalio.exceptions import ApplicationError

from activities.credentials import activity_credential
from activities.deps import ActivityDeps
from activities.targets import reason
from firebreak.catalog import (
    DEFAULT_NAMESPACE,
    MAX_DEPENDS_ON,
    CatalogEntry,
    CatalogWalk,
    Entity,
    WalkRefused,
    kept_annotations,
    parse_ref,
    ref_problem,
    walk,
)
from firebreak.contracts import Evidence, Grant, InvestigateRequest
from firebreak.escaping import path_segment, render_plain


class CatalogError(Exception):
    """The catalog answered with something other than an entity or a 404."""


class CatalogReader:
    """One walk's reads: every one minted, made and recorded on its own."""

    def __init__(self, deps: ActivityDeps, request: InvestigateRequest, pattern: str) -> None:
        self.deps, self.request, self.pattern = deps, request, pattern
        self.spec = request.spec
        self.base = deps.target_url(self.spec.target)
        self.grants: list[Grant] = []
        self.refused: list[str] = []
        self.read_names: set[str] = set()

    async def _get(self, name: str, url: str, params: dict[str, str] | None = None) -> Any:
        """GET with a credential for ``component/{name}``; None on 404."""
        if name == self.request.params.get("service"):
            params_for, template = dict(self.request.params), self.spec.resource
        else:
            params_for, template = {**self.request.params, "dependency": name}, self.spec.follow
        resource = render_plain(template, params_for)
        try:
            async with activity_credential(
                self.deps, audience=self.spec.target, verb=self.spec.scope, resource=resource,
                runbook=self.request.runbook, params=params_for, step_id=f"{self.spec.id}:{name}",
            ) as credential:
                self.grants.append(credential.grant)
                response = await self.deps.http.get(url, params=params,
                                                    headers={"Authorization": f"Bearer {credential.token}"})
        except ApplicationError as exc:
            if exc.type != "MintRefused":
                raise  # frozen credentials hold the incident; they are not a refusal of this read
            raise WalkRefused(exc.message) from None
        if response.status_code >= 500:
            response.raise_for_status()
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise CatalogError(f"HTTP {response.status_code} for {resource}: {reason(response)}")
        return response.json()

    async def fetch(self, name: str) -> Entity | None:
        url = (f"{self.base}/api/catalog/entities/by-name/component/{path_segment(DEFAULT_NAMESPACE)}/"
               f"{path_segment(name)}")
        body = await self._get(name, url)
        return None if body is None else Entity.model_validate(body)

    async def dependents(self, name: str) -> list[Entity]:
        """Components whose spec.dependsOn names ``name`` (a Backstage filter query)."""
        body = await self._get(name, f"{self.base}/api/catalog/entities",
                               {"filter": f"kind=component,spec.dependsOn=component:{DEFAULT_NAMESPACE}/{name}"})
        items = body.get("items", []) if isinstance(body, dict) else (body or [])
        return [Entity.model_validate(e) for e in items]


async def read_catalog(deps: ActivityDeps, request: InvestigateRequest, evidence: Evidence) -> None:
    """Walk from the service along dependsOn, then find who depends on the service and each dependency."""
    spec = request.spec
    # The runbook's own pattern for what the walk yields (its derived `dependency` param).
    pattern = request.name_pattern or r"^[a-z][a-z0-9-]{0,30}$"
    reader = CatalogReader(deps, request, pattern)
    service = request.params["service"]
    evidence.query = f"GET {reader.base}/api/catalog/entities/by-name/component/{DEFAULT_NAMESPACE}/{service} (walk)"
    result: CatalogWalk = await walk(service, reader.fetch, max_depth=spec.depth, pattern=pattern)
    # Blast radius: who depends (transitively) on the service and on each dependency.
    queue = [service, *result.dependencies]
    asked: set[str] = set()
    while queue and len(asked) < 20:
        name = queue.pop(0)
        if name in asked:
            continue
        asked.add(name)
        result.reads.append(f"dependents of {name}")
        try:
            found = await reader.dependents(name)
        except WalkRefused as exc:  # the broker refused this read: say so, go on
            result.refused.append(f"dependents of {name!r}: {exc}")
            continue
        names: list[str] = []
        for entity in found[:MAX_DEPENDS_ON]:
            ref = parse_ref(entity.metadata.name)
            why = ref_problem(ref, pattern)
            if why is not None:
                result.refused.append(f"dependent of {name}: {why}")
                continue
            names.append(ref.name)
            if result.entry(ref.name) is None:
                result.entries.append(CatalogEntry(
                    name=ref.name, owner=entity.spec.owner[:100], system=entity.spec.system[:100],
                    lifecycle=entity.spec.lifecycle[:50], annotations=kept_annotations(entity.metadata.annotations),
                    depth=-1, depends_on=[r for r in (parse_ref(d).name for d in entity.spec.dependsOn[:MAX_DEPENDS_ON])
                                          if ref_problem(parse_ref(r), pattern) is None],
                ))
            queue.append(ref.name)
        entry = result.entry(name)
        if entry is not None:
            entry.dependents = sorted(set(names))
    evidence.catalog = result
    evidence.grants = reader.grants
    evidence.grant = reader.grants[0] if reader.grants else None
    if result.refused:
        # Refusals are evidence too: they are shown, and the rest of the walk stands.
        evidence.gap = f"{spec.id}: refused " + "; ".join(result.refused)[:1500]

