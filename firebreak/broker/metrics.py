"""The broker's Prometheus metrics: how the agent's identity is being used, for misuse alerts.

Written by hand in the text exposition format (no client library). Counters live in memory and
restart at zero with the broker, as Prometheus counters may.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from firebreak import privileges

# Denial reasons, by the words the rules use, grouped into the few classes an alert cares about.
_CLASSES = (
    ("unauthenticated", ("unauthenticated",)),
    ("frozen", ("frozen",)),
    ("no_approval", ("carries no approvals", "is not approved", "needs a plan")),
    ("reuse", ("already minted", "reuses a nonce", "not reusable")),
    ("plan_mismatch", ("does not fit runbook", "signed for plan", "plan is for", "requesters:")),
    ("scope", ("allows", "not in the plan", "declares no read", "does not match", "is not declared")),
    ("receipt", ("receipt",)),
    ("undo_order", ("before its step",)),
    ("unknown_runbook", ("unknown runbook",)),
)


def denial_class(reason: str) -> str:
    for name, words in _CLASSES:
        if any(word in reason for word in words):
            return name
    return "other"


def _labels(**labels: str) -> str:
    def esc(value: str) -> str:
        return value.replace("\\\\", "\\\\\\\\").replace("\\n", "\\\\n").replace('"', '\\\\"')

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


class BrokerMetrics:
    def __init__(self, baseline: Path | None) -> None:
        self._lock = threading.Lock()
        self.mints: Counter[tuple[str, str, str, str]] = Counter()
        self.denials: Counter[str] = Counter()
        self.outside_baseline = 0
        self.baseline = privileges.load_lock(baseline)["privileges"] if baseline and baseline.exists() else None

    def minted(self, *, audience: str, verb: str, resource: str, kind: str, runbook: str) -> None:
        inside = self.baseline is None or any(
            privileges.covers(p, kind, audience, verb, resource) for p in self.baseline)
        with self._lock:
            self.mints[(audience, verb, kind, runbook)] += 1
            if not inside:
                self.outside_baseline += 1

    def denied(self, reason: str) -> None:
        with self._lock:
            self.denials[denial_class(reason)] += 1

    def render(self, *, live_grants: int, frozen: bool, credential_path: Path, max_age_s: float) -> str:
        try:
            age = max(0.0, time.time() - credential_path.stat().st_mtime)
        except OSError:
            age = -1.0
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], Any]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{_labels(**labels) if labels else ''} {value}" for labels, value in samples)

        with self._lock:
            family("firebreak_broker_mints_total", "counter", "Credentials issued.",
                   [({"audience": a, "verb": v, "kind": k, "runbook": r}, n) for (a, v, k, r), n in sorted(self.mints.items())])
            family("firebreak_broker_denials_total", "counter", "Mints refused, by reason class.",
                   [({"reason": c}, n) for c, n in sorted(self.denials.items())] or [({"reason": "other"}, 0)])
            family("firebreak_broker_mints_outside_baseline_total", "counter",
                   "Mints of privileges privileges.lock.json does not hold (must stay 0).", [({}, self.outside_baseline)])
        family("firebreak_broker_live_grants", "gauge", "Issued credentials not yet expired or revoked.",
               [({}, live_grants)])
        family("firebreak_broker_frozen", "gauge", "1 while the kill switch is on.", [({}, int(frozen))])
        family("firebreak_agent_credential_age_seconds", "gauge",
               "Age of the agent's bootstrap credential (-1: unknown).", [({}, round(age, 1))])
        family("firebreak_agent_credential_max_age_seconds", "gauge",
               "The bootstrap credential's maximum age before it must be rotated.", [({}, max_age_s)])
        return "\n".join(out) + "\n"
