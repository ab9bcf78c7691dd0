"""The broker's own read of the service catalog: a plan's dependency and blast radius are checked against it.

The worker's catalog walk fills a plan's ``dependency`` param and its ``impact``. A compromised worker
could name any pattern-valid service as a "dependency", or understate the dependents to slip under
``remediate.caps.max_dependents``. So the broker reads the catalog itself, with a token it signs for
audience ``catalog`` naming the entity read (as any reader must; each read goes to its audit log), and
refuses what its own read contradicts. A catalog it cannot reach refuses (503: retryable), never passes.

Catalog reads themselves are not checked here: the walk legitimately follows dependencies of dependencies
and dependents of dependents, and a catalog read reveals nothing the broker does not read too. What the
walk yields is checked where it matters: a change-log or metrics read for a dependency, and a write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from firebreak.blast_radius import BlastRadius, compute
from firebreak.broker.models import MintRequest
from firebreak.broker.rules import Denied
from firebreak.catalog import (
    DEFAULT_NAMESPACE,
    NAME_PATTERN,
    CatalogEntry,
    CatalogWalk,
    Entity,
    dependents_of,
    parse_ref,
    ref_problem,
)
from firebreak.contracts import Plan
from firebreak.correlation import step_target
from firebreak.escaping import path_segment
from firebreak.runbook import Runbook

AUDIENCE = "catalog"
VERB = "catalog.read"
CACHE_S = 30.0  # a burst of mints (one per read of a walk) reads each entity once
MAX_ENTITIES = 50  # bound the broker's own dependents walk, as the worker's is bounded


class CatalogUnavailable(Exception):
    """The broker could not read its catalog: the mint is refused (503), and the worker may retry."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# mint(resource, workflow_id) -> a token for one catalog.read of that resource
Mint = Callable[[str, str], str]
# record(resource, workflow_id, outcome): the broker's own read, for its audit log
Record = Callable[[str, str, str], None]


class BrokerCatalog:
    """Reads of the Backstage catalog REST API subset, cached for ``cache_s``; errors are never cached."""

    def __init__(self, url: str | None, mint: Mint, record: Record, *, cache_s: float = CACHE_S,
                 timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/") if url else None
        self._mint, self._record = mint, record
        self.cache_s, self.timeout_s = cache_s, timeout_s
        self._cache: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def _get(self, name: str, path: str, params: dict[str, str] | None, workflow_id: str) -> Any:
        """The JSON body, None on 404; ``name`` is already validated (it only reaches the URL escaped)."""
        if not self.url:
            raise CatalogUnavailable("the broker has no catalog configured (--catalog-url)")
        key = f"{path}?{sorted((params or {}).items())}"
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.cache_s:
            return hit[1]
        resource = f"component/{name}"
        try:
            response = httpx.get(f"{self.url}{path}", params=params, timeout=self.timeout_s,
                                 headers={"Authorization": f"Bearer {self._mint(resource, workflow_id)}"})
        except httpx.HTTPError as exc:
            self._record(resource, workflow_id, f"unreachable ({type(exc).__name__})")
            raise CatalogUnavailable(f"catalog at {self.url} unreachable ({type(exc).__name__})") from None
        self._record(resource, workflow_id, f"HTTP {response.status_code}")
        if response.status_code == 404:
            body = None
        elif response.status_code != 200:
            raise CatalogUnavailable(f"catalog answered HTTP {response.status_code} for {resource}")
        else:
            try:
                body = response.json()
            except ValueError:
                raise CatalogUnavailable(f"catalog answered with no JSON for {resource}") from None
        with self._lock:
            self._cache[key] = (now, body)
        return body

    def entity(self, name: str, workflow_id: str) -> Entity | None:
        path = f"/api/catalog/entities/by-name/component/{path_segment(DEFAULT_NAMESPACE)}/{path_segment(name)}"
        body = self._get(name, path, None, workflow_id)
        try:
            return None if body is None else Entity.model_validate(body)
        except ValueError:
            raise CatalogUnavailable(f"catalog entity {name!r} is not a Backstage entity") from None

    def dependents(self, name: str, workflow_id: str) -> list[Entity]:
        """Components whose spec.dependsOn names ``name`` (the filter query the worker's walk uses too)."""
        body = self._get(name, "/api/catalog/entities", {
            "filter": f"kind=component,spec.dependsOn=component:{DEFAULT_NAMESPACE}/{name}"}, workflow_id)
        items = body.get("items", []) if isinstance(body, dict) else (body or [])
        try:
            return [Entity.model_validate(e) for e in items]
        except ValueError:
            raise CatalogUnavailable(f"catalog answered dependents of {name!r} that are not entities") from None


def _valid(name: str, pattern: str) -> bool:
    return ref_problem(parse_ref(name), pattern) is None


def check_dependency(catalog: BrokerCatalog, service: str, dependency: str, workflow_id: str) -> None:
    """``component:<dependency>`` must be in ``spec.dependsOn`` of the alerting service's entity."""
    entity = catalog.entity(service, workflow_id)
    if entity is None:
        raise Denied(f"{dependency} is not a dependency of {service} in the catalog ({service} is not in it)")
    if dependency not in {parse_ref(ref).name for ref in entity.spec.dependsOn}:
        raise Denied(f"{dependency} is not a dependency of {service} in the catalog")


def catalog_radius(catalog: BrokerCatalog, target: str, pattern: str, workflow_id: str) -> BlastRadius:
    """The target's transitive dependents per the broker's own read, through blast_radius.compute."""
    walk = CatalogWalk(root=target)
    queue, seen = [target], set()
    while queue and len(seen) < MAX_ENTITIES:
        name = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        found = catalog.dependents(name, workflow_id)
        names = dependents_of(name, found, pattern)  # validated names only, as the worker's walk keeps
        walk.entries.append(CatalogEntry(name=name, dependents=names))
        queue += names
    return compute(target, walk, max_dependents=MAX_ENTITIES)


def check_impact(catalog: BrokerCatalog, plan: Plan, runbook: Runbook, pattern: str, workflow_id: str) -> None:
    """Each step's dependents per the catalog: none may be missing from ``plan.impact``, nor over the cap."""
    cap = runbook.remediate.caps.max_dependents
    for step in plan.steps:
        target = step_target(step.resource)
        if not _valid(target, pattern):
            continue  # not a catalog component name: nothing the catalog could say about it
        radius = catalog_radius(catalog, target, pattern, workflow_id)
        names = [d.name for d in radius.dependents]
        if cap is not None and len(names) > cap:
            raise Denied(f"caps.max_dependents: the catalog says step {step.id} on {target} reaches {len(names)} "
                         f"dependents ({', '.join(names)}), at most {cap}")
        claimed = plan.impact.get(step.id) if plan.impact else None
        if claimed is None:
            # Left out or empty is a refusal, never a skip: the check needs the plan's claim to compare.
            raise Denied(f"impact: the plan states no blast radius for step {step.id} on {target}; "
                         f"the broker checks it against the catalog{' (caps.max_dependents)' if cap is not None else ''}")
        missing = [n for n in names if n not in {d.name for d in claimed.dependents}]
        if missing:
            raise Denied(f"the plan's blast radius of step {step.id} on {target} omits {', '.join(missing)}, "
                         f"{'a dependent' if len(missing) == 1 else 'dependents'} of {target} in the catalog")


def _walks_catalog(runbook: Runbook) -> bool:
    return any(spec.kind == "catalog" for spec in runbook.investigate)


def check_request(catalog: BrokerCatalog, req: MintRequest, runbook: Runbook | None) -> None:
    """Raise Denied (contradicted by the catalog) or CatalogUnavailable; return when nothing is contradicted.

    ``runbook``: the one the write's plan pins (None for a read). Names that fail the pattern are left
    to the rules, which refuse them: they never reach the catalog.
    """
    if req.is_read:
        params = req.params
        if req.audience == AUDIENCE or "dependency" not in params:
            return
    else:
        if req.plan is None or runbook is None:
            return  # no plan: the rules refuse it, naming why
        params = req.plan.params or {}
    pattern = runbook.params["dependency"].pattern if runbook and "dependency" in runbook.params else NAME_PATTERN
    dependency, service = params.get("dependency"), params.get("service")
    if dependency is not None:
        if service is None:
            raise Denied("a dependency param needs the service it is a dependency of")
        if not (_valid(dependency, pattern) and _valid(service, NAME_PATTERN)):
            return  # off the pattern: the rules refuse it, naming the param
        check_dependency(catalog, service, dependency, req.workflow_id)
    if req.is_read or runbook is None or req.plan is None:
        return
    # The blast radius is a catalog fact where the runbook caps it or walks the catalog to compute it.
    if runbook.remediate.caps.max_dependents is not None or _walks_catalog(runbook):
        check_impact(catalog, req.plan, runbook, pattern, req.workflow_id)
