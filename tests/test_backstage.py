"""The real Backstage catalog backend, as Firebreak's catalog walk meets it.

These pin the semantics the walk relies on, read off the real thing (npm's
@backstage/plugin-catalog-backend on PostgreSQL), not off Firebreak's own subset of its API:
``spec.*`` holds references exactly as written, while ``relations`` carry full
``kind:namespace/name`` references in both directions.
"""

from __future__ import annotations

import httpx

from demo.backstage import BackstageProcess


def relations(backstage: BackstageProcess, ref: str) -> dict[str, set[str]]:
    kind, _, rest = ref.partition(":")
    namespace, _, name = rest.partition("/")
    entity = httpx.get(f"{backstage.url}/api/catalog/entities/by-name/{kind}/{namespace}/{name}", timeout=10)
    entity.raise_for_status()
    out: dict[str, set[str]] = {}
    for relation in entity.json()["relations"]:
        out.setdefault(relation["type"], set()).add(relation["targetRef"])
    return out


def names(backstage: BackstageProcess, query: str) -> set[str]:
    found = httpx.get(f"{backstage.url}/api/catalog/entities", params={"filter": query}, timeout=10)
    found.raise_for_status()
    return {f"{e['kind'].lower()}:{e['metadata']['namespace']}/{e['metadata']['name']}" for e in found.json()}


def test_relations_resolve_short_references_in_both_directions(backstage: BackstageProcess):
    checkout = relations(backstage, "component:default/checkout")
    assert checkout["dependsOn"] == {"component:default/payments", "component:default/inventory",
                                     "resource:default/orders-db"}
    payments = relations(backstage, "component:default/payments")
    # The namespace written in the reference wins; the default-namespace decoy is not named.
    assert payments["dependsOn"] == {"component:billing/ledger"}
    assert payments["dependencyOf"] == {"component:default/checkout", "component:default/orders"}
    assert relations(backstage, "resource:default/artists-db")["dependencyOf"] == {"component:default/artist-lookup"}


def test_spec_filters_match_as_written_and_relation_filters_match_full_references(backstage: BackstageProcess):
    # checkout wrote `component:payments`, orders `component:default/payments`: a spec filter finds one.
    assert names(backstage, "spec.dependsOn=component:default/payments") == {"component:default/orders"}
    assert names(backstage, "relations.dependsOn=component:default/payments") == {
        "component:default/checkout", "component:default/orders"}
    assert names(backstage, "relations.dependsOn=component:billing/ledger") == {"component:default/payments"}
    assert names(backstage, "relations.dependsOn=component:default/ledger") == set()
