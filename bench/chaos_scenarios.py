"""What the chaos suite runs: two incident kinds, the faults, and which incident gets which fault.

* ``restart``: restart a service, verify its request rate in Prometheus: ends ``resolved``, one write.
  Any number run at once, on any service (a restart changes nothing another incident depends on).
* ``rollback``: roll the last deploy back, verify something that never holds within 6 s: the undo
  re-deploys, ends ``rolled_back``, two writes. One at a time, on ``inventory`` (rollbacks of one
  service at once would change each other's previous version).

Both diagnose from the change log (decisive) and a Prometheus read (supporting): an investigation
that finds Prometheus down records a gap and still proposes the same plan, so a Prometheus outage
during investigation must not change the ending. Which endings and writes are right is not written
here: the suite measures them on undisturbed incidents of each kind first.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

_COMMON = """\
apiVersion: firebreak/v1
version: 1
params:
  namespace: {{label: namespace, pattern: "^[a-z][a-z0-9-]{{0,30}}$"}}
  service: {{label: service, pattern: "^[a-z][a-z0-9-]{{0,30}}$"}}
  shard: {{label: shard, pattern: "^[a-z0-9]{{1,24}}$"}}
investigate:
  - {{id: changes, kind: change_log, lookback: 30m, target: fleet, scope: fleet.read, resource: "service/{{service}}"}}
  - id: request_rate
    kind: prometheus_instant
    query: '{rate}'
    target: prometheus
    scope: metrics.read
    resource: "namespace/{{namespace}}"
diagnose:
  - id: recent_change
    title: A recent change to the service
    conditions:
      - {{evidence: changes, test: recent_change, within: 30m, weight: 2}}
      - {{evidence: request_rate, test: above, threshold: 1, weight: 1}}
    actions: [{action}]
remediate:
  windows: {{escalate_after: 30m, expire_after: 2h}}
  approval:
    medium: {{approvers: 1, groups: [oncall]}}
"""
_RATE = 'sum(rate(http_requests_total{namespace="{namespace}",service="{service}"}[1m]))'

RESTART_RUNBOOK = """\
name: chaos-restart
match:
  alertnames: [ChaosRestart]
  incident_key: "chaos.{service}.{shard}"
""" + _COMMON.format(rate=_RATE, action="restart") + """\
  actions:
    restart:
      target: fleet
      verb: fleet.restart
      resource: "service/{service}"
      risk: medium
      blast_radius: "{service}"
      timeout: 60s
      verify: {query: '""" + _RATE + """', test: above, threshold: 1, within: 90s, interval: 2s}
"""

ROLLBACK_RUNBOOK = """\
name: chaos-rollback
match:
  alertnames: [ChaosRollback]
  incident_key: "chaos.{service}.{shard}"
""" + _COMMON.format(rate=_RATE, action="rollback") + """\
  actions:
    rollback:
      target: fleet
      verb: fleet.rollback
      resource: "service/{service}"
      risk: medium
      blast_radius: "{service}"
      timeout: 60s
      verify: {query: 'vector(1)', test: below, threshold: 0, within: 6s, interval: 2s}
      undo: {verb: fleet.deploy, params: {version: "{result.previous_version}"}}
"""


def write_runbooks(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "chaos-restart.yaml").write_text(RESTART_RUNBOOK)
    (directory / "chaos-rollback.yaml").write_text(ROLLBACK_RUNBOOK)
    return directory


class Kind(StrEnum):
    restart = "restart"
    rollback = "rollback"

    @property
    def alertname(self) -> str:
        return "ChaosRestart" if self is Kind.restart else "ChaosRollback"


class Fault(StrEnum):
    """Every fault the suite injects, by where it lands in an incident's life."""

    kill_investigating = "worker kill: investigating"
    kill_awaiting = "worker kill: awaiting approval"
    kill_after_approval = "worker kill: between approval and write"
    kill_in_write = "worker kill: inside the write"
    kill_verifying = "worker kill: verifying"
    kill_after_restart = "worker kill: right after a restart"
    server_restart = "dev server kill + restart"
    broker_restart = "broker kill + restart mid-step"
    target_refused = "target down during write (refused)"
    target_lost_answer = "target down during write (answer lost)"
    prometheus_investigating = "Prometheus down: investigating"
    prometheus_verifying = "Prometheus down: verifying"

    @property
    def is_worker_kill(self) -> bool:
        return self.name.startswith("kill_")


# The primary fault of consecutive incidents, round robin; a kill after a restart rides on other kills.
CYCLE = [
    Fault.kill_investigating, Fault.kill_awaiting, Fault.server_restart, Fault.kill_after_approval,
    Fault.kill_in_write, Fault.target_refused, Fault.kill_verifying, Fault.broker_restart,
    Fault.prometheus_investigating, Fault.kill_awaiting, Fault.kill_in_write, Fault.target_lost_answer,
    Fault.kill_investigating, Fault.kill_after_approval, Fault.prometheus_verifying, Fault.kill_verifying,
]
ROLLBACK_FAULTS = [Fault.broker_restart, Fault.kill_in_write, Fault.kill_verifying, Fault.target_lost_answer,
                   Fault.server_restart, Fault.kill_after_approval]


@dataclass(frozen=True)
class Planned:
    index: int
    kind: Kind
    service: str
    fault: Fault
    then_kill_replacement: bool  # also kill the worker started to replace the killed one, right away


def plan(incidents: int, rollbacks: int, *, replacement_every: int = 4,
         only: frozenset[Fault] | None = None) -> list[Planned]:
    """``incidents`` restart incidents over the fleet's services and ``rollbacks`` rollback incidents;
    ``only``: inject just these faults (to look at one kind closely)."""
    services = itertools.cycle(["checkout", "payments", "inventory"])
    cycle = [f for f in CYCLE if only is None or f in only] or sorted(only or [])
    faults = itertools.cycle(cycle)
    planned: list[Planned] = []
    kills = 0
    for index in range(incidents):
        fault = next(faults)
        kills += fault.is_worker_kill
        planned.append(Planned(index, Kind.restart, next(services), fault,
                               fault.is_worker_kill and kills % replacement_every == 0))
    rollback_cycle = [f for f in ROLLBACK_FAULTS if only is None or f in only] or cycle
    for n, fault in zip(range(rollbacks), itertools.cycle(rollback_cycle)):
        planned.append(Planned(incidents + n, Kind.rollback, "inventory", fault, False))
    return planned
