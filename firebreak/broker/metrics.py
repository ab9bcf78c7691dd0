"""The broker's Prometheus metrics: how the agent's identity is being used, for misuse alerts.

Written by hand in the text exposition format (no client library). Counters live in memory and
restart at zero with the broker, as Prometheus counters may.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
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
    ("run_closed", ("nothing more is minted", "window (timeout, verification, rollback) closed")),
)


STORAGE_FILES = ("audit", "checkpoints", "journal")
# What a check may depend on and find unavailable. A refusal for one of these is an outage, counted
# apart from policy denials: the misuse rules never see it (firebreak/security_rules.yml).
DEPENDENCIES = ("catalog", "roster", "storage")


def denial_class(reason: str) -> str:
    for name, words in _CLASSES:
        if any(word in reason for word in words):
            return name
    return "other"


def _labels(**labels: str) -> str:
    def esc(value: str) -> str:
        # The exposition format's three escapes (a label value may be free text, e.g. the owner).
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


@dataclass
class IdentityGauges:
    """What /metrics says about the agent identity and the broker's keys, read at scrape time."""

    agent: str
    owner: str
    environment: str
    credential_age_s: float
    credential_max_age_s: float
    credential_overlap_s: float  # how long an earlier bootstrap credential is still accepted
    signing_key_age_s: float
    signing_keys_published: int


class BrokerMetrics:
    def __init__(self, baseline: Path | None) -> None:
        self._lock = threading.Lock()
        self.mints: Counter[tuple[str, str, str, str]] = Counter()
        # Every class from the start, at 0: Prometheus's increase() cannot see a series' first sample rise.
        self.denials: Counter[str] = Counter({name: 0 for name, _ in _CLASSES} | {"other": 0})
        self.outside_baseline = 0
        self.unavailable: Counter[str] = Counter({name: 0 for name in DEPENDENCIES})
        self.unapproved_writes = 0
        self.previous_credential_uses = 0
        # Failed writes of the broker's own files (an availability alert, never a misuse one), from 0.
        self.storage_errors: Counter[str] = Counter({name: 0 for name in STORAGE_FILES})
        self.unauthenticated_requests: Counter[str] = Counter()
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

    def dependency_unavailable(self, dependency: str) -> None:
        """A mint refused because ``dependency`` could not be consulted: availability, not a denial."""
        with self._lock:
            self.unavailable[dependency if dependency in DEPENDENCIES else "other"] += 1

    def unapproved_write(self) -> None:
        """A write or undo asked for with no approved plan awaiting execution at the broker."""
        with self._lock:
            self.unapproved_writes += 1

    def unauthenticated(self, path: str) -> None:
        """A request refused before anyone was authenticated: counted here, never written to the audit log."""
        with self._lock:
            self.unauthenticated_requests[path] += 1

    def previous_credential_used(self) -> None:
        with self._lock:
            self.previous_credential_uses += 1

    def storage_error(self, file: str) -> None:
        """A write or fsync of the audit log, its checkpoints or the state journal failed (a full disk)."""
        with self._lock:
            self.storage_errors[file] += 1

    def render(self, *, live_grants: int, frozen: bool, identity: IdentityGauges) -> str:
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
            family("firebreak_broker_unavailable_total", "counter",
                   "Mints refused because a dependency of the check (catalog, roster, storage) was unavailable.",
                   [({"dependency": d}, n) for d, n in sorted(self.unavailable.items())])
            family("firebreak_broker_mints_outside_baseline_total", "counter",
                   "Mints of privileges privileges.lock.json does not hold (must stay 0).", [({}, self.outside_baseline)])
            family("firebreak_broker_unapproved_write_attempts_total", "counter",
                   "Write or undo mints asked for with no approved plan awaiting execution at the broker.",
                   [({}, self.unapproved_writes)])
            family("firebreak_broker_unauthenticated_requests_total", "counter",
                   "Requests refused before authentication (counted, never appended to the audit log).",
                   [({"path": p}, n) for p, n in sorted(self.unauthenticated_requests.items())]
                   or [({"path": "/v1/mint"}, 0)])
            family("firebreak_agent_previous_credential_uses_total", "counter",
                   "Requests authenticated with an earlier bootstrap credential inside its rotation overlap.",
                   [({}, self.previous_credential_uses)])
            family("firebreak_broker_storage_errors_total", "counter",
                   "Failed writes of the broker's files (audit log, checkpoints, state journal); the request failed closed.",
                   [({"file": f}, n) for f, n in sorted(self.storage_errors.items())])
        family("firebreak_broker_live_grants", "gauge", "Issued credentials not yet expired or revoked.",
               [({}, live_grants)])
        family("firebreak_broker_frozen", "gauge", "1 while the kill switch is on.", [({}, int(frozen))])
        family("firebreak_agent_info", "gauge", "The agent identity: its owner and the one environment it acts in.",
               [({"agent": identity.agent, "owner": identity.owner, "environment": identity.environment}, 1)])
        family("firebreak_agent_credential_age_seconds", "gauge",
               "Age of the agent's bootstrap credential (since it was issued or last rotated).",
               [({}, round(identity.credential_age_s, 1))])
        family("firebreak_agent_credential_max_age_seconds", "gauge",
               "The bootstrap credential's maximum age before it must be rotated.", [({}, identity.credential_max_age_s)])
        family("firebreak_agent_credential_overlap_seconds", "gauge",
               "How much longer an earlier bootstrap credential is accepted (0: only the current one).",
               [({}, round(identity.credential_overlap_s, 1))])
        family("firebreak_broker_signing_key_age_seconds", "gauge", "Age of the key that signs tokens now.",
               [({}, round(identity.signing_key_age_s, 1))])
        family("firebreak_broker_signing_keys_published", "gauge",
               "Keys in the JWKS: the current one and any rotated out but still in their overlap.",
               [({}, identity.signing_keys_published)])
        return "\n".join(out) + "\n"
