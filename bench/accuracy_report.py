"""What bench/accuracy.py measured, judged and printed. Pure: no I/O but the returned text.

A trial is right when its incident opened by itself, with the runbook that answers the fault,
the right hypothesis on top, a plan proposed, and no run of the service needing a human
(``failed``, ``rollback_failed``, ``expired``): a false escalation. With approvals on, the
incident must also end ``resolved``.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

FAULTS = ("bad_deploy", "saturation", "stuck")
# fault -> (the runbook that answers it, its incident key suffix, the hypothesis that must be on top)
EXPECTED: dict[str, tuple[str, str, str]] = {
    "bad_deploy": ("bad-deploy", "error-rate", "bad_deploy"),
    "saturation": ("saturation", "saturation", "saturation"),
    "stuck": ("stuck", "stuck", "stuck"),
}
NEEDS_A_HUMAN = frozenset({"failed", "rollback_failed", "expired"})


def incident_id(fault: str, service: str, namespace: str = "shop") -> str:
    return f"{namespace}.{service}.{EXPECTED[fault][1]}"


@dataclass
class Run:
    """Another run of an incident of the trial's service: a follow-up alert, or a wrong runbook."""

    incident_id: str
    run_id: str
    phase: str
    top: str | None = None


@dataclass
class Trial:
    round: int
    fault: str
    service: str
    approve: bool
    incident_id: str = ""
    run_id: str | None = None
    opened_s: float | None = None  # fault injected -> the workflow started (Alertmanager, the API)
    proposed_s: float | None = None  # fault injected -> the plan is visible
    runbook: str | None = None
    top: str | None = None
    top_score: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    phase: str | None = None  # the run's last phase
    outcome: str = ""
    other_runs: list[Run] = field(default_factory=list)
    error: str | None = None

    @property
    def opened(self) -> bool:
        return self.run_id is not None

    @property
    def false_escalations(self) -> int:
        phases = [self.phase, *(r.phase for r in self.other_runs)]
        return sum(1 for p in phases if p in NEEDS_A_HUMAN)

    @property
    def problems(self) -> list[str]:
        runbook, _, hypothesis = EXPECTED[self.fault]
        out = []
        if self.error:
            out.append(self.error)
        if not self.opened:
            out.append("no incident opened")
            return out
        if self.runbook != runbook:
            out.append(f"runbook {self.runbook}, expected {runbook}")
        if self.top != hypothesis:
            out.append(f"top hypothesis {self.top} ({self.top_score}), expected {hypothesis}")
        if self.proposed_s is None:
            out.append("no plan proposed")
        if self.false_escalations:
            out.append(f"{self.false_escalations} false escalation(s)")
        if self.approve and self.phase != "resolved":
            out.append(f"ended {self.phase}: {self.outcome}")
        stray = [r for r in self.other_runs if r.phase not in ("auto_resolved", "resolved")]
        if stray:
            out.append("other runs: " + ", ".join(f"{r.incident_id} {r.phase} (top {r.top})" for r in stray))
        return out

    @property
    def right(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "right": self.right, "problems": self.problems}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def render(trials: list[Trial]) -> str:
    """The confusion matrix (fault vs top hypothesis), outcomes, time to proposal, and the verdict."""
    hypotheses = list(dict.fromkeys([*(EXPECTED[f][2] for f in FAULTS),
                                     *sorted({t.top for t in trials if t.top} - {EXPECTED[f][2] for f in FAULTS})]))
    columns = [*hypotheses, "no incident"]
    width = max(12, *(len(c) for c in columns))
    lines = ["Top hypothesis by fault injected (rows: fault, columns: top hypothesis of the incident)", ""]
    # The lowest top score shows how far from the threshold the right answers were: 0.5 is a coin toss.
    lines.append(f"{'fault':<12}" + "".join(f"{c:>{width + 2}}" for c in columns)
                 + f"{'trials':>8}{'right':>7}{'min score':>11}")
    for fault in FAULTS:
        rows = [t for t in trials if t.fault == fault]
        if not rows:
            continue
        counts = [sum(1 for t in rows if t.opened and t.top == h) for h in hypotheses]
        counts.append(sum(1 for t in rows if not t.opened))
        scores = [t.top_score for t in rows if t.top_score is not None]
        lowest = f"{min(scores):.2f}" if scores else "-"
        lines.append(f"{fault:<12}" + "".join(f"{n:>{width + 2}}" for n in counts)
                     + f"{len(rows):>8}{sum(t.right for t in rows):>7}{lowest:>11}")

    phases = sorted({t.phase or "none" for t in trials})
    lines += ["", "Outcome of the incident by fault injected", ""]
    lines.append(f"{'fault':<12}" + "".join(f"{p:>{max(10, len(p)) + 2}}" for p in phases)
                 + f"{'false esc.':>12}{'other runs':>12}")
    for fault in FAULTS:
        rows = [t for t in trials if t.fault == fault]
        if not rows:
            continue
        cells = "".join(f"{sum(1 for t in rows if (t.phase or 'none') == p):>{max(10, len(p)) + 2}}" for p in phases)
        lines.append(f"{fault:<12}{cells}{sum(t.false_escalations for t in rows):>12}"
                     f"{sum(len(t.other_runs) for t in rows):>12}")

    lines += ["", "Seconds from fault injected (p50 / p90 / max)", ""]
    lines.append(f"{'fault':<12}{'incident opened':>24}{'plan proposed':>24}")
    for fault in FAULTS:
        rows = [t for t in trials if t.fault == fault]
        opened = [t.opened_s for t in rows if t.opened_s is not None]
        proposed = [t.proposed_s for t in rows if t.proposed_s is not None]
        if not rows:
            continue

        def cell(values: list[float]) -> str:
            if not values:
                return "-"
            return f"{statistics.median(values):.1f} / {_pct(values, 0.9):.1f} / {max(values):.1f}"

        lines.append(f"{fault:<12}{cell(opened):>24}{cell(proposed):>24}")

    wrong = [t for t in trials if not t.right]
    lines += [""]
    for t in wrong:
        lines.append(f"WRONG round {t.round} {t.fault} on {t.service}: {'; '.join(t.problems)}")
    right = len(trials) - len(wrong)
    lines.append(
        f"{right}/{len(trials)} trials right; incidents opened {sum(t.opened for t in trials)}/{len(trials)}; "
        f"false escalations {sum(t.false_escalations for t in trials)}"
    )
    return "\n".join(lines)
