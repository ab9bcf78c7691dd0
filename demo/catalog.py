"""The demo fleet's service catalog, served as the Backstage catalog REST API subset Firebreak reads.

* ``GET /api/catalog/entities/by-name/{kind}/{namespace}/{name}``
* ``GET /api/catalog/entities?filter=kind=component,spec.dependsOn=component:default/payments``

Every read needs a broker-minted token for the audience ``catalog`` with verb ``catalog.read`` on
``component/{name}`` (the entity read; for a filter, the entity its ``spec.dependsOn`` names), checked
by :class:`firebreak.signing.TargetVerifier` like the fleet's own API. Pointing Firebreak at a real
Backstage is a ``targets: catalog:`` URL.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

AUDIENCE = "catalog"


# The demo's PagerDuty service ids (checkout's is the one in tests/data/webhooks' PagerDuty bodies).
PAGERDUTY_SERVICES = {"checkout": "P7CHKT2", "payments": "P3PAYMT", "inventory": "P9INVTR", "orders": "P5ORDRS"}


def _component(name: str, owner: str, lifecycle: str, depends_on: list[str], description: str) -> dict[str, Any]:
    return {
        "apiVersion": "backstage.io/v1alpha1",
        "kind": "Component",
        "metadata": {
            "name": name, "namespace": "default", "description": description,
            # pagerduty.com/service-id: the annotation Backstage's PagerDuty plugin reads; Firebreak's intake maps
            # that PagerDuty service's incidents to this component's labels (firebreak.api.sources).
            "annotations": {"prometheus.io/job": "fleet", "firebreak.dev/runbook": "bad-deploy",
                            "firebreak.dev/namespace": "shop", "pagerduty.com/service-id": PAGERDUTY_SERVICES[name]},
        },
        "spec": {"type": "service", "owner": owner, "system": "shop", "lifecycle": lifecycle,
                 "dependsOn": [f"component:default/{d}" for d in depends_on]},
    }


# checkout -> payments, checkout -> inventory; orders -> payments, so a payments failure has two dependents.
ENTITIES: list[dict[str, Any]] = [
    _component("checkout", "team-storefront", "production", ["payments", "inventory"], "Takes orders and payment"),
    _component("payments", "team-payments", "production", [], "Charges cards"),
    _component("inventory", "team-fulfilment", "production", [], "Stock levels"),
    _component("orders", "team-fulfilment", "experimental", ["payments"], "Order history and repeat orders"),
]
# Calls per second from each caller to each callee (a mesh's client view); orders is not simulated as a
# service, only as a caller of payments.
EXTERNAL_CALLERS: dict[str, dict[str, float]] = {"orders": {"payments": 10.0}}


def depends_on(entities: list[dict[str, Any]] | None = None) -> dict[str, list[str]]:
    """name -> the names it depends on."""
    return {e["metadata"]["name"]: [r.rsplit("/", 1)[-1] for r in e["spec"].get("dependsOn", [])]
            for e in (entities if entities is not None else ENTITIES)}


def _matches(entity: dict[str, Any], key: str, value: str) -> bool:
    node: Any = entity
    for part in key.split("."):
        if not isinstance(node, dict):
            return False
        node = next((v for k, v in node.items() if k.lower() == part.lower()), None)
    values = node if isinstance(node, list) else [node]
    return any(isinstance(v, str) and v.lower() == value.lower() for v in values)


def _error(status: int, error: str, reason: str) -> JSONResponse:
    return JSONResponse({"error": {"name": error, "message": reason}}, status_code=status)


def add_routes(app: FastAPI, verifier: Any, entities: list[dict[str, Any]] | None = None,
               bearer: Callable[[Request], str | None] | None = None) -> None:
    """Serve ``entities`` (default: the demo's) on ``app``, each read checked by ``verifier``."""
    from firebreak.signing import TokenRejected

    data = entities if entities is not None else ENTITIES
    app.state.catalog_requests = []  # every request as it arrived: tests prove what was (never) asked

    def token_of(request: Request) -> str | None:
        if bearer is not None:
            return bearer(request)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    async def authorize(request: Request, name: str) -> JSONResponse | None:
        token = token_of(request)
        if token is None:
            return _error(401, "AuthenticationError", "missing bearer token")
        try:
            await run_in_threadpool(verifier.verify, token, verb="catalog.read", resource=f"component/{name}")
        except TokenRejected as exc:
            if exc.status == 503:  # cannot check revocations right now: a retry may pass
                return _error(503, "ServiceUnavailableError", exc.reason)
            return _error(403 if exc.status == 403 else 401, "NotAllowedError", exc.reason)
        return None

    @app.get("/api/catalog/entities/by-name/{kind}/{namespace}/{name}")
    async def by_name(request: Request, kind: str, namespace: str, name: str) -> Response:
        app.state.catalog_requests.append(request.url.path)
        refused = await authorize(request, name)
        if refused is not None:
            return refused
        for entity in data:
            meta = entity["metadata"]
            if (entity["kind"].lower(), meta.get("namespace", "default"), meta["name"]) == (kind.lower(), namespace, name):
                return JSONResponse(copy.deepcopy(entity))
        return _error(404, "NotFoundError", f"No entity named '{name}' found, with kind '{kind}' in namespace "
                                            f"'{namespace}'")

    @app.get("/api/catalog/entities")
    async def by_filter(request: Request, filter: str = "") -> Response:  # noqa: A002 - Backstage's name
        app.state.catalog_requests.append(f"{request.url.path}?{request.url.query}")
        pairs = [p.partition("=") for p in filter.split(",") if p]
        if not pairs or any(not sep for _, sep, _ in pairs):
            return _error(400, "InputError", "filter must be KEY=VALUE[,KEY=VALUE...]")
        # A token names one entity: a filter is read as a read of the entity its dependsOn names.
        named = next((v.rsplit("/", 1)[-1] for k, _, v in pairs if k.lower() == "spec.dependson"), None)
        if named is None:
            return _error(403, "NotAllowedError", "only spec.dependsOn filters are served: a read names its entity")
        refused = await authorize(request, named)
        if refused is not None:
            return refused
        return JSONResponse([copy.deepcopy(e) for e in data if all(_matches(e, k, v) for k, _, v in pairs)])
