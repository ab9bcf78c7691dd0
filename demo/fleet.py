"""The demo fleet: three simulated services for Firebreak to remediate.

One process serves everything a runbook touches:

* ``GET /metrics``: Prometheus text format, written by hand (no client library),
  for the request counter, the latency histogram, CPU, replicas, serving and
  deploy info of ``checkout``, ``payments`` and ``inventory`` in namespace ``shop``;
* the managed API (``/services/{name}``...): reads need a ``fleet.read`` token,
  each write a token for exactly that verb and service, checked by
  :class:`firebreak.signing.TargetVerifier` with audience ``fleet``;
* the demo control (``/demo/faults`` behind a chaos token, ``/demo/state``).

Traffic is not generated request by request: each service has a request rate, an
error mix and a latency distribution that follow from its state, and the counters
are the integral of those rates over real time. The state is piecewise constant
between events (every change first integrates up to "now" with the old state), so
counters are exact, monotonic, and ``rate()`` in Prometheus sees clean steps.

Run it with ``python -m demo.fleet --port 9300 --broker-url URL --chaos-token TOKEN``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from demo.catalog import EXTERNAL_CALLERS, depends_on
from demo.catalog import AUDIENCE as CATALOG_AUDIENCE
from demo.catalog import add_routes as add_catalog_routes
from firebreak.serving import ThreadedServer
from firebreak.signing import TargetVerifier, TokenRejected, check_request_binding

log = logging.getLogger("demo.fleet")

NAMESPACE = "shop"
AUDIENCE = "fleet"
STANDING_SUBJECT = "standing-token"  # the author of changes made with --standing-token-env
SERVICES: tuple[str, ...] = ("checkout", "payments", "inventory")
INITIAL_VERSIONS = {"checkout": "v41", "payments": "v17", "inventory": "v8"}
INITIAL_REPLICAS = 3
# Who calls whom, from the demo catalog (demo/catalog.py): checkout -> payments, inventory.
DEPENDS_ON: dict[str, list[str]] = depends_on()
# How long a write's Idempotency-Key is kept: longer than any authorization the broker issues lives
# (at most the runbook's execution window), so a second token for a step never writes twice.
IDEMPOTENCY_RETENTION_S = 2 * 86400.0
SYNTHETIC_PREFIX = "bench-"  # synthetic services: bench-00000, bench-00001, ...
MIN_REPLICAS, MAX_REPLICAS = 1, 30

# -- the traffic model ---------------------------------------------------------
# Healthy: 40 req/s on 3 replicas at 30% CPU, so one replica handles 44.4 req/s
# at 100%. Saturation multiplies the load so 3 replicas sit at 95%; doubling the
# replicas halves utilisation to 47.5%, under the 60% the demo promises.
BASE_RPS = 40.0
HEALTHY_UTILISATION = 0.30
REPLICA_CAPACITY_RPS = BASE_RPS / (HEALTHY_UTILISATION * INITIAL_REPLICAS)
SATURATION_LOAD = 0.95 / HEALTHY_UTILISATION
STUCK_CPU = 0.02  # a deadlocked process burns almost nothing

# Error mix of served requests, by code: a healthy version answers 0.5% 5xx, the
# bad deploy 25%. Above 100% utilisation the excess is shed as 503s on top.
HEALTHY_ERRORS = {"500": 0.004, "503": 0.001}
BAD_ERRORS = {"500": 0.20, "503": 0.05}
CODES = ("200", "500", "503")

# Latency is log-normal. Its median grows like a queue's waiting time, 1/(1-u):
# 40 ms at 30% utilisation (p99 ~0.23 s by the histogram), ~0.56 s at 95%
# (p99 ~2.3 s), ~53 ms at 47.5% (p99 ~0.25 s). Utilisation is capped for the
# formula so an overloaded service stays finite.
LATENCY_MEDIAN_S = 0.04
LATENCY_SIGMA = 0.6
LATENCY_U_CAP = 0.97
# The buckets are dense between 0.5 s and 2.5 s so that histogram_quantile's
# linear interpolation lands near the true p99 in the range the alerts care about.
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0)

# "clear" ends a fault; "reset" also gives the service a fresh start (see Fleet.inject).
# "dependency" is a bad deploy whose errors the service's callers cannot absorb: they fail through
# (by default a caller absorbs a callee's errors with retries and fallbacks, and only the mesh sees them).
FaultKind = Literal["bad_deploy", "saturation", "stuck", "dependency", "clear", "reset"]
ChangeKind = Literal["deploy", "rollback", "restart", "scale"]

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_VERSION_NUMBER = re.compile(r"^(.*?)(\d+)$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def rfc3339(ts: float) -> str:
    """Seconds since the epoch as RFC 3339 UTC with a ``Z``, e.g. ``2025-01-02T03:04:05.678Z``."""
    return _utc(ts).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """RFC 3339 (``Z`` or offset; a naive time is refused) to seconds since the epoch."""
    parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("a timezone is required (e.g. Z)")
    return parsed.timestamp()


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


class FleetError(Exception):
    """A refused fleet operation, carried to the HTTP layer as ``{"error", "reason"}``."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason


# -- one simulated service -------------------------------------------------------


@dataclass
class _Service:
    name: str
    version: str
    replicas: int
    previous_version: str | None = None
    stuck: bool = False
    saturated: bool = False
    bad_versions: set[str] = field(default_factory=set)
    propagates: bool = False  # its callers fail with it (the "dependency" fault)
    # Share of served requests failed by a callee that propagates: set by the fleet before each step.
    dependency_errors: float = 0.0
    # Integrated since start; exposed floored so counters stay integral and monotonic.
    requests: dict[str, float] = field(default_factory=lambda: {code: 0.0 for code in CODES})
    buckets: list[float] = field(default_factory=lambda: [0.0] * (len(BUCKETS) + 1))  # last is +Inf
    duration_sum: float = 0.0

    @property
    def serving(self) -> bool:
        return not self.stuck and self.replicas > 0

    @property
    def offered_rps(self) -> float:
        return BASE_RPS * (SATURATION_LOAD if self.saturated else 1.0)

    @property
    def utilisation(self) -> float:
        return self.offered_rps / (max(self.replicas, 1) * REPLICA_CAPACITY_RPS)

    @property
    def cpu(self) -> float:
        return STUCK_CPU if self.stuck else min(self.utilisation, 1.0)

    @property
    def latency_median(self) -> float:
        u = min(self.utilisation, LATENCY_U_CAP)
        return LATENCY_MEDIAN_S * (1.0 - HEALTHY_UTILISATION) / (1.0 - u)

    def code_rates(self) -> dict[str, float]:
        """Requests per second answered with each code in the current state."""
        if not self.serving:
            return {code: 0.0 for code in CODES}
        u = self.utilisation
        shed = max(0.0, 1.0 - 1.0 / u) if u > 1.0 else 0.0
        served = self.offered_rps * (1.0 - shed)
        mix = dict(BAD_ERRORS if self.version in self.bad_versions else HEALTHY_ERRORS)
        if self.dependency_errors:
            # A request fails through a callee only if it had not already failed on its own.
            mix["500"] += (1.0 - sum(mix.values())) * self.dependency_errors
        rates = {code: served * share for code, share in mix.items()}
        rates["503"] += self.offered_rps * shed
        rates["200"] = served * (1.0 - sum(mix.values()))
        return rates

    def error_ratio(self) -> float:
        """Share of calls to this service that fail (a stuck one fails every call)."""
        if not self.serving:
            return 1.0
        rates = self.code_rates()
        total = sum(rates.values())
        return (rates["500"] + rates["503"]) / total if total else 0.0

    def p99_estimate(self) -> float:
        return self.latency_median * math.exp(2.3263 * LATENCY_SIGMA)

    def advance(self, dt: float) -> None:
        """Integrate dt seconds of traffic in the current (constant) state."""
        if dt <= 0 or not self.serving:
            return
        rates = self.code_rates()
        n = sum(rates.values()) * dt
        for code, rate in rates.items():
            self.requests[code] += rate * dt
        median = self.latency_median
        for i, le in enumerate(BUCKETS):
            self.buckets[i] += n * _normal_cdf((math.log(le) - math.log(median)) / LATENCY_SIGMA)
        self.buckets[-1] += n
        self.duration_sum += n * median * math.exp(LATENCY_SIGMA**2 / 2.0)  # log-normal mean


def _next_version(version: str, taken: set[str]) -> str:
    """``v41`` -> ``v42`` (skipping versions already seen); anything else gets ``-next``."""
    match = _VERSION_NUMBER.match(version)
    prefix, number = (match.group(1), int(match.group(2))) if match else (f"{version}-", 0)
    candidate = f"{prefix}{number + 1}"
    while candidate in taken:
        number += 1
        candidate = f"{prefix}{number + 1}"
    return candidate


# -- the fleet -------------------------------------------------------------------------


class Fleet:
    """The simulated services, their change log and their metrics. Thread-safe.

    ``clock`` returns seconds since the epoch; tests pass a manual clock to move
    time forward without sleeping.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, history_age_s: float = 3 * 86400,
                 synthetic: int = 0) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        now = clock()
        self._last = now
        self._seq = 0
        self._services: dict[str, _Service] = {
            name: _Service(name=name, version=INITIAL_VERSIONS[name], replicas=INITIAL_REPLICAS) for name in SERVICES
        }
        self._changes: list[dict[str, Any]] = []
        self._mesh: dict[tuple[str, str], dict[str, float]] = {}
        # What a real target may return beside the result (session ids, internal URLs): tests put a
        # canary here to prove Firebreak keeps none of it in history.
        self.response_extras: dict[str, Any] = {}
        # Services under a change freeze at the target: every write answers 409, as a locked
        # deployment would (tests use it to make an undo fail).
        self.locked: set[str] = set()
        # The running versions were deployed long before the demo starts, so a
        # "change in the last 30 minutes" question answers no until a fault or a person acts.
        self._history_age_s = history_age_s
        for svc in self._services.values():
            self._record_origin(svc, now)
        # The modelled services carry traffic and metrics; synthetic ones only take reads and writes.
        self._modelled = tuple(self._services.values())
        for i in range(synthetic):
            self._add_synthetic(f"{SYNTHETIC_PREFIX}{i:05d}", now)

    def _add_synthetic(self, name: str, now: float) -> None:
        """A service for benchmarks (``--synthetic-services``), so hundreds of incidents run at once with
        distinct ids: it runs a bad deploy made just now, so a rollback has somewhere to go. No traffic and
        no metrics, so that thousands of them cost a request nothing."""
        svc = _Service(name=name, version="v2", replicas=INITIAL_REPLICAS, previous_version="v1",
                       bad_versions={"v2"})
        self._services[name] = svc
        self._record(svc, "deploy", author="ci-bot", version="v2", previous_version="v1",
                     description="deploy v2 (was v1) from the CI pipeline", at=now)

    def _record_origin(self, svc: _Service, now: float) -> None:
        self._record(svc, "deploy", author="ci-bot", version=svc.version, previous_version=None,
                     description=f"deploy {svc.version}", at=now - self._history_age_s)

    # ---- time ----

    def _advance_locked(self) -> float:
        now = self._clock()
        dt = now - self._last
        if dt > 0:  # a wall clock stepping back must never make a counter fall
            self._propagate()
            self._advance_mesh(dt)
            for svc in self._modelled:
                svc.advance(dt)
            self._last = now
        return max(now, self._last)

    def _propagate(self) -> None:
        """Each caller's share of requests failed through a callee that propagates (the state since the last step)."""
        for svc in self._modelled:
            svc.dependency_errors = 0.0
        for _ in range(2):  # callees first: the demo graph is two levels deep
            for svc in self._modelled:
                ok = 1.0
                for callee in DEPENDS_ON.get(svc.name, ()):
                    dep = self._services.get(callee)
                    if dep is not None and dep.propagates:
                        ok *= 1.0 - dep.error_ratio()
                svc.dependency_errors = 1.0 - ok

    def _advance_mesh(self, dt: float) -> None:
        """Client-side call counters from each caller to each callee, as a service mesh exports them."""
        calls: list[tuple[str, str, float]] = []
        for svc in self._modelled:
            rate = sum(svc.code_rates().values()) if svc.serving else 0.0
            calls += [(svc.name, callee, rate) for callee in DEPENDS_ON.get(svc.name, ())]
        for caller, callees in EXTERNAL_CALLERS.items():
            calls += [(caller, callee, rate) for callee, rate in callees.items()]
        for source, destination, rate in calls:
            dep = self._services.get(destination)
            if dep is None:
                continue
            counters = self._mesh.setdefault((source, destination), {code: 0.0 for code in CODES})
            if not dep.serving:
                counters["503"] += rate * dt
                continue
            codes = dep.code_rates()
            total = sum(codes.values()) or 1.0
            for code, value in codes.items():
                counters[code] += rate * dt * value / total

    def advance(self) -> None:
        """Integrate traffic up to now (reads do this themselves)."""
        with self._lock:
            self._advance_locked()

    # ---- lookups ----

    def has(self, name: str) -> bool:
        return name in self._services

    def _get(self, name: str) -> _Service:
        svc = self._services.get(name)
        if svc is None:
            raise FleetError(404, "not_found", f"no service {name!r} in namespace {NAMESPACE}")
        return svc

    def _record(self, svc: _Service, kind: ChangeKind, *, author: str, version: str | None,
                previous_version: str | None, description: str, at: float | None = None) -> dict[str, Any]:
        self._seq += 1
        record = {
            "id": f"chg-{self._seq:06d}",
            "service": svc.name,
            "kind": kind,
            "at": rfc3339(self._clock() if at is None else at),
            "version": version,
            "previous_version": previous_version,
            "author": author,
            "description": description,
        }
        self._changes.append(record)
        log.info("change %s %s %s by %s: %s", record["id"], svc.name, kind, author, description)
        return record

    # ---- the managed API ----

    def service_state(self, name: str) -> dict[str, Any]:
        """What an operator sees: no fault flags, only observable state."""
        with self._lock:
            self._advance_locked()
            svc = self._get(name)
            return {
                "name": svc.name,
                "namespace": NAMESPACE,
                "version": svc.version,
                "previous_version": svc.previous_version,
                "replicas": svc.replicas,
                "serving": svc.serving,
                "state": "serving" if svc.serving else "stuck",
                "cpu_utilization": round(svc.cpu, 4),
            }

    def changes(self, name: str, since: float | None = None) -> list[dict[str, Any]]:
        with self._lock:
            self._get(name)
            return [
                dict(c) for c in self._changes
                if c["service"] == name and (since is None or parse_rfc3339(c["at"]) >= since)
            ]

    def deploy(self, name: str, version: str, *, author: str, note: str = "") -> dict[str, Any]:
        if not _VERSION.match(version):
            raise FleetError(422, "invalid_request", "version must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
        with self._lock:
            self._advance_locked()
            svc = self._get(name)
            old = svc.version
            if version == old:
                # Re-applying the running version is a no-op, as in Kubernetes; it
                # also keeps an undo that is replayed harmless.
                return {"service": name, "changed": False, "version": old, "previous_version": svc.previous_version,
                        "change": None}
            svc.previous_version, svc.version = old, version
            svc.stuck = False  # a rollout replaces every pod
            change = self._record(svc, "deploy", author=author, version=version, previous_version=old,
                                  description=f"deploy {version} (was {old}){note}")
            return {"service": name, "changed": True, "version": version, "previous_version": old, "change": change}

    def rollback(self, name: str, *, author: str, note: str = "") -> dict[str, Any]:
        """Back to the previous version; like ``kubectl rollout undo``, twice swaps back."""
        with self._lock:
            self._advance_locked()
            svc = self._get(name)
            if svc.previous_version is None:
                raise FleetError(409, "conflict", f"{name} has no previous version to roll back to")
            old, new = svc.version, svc.previous_version
            svc.version, svc.previous_version = new, old
            svc.stuck = False
            change = self._record(svc, "rollback", author=author, version=new, previous_version=old,
                                  description=f"rollback to {new} (was {old}){note}")
            return {"service": name, "changed": True, "version": new, "previous_version": old, "change": change}

    def restart(self, name: str, *, author: str, note: str = "") -> dict[str, Any]:
        with self._lock:
            self._advance_locked()
            svc = self._get(name)
            svc.stuck = False
            change = self._record(svc, "restart", author=author, version=svc.version, previous_version=svc.version,
                                  description=f"restart all {svc.replicas} replicas{note}")
            return {"service": name, "changed": True, "version": svc.version, "replicas": svc.replicas,
                    "change": change}

    def scale(self, name: str, replicas: int, *, author: str, note: str = "") -> dict[str, Any]:
        if not MIN_REPLICAS <= replicas <= MAX_REPLICAS:
            raise FleetError(422, "invalid_request", f"replicas must be between {MIN_REPLICAS} and {MAX_REPLICAS}")
        with self._lock:
            self._advance_locked()
            svc = self._get(name)
            old = svc.replicas
            if replicas == old:
                return {"service": name, "changed": False, "replicas": old, "previous_replicas": old, "change": None}
            svc.replicas = replicas
            change = self._record(svc, "scale", author=author, version=svc.version, previous_version=svc.version,
                                  description=f"scale from {old} to {replicas} replicas{note}")
            return {"service": name, "changed": True, "replicas": replicas, "previous_replicas": old,
                    "change": change}

    # ---- demo control ----

    def inject(self, name: str, kind: FaultKind, *, version: str | None = None) -> dict[str, Any]:
        """Start a fault. ``bad_deploy`` is a real deploy (by ``ci-bot``) of a version that fails."""
        with self._lock:
            self._advance_locked()
            svc = self._get(name)
            if kind in ("bad_deploy", "dependency"):
                svc.propagates = kind == "dependency"
                taken = svc.bad_versions | {c["version"] for c in self._changes if c["service"] == name and c["version"]}
                new = version or _next_version(svc.version, taken)
                svc.bad_versions.add(new)
                self.deploy(name, new, author="ci-bot", note=" from the CI pipeline")
            elif kind == "saturation":
                svc.saturated = True
            elif kind == "stuck":
                svc.stuck = True
            elif kind == "clear":
                # A reset of the world, not an operation on the service: no change record.
                svc.saturated = False
                svc.stuck = False
                svc.propagates = False
                svc.bad_versions.discard(svc.version)
            elif kind == "reset":
                self._reset(svc)
            else:  # pragma: no cover - the HTTP layer validates kinds
                raise FleetError(422, "invalid_request", f"unknown fault kind {kind!r}")
            return self._demo_service(svc)

    def _reset(self, svc: _Service) -> None:
        """The service as the demo started it: initial version and replicas, no fault, and a change log
        holding only its original deploy, long ago.

        For benchmarks that reuse a service: the next trial's 30-minute change lookback must not find the
        last trial's deploy, nor its remediation. The counters keep counting (Prometheus must never see
        them fall), so the metrics' own history is left for the runbooks' medians and windows to judge.
        """
        svc.version = INITIAL_VERSIONS.get(svc.name, "v1")
        svc.previous_version = None
        svc.replicas = INITIAL_REPLICAS
        svc.saturated = svc.stuck = svc.propagates = False
        svc.bad_versions.clear()
        self._changes = [c for c in self._changes if c["service"] != svc.name]
        self._record_origin(svc, self._clock())

    def _demo_service(self, svc: _Service) -> dict[str, Any]:
        rates = svc.code_rates()
        total = sum(rates.values())
        return {
            "name": svc.name,
            "namespace": NAMESPACE,
            "version": svc.version,
            "previous_version": svc.previous_version,
            "replicas": svc.replicas,
            "serving": svc.serving,
            "faults": {
                "bad_version": svc.version in svc.bad_versions,
                "saturation": svc.saturated,
                "stuck": svc.stuck,
            },
            "fails_its_callers": svc.propagates,  # the "dependency" fault
            "bad_versions": sorted(svc.bad_versions),
            "cpu_utilization": round(svc.cpu, 4),
            "request_rate": round(total, 4),
            "error_ratio": round((rates["500"] + rates["503"]) / total, 4) if total else None,
            "p99_seconds_estimate": round(svc.p99_estimate(), 4) if svc.serving else None,
            "requests_total": {code: math.floor(v) for code, v in svc.requests.items()},
        }

    def demo_state(self) -> dict[str, Any]:
        with self._lock:
            now = self._advance_locked()
            return {
                "namespace": NAMESPACE,
                "now": rfc3339(now),
                "services": {svc.name: self._demo_service(svc) for svc in self._modelled},
                "synthetic_services": len(self._services) - len(self._modelled),
                "changes": [dict(c) for c in self._changes],
            }

    # ---- metrics ----

    def metrics_text(self) -> str:
        """Prometheus exposition format 0.0.4."""
        with self._lock:
            self._advance_locked()
            services = self._modelled
            out: list[str] = []

            def family(name: str, kind: str, help_text: str) -> None:
                out.append(f"# HELP {name} {help_text}")
                out.append(f"# TYPE {name} {kind}")

            family("http_requests_total", "counter", "Requests answered, by status code.")
            for s in services:
                for code in CODES:
                    out.append(f"http_requests_total{_labels(service=s.name, code=code)} {math.floor(s.requests[code])}")

            family("http_request_duration_seconds", "histogram", "Request latency.")
            for s in services:
                # Floor of a non-decreasing sequence stays non-decreasing, so buckets stay cumulative.
                for le, value in zip((*map(_fmt_le, BUCKETS), "+Inf"), s.buckets, strict=True):
                    out.append(f"http_request_duration_seconds_bucket{_labels(service=s.name, le=le)} {math.floor(value)}")
                out.append(f"http_request_duration_seconds_sum{_labels(service=s.name)} {s.duration_sum:.6f}")
                out.append(f"http_request_duration_seconds_count{_labels(service=s.name)} {math.floor(s.buckets[-1])}")

            family("service_cpu_utilization", "gauge", "CPU utilisation averaged over replicas, 0..1.")
            for s in services:
                out.append(f"service_cpu_utilization{_labels(service=s.name)} {s.cpu:.4f}")

            family("fleet_service_replicas", "gauge", "Desired replicas.")
            for s in services:
                out.append(f"fleet_service_replicas{_labels(service=s.name)} {s.replicas}")

            family("fleet_service_serving", "gauge", "1 if the service answers requests, 0 if stuck.")
            for s in services:
                out.append(f"fleet_service_serving{_labels(service=s.name)} {1 if s.serving else 0}")

            family("mesh_client_requests_total", "counter", "Calls from a caller (source) to a callee (destination), by "
                   "status code, as the caller's sidecar counts them.")
            for (source, destination), counters in sorted(self._mesh.items()):
                for code in CODES:
                    out.append(f"mesh_client_requests_total"
                               f"{_labels(source=source, destination=destination, code=code)} "
                               f"{math.floor(counters[code])}")

            family("fleet_deploy_info", "gauge", "The running version (always 1).")
            for s in services:
                out.append(f"fleet_deploy_info{_labels(service=s.name, version=s.version)} 1")
            return "\n".join(out) + "\n"


def _fmt_le(le: float) -> str:
    return repr(le) if le != int(le) else f"{le:.1f}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    pairs = {"namespace": NAMESPACE, **labels}
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs.items()) + "}"


# -- HTTP --------------------------------------------------------------------------------


class Verifier(Protocol):
    """What the fleet needs of :class:`firebreak.signing.TargetVerifier`."""

    def verify(self, token: str, *, verb: str, resource: str) -> dict[str, Any]: ...


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScaleBody(_Body):
    replicas: int = Field(ge=MIN_REPLICAS, le=MAX_REPLICAS)


class DeployBody(_Body):
    version: str = Field(pattern=_VERSION.pattern)


class FaultBody(_Body):
    service: str
    kind: FaultKind
    version: str | None = Field(default=None, pattern=_VERSION.pattern, description="bad_deploy only")


def _error(status: int, error: str, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "reason": reason}, status_code=status, headers=headers)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class _IdempotencyStore:
    """Responses of writes by ``Idempotency-Key``: a replay returns them, never acts twice.

    A key is bound to its request (verb, service, body); the same key with another
    request is refused with 422, as the IETF Idempotency-Key draft suggests.
    Kept for ``retention_s`` (longer than any broker authorization lives, so a re-minted token for a
    step that already wrote replays its answer instead of writing again), and, with a ``path``, in a
    journal there (one fsynced line per write, rewritten with the live keys when it grows): a restart
    keeps them. ``capacity`` only bounds memory against a flood; age is what retires a key.
    """

    def __init__(self, path: Path | None = None, *, retention_s: float = IDEMPOTENCY_RETENTION_S,
                 capacity: int = 1_000_000, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._retention_s = retention_s
        self._capacity = capacity
        self._clock = clock
        # key -> (fingerprint, status, body, stored at)
        self._items: OrderedDict[str, tuple[str, int, dict[str, Any], float]] = OrderedDict()
        self._lines = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._load(path)
            self._rewrite()

    def _load(self, path: Path) -> None:
        if not path.exists():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                self._items[entry["key"]] = (entry["fingerprint"], int(entry["status"]), dict(entry["body"]),
                                             float(entry["at"]))
                self._items.move_to_end(entry["key"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: its write was never answered
        self._expire()

    @staticmethod
    def _line(key: str, item: tuple[str, int, dict[str, Any], float]) -> str:
        fingerprint, status, body, at = item
        return json.dumps({"key": key, "fingerprint": fingerprint, "status": status, "body": body, "at": at},
                          sort_keys=True) + "\n"

    def _write(self, text: str, *, truncate: bool) -> None:
        assert self._path is not None
        target = self._path.with_suffix(".tmp") if truncate else self._path
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else os.O_APPEND), 0o600)
        try:
            data = text.encode("utf-8")
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if truncate:
            os.replace(target, self._path)

    def _rewrite(self) -> None:
        self._write("".join(self._line(k, v) for k, v in self._items.items()), truncate=True)
        self._lines = len(self._items)

    def _expire(self) -> None:
        oldest = self._clock() - self._retention_s
        while self._items and (len(self._items) > self._capacity or next(iter(self._items.values()))[3] < oldest):
            self._items.popitem(last=False)

    def get(self, key: str) -> tuple[str, int, dict[str, Any]] | None:
        item = self._items.get(key)
        return None if item is None else item[:3]

    def succeeded(self, key: str) -> dict[str, Any] | None:
        """The response of a write that succeeded under ``key``: the state an undo restores."""
        item = self._items.get(key)
        return item[2] if item is not None and 200 <= item[1] < 300 else None

    def put(self, key: str, fingerprint: str, status: int, body: dict[str, Any]) -> None:
        item = (fingerprint, status, body, self._clock())
        self._items[key] = item
        self._items.move_to_end(key)
        self._expire()
        if self._path is None:
            return
        if self._lines + 1 > 2 * len(self._items) + 1000:
            self._rewrite()
        else:
            self._write(self._line(key, item), truncate=False)
            self._lines += 1


def create_app(*, verifier: Verifier, chaos_token: str | None = None, fleet: Fleet | None = None,
               catalog_verifier: Verifier | None = None, idempotency_path: Path | None = None,
               standing_token: str | None = None) -> FastAPI:
    """The fleet's HTTP app. ``chaos_token=None`` disables ``POST /demo/faults``; a ``catalog_verifier``
    (audience ``catalog``) also serves the demo's Backstage catalog under ``/api/catalog``. With an
    ``idempotency_path`` the Idempotency-Keys of writes survive a restart. ``standing_token`` (off by
    default): one static bearer token good for every read and write, the credential a hand-rolled
    pipeline without a broker uses (``bench/handrolled.py``)."""
    fleet = fleet or Fleet()
    idempotency = _IdempotencyStore(idempotency_path)
    # When each write request arrived, by the fleet's clock: what a benchmark times a write by.
    arrivals: deque[dict[str, Any]] = deque(maxlen=100_000)
    app = FastAPI(title="Firebreak demo fleet", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fleet = fleet
    if catalog_verifier is not None:
        add_catalog_routes(app, catalog_verifier)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and wrong methods answer in the same JSON shape as everything else.
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, error, str(exc.detail))

    async def authorize(request: Request, verb: str, name: str) -> dict[str, Any] | JSONResponse:
        token = _bearer(request)
        if token is None:
            return _error(401, "unauthorized", "missing bearer token", {"WWW-Authenticate": "Bearer"})
        if standing_token is not None and hmac.compare_digest(token.encode(), standing_token.encode()):
            return {"sub": STANDING_SUBJECT, "standing": True}
        try:
            # verify may refresh keys over the network: keep it off the event loop.
            return await run_in_threadpool(verifier.verify, token, verb=verb, resource=f"service/{name}")
        except TokenRejected as exc:
            if exc.status == 503:  # cannot check revocations right now: a retry may pass
                return _error(503, "unavailable", exc.reason, {"Retry-After": "1"})
            status = 403 if exc.status == 403 else 401
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return _error(status, "forbidden" if status == 403 else "unauthorized", exc.reason, headers)

    async def read_body(request: Request, model: type[_Body] | None) -> tuple[dict[str, Any], _Body | None] | JSONResponse:
        raw = await request.body()
        if model is None:
            return {}, None
        try:
            data = json.loads(raw or b"null")
            parsed = model.model_validate(data)
        except json.JSONDecodeError as exc:
            return _error(400, "invalid_request", f"body is not JSON: {exc.msg}")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return _error(422, "invalid_request", f"{where}: {first['msg']}")
        return parsed.model_dump(), parsed

    def author_of(claims: dict[str, Any]) -> tuple[str, str]:
        """The token's subject, and a note tying the change to the incident and step that made it."""
        who = str(claims.get("sub") or "unknown")
        context = [f"{k}={claims[k]}" for k in ("workflow_id", "step_id") if claims.get(k)]
        return who, f" ({', '.join(context)})" if context else ""

    async def write(request: Request, name: str, verb: str, model: type[_Body] | None,
                    act: Callable[[_Body | None, str, str], dict[str, Any]]) -> Response:
        arrivals.append({"at": time.time(), "verb": verb, "service": name,
                         "idempotency_key": request.headers.get("idempotency-key")})
        claims = await authorize(request, verb, name)
        if isinstance(claims, JSONResponse):
            return claims
        key = request.headers.get("idempotency-key")
        if key is not None and not _IDEMPOTENCY_KEY.match(key):
            return _error(400, "invalid_request", "Idempotency-Key must be 1-255 visible ASCII characters")
        try:
            # The token is for one exact request: this key, this body (or, for an undo, the
            # values recorded at the write it undoes). A standing token binds nothing: that is its price.
            if not claims.get("standing"):
                check_request_binding(claims, idempotency_key=key, body=await request.body(),
                                      recorded_result=idempotency.succeeded)
        except TokenRejected as exc:
            return _error(403, "forbidden", exc.reason)
        body = await read_body(request, model)
        if isinstance(body, JSONResponse):
            return body
        data, parsed = body
        fingerprint = hashlib.sha256(json.dumps([verb, name, data], sort_keys=True).encode()).hexdigest()
        # No await from here on: check, act and store are atomic on the event loop.
        if key is not None:
            stored = idempotency.get(key)
            if stored is not None:
                if not hmac.compare_digest(stored[0], fingerprint):
                    return _error(422, "idempotency_key_reused", "this Idempotency-Key was used for another request")
                return JSONResponse(stored[2], status_code=stored[1], headers={"Idempotent-Replayed": "true"})
        who, context = author_of(claims)
        try:
            if name in fleet.locked:
                raise FleetError(409, "locked", f"{name} is locked for changes at the target")
            status, result = 200, {**act(parsed, who, context), **fleet.response_extras}
        except FleetError as exc:
            status, result = exc.status, {"error": exc.error, "reason": exc.reason}
        if key is not None:
            idempotency.put(key, fingerprint, status, result)
        return JSONResponse(result, status_code=status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(fleet.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/services/{name}")
    async def get_service(request: Request, name: str) -> Response:
        claims = await authorize(request, "fleet.read", name)
        if isinstance(claims, JSONResponse):
            return claims
        try:
            return JSONResponse(fleet.service_state(name))
        except FleetError as exc:
            return _error(exc.status, exc.error, exc.reason)

    @app.get("/services/{name}/changes")
    async def get_changes(request: Request, name: str, since: str | None = None) -> Response:
        claims = await authorize(request, "fleet.read", name)
        if isinstance(claims, JSONResponse):
            return claims
        try:
            since_ts = parse_rfc3339(since) if since else None
        except ValueError as exc:
            return _error(400, "invalid_request", f"since must be RFC 3339: {exc}")
        try:
            return JSONResponse({"service": name, "changes": fleet.changes(name, since_ts)})
        except FleetError as exc:
            return _error(exc.status, exc.error, exc.reason)

    @app.post("/services/{name}/rollback")
    async def rollback(request: Request, name: str) -> Response:
        return await write(request, name, "fleet.rollback", None,
                           lambda _b, who, note: fleet.rollback(name, author=who, note=note))

    @app.post("/services/{name}/restart")
    async def restart(request: Request, name: str) -> Response:
        return await write(request, name, "fleet.restart", None,
                           lambda _b, who, note: fleet.restart(name, author=who, note=note))

    @app.post("/services/{name}/scale")
    async def scale(request: Request, name: str) -> Response:
        def act(body: _Body | None, who: str, note: str) -> dict[str, Any]:
            assert isinstance(body, ScaleBody)
            return fleet.scale(name, body.replicas, author=who, note=note)

        return await write(request, name, "fleet.scale", ScaleBody, act)

    @app.post("/services/{name}/deploy")
    async def deploy(request: Request, name: str) -> Response:
        def act(body: _Body | None, who: str, note: str) -> dict[str, Any]:
            assert isinstance(body, DeployBody)
            return fleet.deploy(name, body.version, author=who, note=note)

        return await write(request, name, "fleet.deploy", DeployBody, act)

    @app.post("/demo/faults")
    async def faults(request: Request) -> Response:
        token = _bearer(request)
        if chaos_token is None:
            return _error(403, "forbidden", "fault injection is disabled (no chaos token configured)")
        if token is None or not hmac.compare_digest(token.encode(), chaos_token.encode()):
            return _error(401, "unauthorized", "a valid chaos token is required", {"WWW-Authenticate": "Bearer"})
        body = await read_body(request, FaultBody)
        if isinstance(body, JSONResponse):
            return body
        parsed = body[1]
        assert isinstance(parsed, FaultBody)
        try:
            return JSONResponse(fleet.inject(parsed.service, parsed.kind, version=parsed.version))
        except FleetError as exc:
            return _error(exc.status, exc.error, exc.reason)

    @app.get("/demo/state")
    async def demo_state() -> dict[str, Any]:
        return fleet.demo_state()

    @app.get("/demo/requests")
    async def demo_requests() -> dict[str, Any]:
        """Every write request as it arrived (accepted or not), oldest first, with the fleet's timestamp."""
        return {"writes": list(arrivals)}

    return app


# -- running it ----------------------------------------------------------------------------


class FleetServer(ThreadedServer):
    """The fleet app on uvicorn in a background thread, for tests and the embedded stack."""

    def __init__(self, *, verifier: Verifier, chaos_token: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, fleet: Fleet | None = None, close_verifier: bool = False,
                 catalog_verifier: Verifier | None = None, idempotency_path: Path | None = None) -> None:
        self.fleet = fleet or Fleet()
        self.verifier = verifier
        self.catalog_verifier = catalog_verifier
        # The caller usually owns the verifier; with close_verifier=True, stop() also
        # ends its revocation poller (TargetVerifier.from_broker starts one).
        self._close_verifier = close_verifier
        self.app = create_app(verifier=verifier, chaos_token=chaos_token, fleet=self.fleet,
                              catalog_verifier=catalog_verifier, idempotency_path=idempotency_path)
        super().__init__(self.app, host=host, port=port, name="fleet-server")

    @property
    def target(self) -> str:
        """``host:port``, as a Prometheus scrape target."""
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        for verifier in (self.verifier, self.catalog_verifier):
            close = getattr(verifier, "close", None)
            if self._close_verifier and callable(close):
                close()


def idempotency_path(state_dir: str | Path) -> Path:
    """Where the fleet keeps the Idempotency-Keys of its writes and their answers, across restarts."""
    return Path(state_dir) / "idempotency.jsonl"


def replay_cache_path(state_dir: str | Path) -> Path:
    """Where the fleet keeps the jtis it accepted, so that a restart still refuses their replay."""
    return Path(state_dir) / "replay-jtis.jsonl"


def _build_verifier(broker_url: str, audience: str, wait_s: float,
                    replay_path: Path | None = None, environment: str | None = None) -> TargetVerifier:
    """The broker may still be starting: retry its JWKS for a while before giving up."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return TargetVerifier.from_broker(broker_url, audience, replay_cache_path=replay_path,
                                              environment=environment)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the broker is retried the same way
            if time.monotonic() >= deadline:
                raise SystemExit(f"demo.fleet: cannot reach the broker at {broker_url}: {exc}") from exc
            log.warning("broker at %s not ready (%s); retrying", broker_url, type(exc).__name__)
            time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9300)
    parser.add_argument("--broker-url", default=os.environ.get("FIREBREAK_BROKER_URL", "http://127.0.0.1:8350"),
                        help="credential broker whose JWKS and revocation list verify tokens")
    parser.add_argument("--chaos-token", default=os.environ.get("FIREBREAK_CHAOS_TOKEN"),
                        help="bearer token for POST /demo/faults (or FIREBREAK_CHAOS_TOKEN); unset disables faults")
    parser.add_argument("--audience", default=AUDIENCE)
    parser.add_argument("--environment", default=os.environ.get("FIREBREAK_ENVIRONMENT") or None,
                        help="the environment this fleet serves: it takes tokens for AUDIENCE@ENVIRONMENT only "
                             "(or FIREBREAK_ENVIRONMENT; default: demo)")
    parser.add_argument("--broker-wait", type=float, default=30.0, help="seconds to wait for the broker at start")
    parser.add_argument("--state-dir", default=os.environ.get("FIREBREAK_FLEET_STATE_DIR"),
                        help="where the fleet keeps what must survive a restart (the jtis it accepted); "
                             "unset keeps them in memory, and a restart would accept a replayed token")
    parser.add_argument("--log-level", default="info")
    # Read from the environment only, so that it never shows in a process listing.
    parser.add_argument("--standing-token-env", default=None, metavar="VAR",
                        help="accept the bearer token in this environment variable for every read and write "
                             "(a broker-less pipeline's standing credential, for bench/handrolled.py); off by default")
    parser.add_argument("--synthetic-services", type=int, default=0,
                        help="add this many benchmark services (bench-00000...), each right after a bad deploy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    replay_path = replay_cache_path(args.state_dir) if args.state_dir else None
    if replay_path is None:
        log.warning("no --state-dir: accepted jtis are kept in memory only; a restart forgets them")
    verifier = _build_verifier(args.broker_url, args.audience, args.broker_wait, replay_path, args.environment)
    # The demo's Backstage catalog takes tokens for its own audience: a real one is a `targets: catalog:` URL.
    catalog_replay = replay_path.with_name("catalog-replay-jtis.jsonl") if replay_path else None
    catalog_verifier = _build_verifier(args.broker_url, CATALOG_AUDIENCE, args.broker_wait, catalog_replay,
                                       args.environment)
    standing = os.environ.get(args.standing_token_env) if args.standing_token_env else None
    if args.standing_token_env and not standing:
        raise SystemExit(f"demo.fleet: --standing-token-env {args.standing_token_env}: that variable is unset or empty")
    if standing:
        log.warning("a standing bearer token is accepted for every read and write (--standing-token-env)")
    app = create_app(verifier=verifier, chaos_token=args.chaos_token, fleet=Fleet(synthetic=args.synthetic_services),
                     catalog_verifier=catalog_verifier, standing_token=standing,
                     idempotency_path=idempotency_path(args.state_dir) if args.state_dir else None)
    # Access logs carry paths and status only, never headers, so no token reaches a log.
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        verifier.close()
        catalog_verifier.close()


if __name__ == "__main__":
    main()
