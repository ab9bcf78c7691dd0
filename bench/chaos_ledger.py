"""Judging a chaos run: endings against the undisturbed ones, writes from the fleet's own record.

Writes are never asked of Firebreak. The fleet records every change it makes with the incident and
step named by the token that authorized it (``... (workflow_id=ID, step_id=s1)``); the suite reads
that log (``GET /demo/state``) and counts each incident's changes by kind.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field

_WORKFLOW = re.compile(r"workflow_id=([^,)]+)")


def writes_by_incident(fleet_state: dict) -> dict[str, list[str]]:
    """Change kinds per incident, in the order the fleet made them."""
    writes: dict[str, list[str]] = defaultdict(list)
    for change in fleet_state.get("changes", []):
        found = _WORKFLOW.search(change.get("description", ""))
        if found:
            writes[found.group(1)].append(change["kind"])
    return dict(writes)


@dataclass
class Expected:
    ending: str
    writes: list[str]


@dataclass
class Outcome:
    incident_id: str
    kind: str
    fault: str
    ending: str | None  # None: still open at the deadline (stuck)
    writes: list[str]
    detail: str = ""


@dataclass
class Verdict:
    expected_ending: int = 0
    wrong: list[Outcome] = field(default_factory=list)
    stuck: list[Outcome] = field(default_factory=list)
    duplicate: int = 0
    missing: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.wrong or self.stuck or self.duplicate or self.missing)


def judge(outcomes: list[Outcome], expected: dict[str, Expected]) -> Verdict:
    verdict = Verdict()
    for outcome in outcomes:
        want = expected[outcome.kind]
        if outcome.ending is None:
            verdict.stuck.append(outcome)
            verdict.problems.append(f"{outcome.incident_id} ({outcome.fault}): stuck, {outcome.detail}")
        elif outcome.ending != want.ending:
            verdict.wrong.append(outcome)
            verdict.problems.append(f"{outcome.incident_id} ({outcome.fault}): ended {outcome.ending}, "
                                    f"expected {want.ending}: {outcome.detail}")
        else:
            verdict.expected_ending += 1
        have, need = Counter(outcome.writes), Counter(want.writes)
        extra, short = sum((have - need).values()), sum((need - have).values())
        verdict.duplicate += extra
        verdict.missing += short if outcome.ending is not None else 0
        if extra or (short and outcome.ending is not None):
            verdict.problems.append(f"{outcome.incident_id} ({outcome.fault}): writes {outcome.writes}, "
                                    f"expected {want.writes}")
    return verdict


def _seconds(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):5.1f} / {max(values):5.1f}"


def table(injected: Counter[str], recoveries: dict[str, list[float]], outcomes: list[Outcome],
          expected: dict[str, Expected], verdict: Verdict, workers: int) -> str:
    rows = [("fault", "injected", "recovered s (p50 / max)")]
    for fault in sorted(injected, key=lambda f: (-injected[f], f)):
        rows.append((fault, str(injected[fault]), _seconds(recoveries.get(fault, []))))
    width = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{width}}  {r[1]:>8}  {r[2]:>23}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    kills = sum(n for fault, n in injected.items() if fault.startswith("worker kill"))
    lines.append("-" * len(lines[0]))
    lines.append(f"{'worker kills (' + str(workers) + ' worker' + ('s' if workers > 1 else '') + ')':<{width}}  "
                 f"{kills:>8}")
    recorded = sum(len(o.writes) for o in outcomes)
    wanted = sum(len(expected[o.kind].writes) for o in outcomes)
    endings = ", ".join(f"{kind}: {e.ending} with {'+'.join(e.writes) or 'no writes'}" for kind, e in expected.items())
    lines += [
        "",
        f"undisturbed endings  {endings}",
        f"incidents            {len(outcomes)}: expected ending {verdict.expected_ending}, "
        f"wrong ending {len(verdict.wrong)}, stuck {len(verdict.stuck)}",
        f"writes (fleet log)   {recorded} recorded, {wanted} expected: duplicate {verdict.duplicate}, "
        f"missing {verdict.missing}",
    ]
    return "\n".join(lines)
