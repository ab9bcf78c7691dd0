"""Rank hypotheses from evidence with the runbook's structured conditions. Pure.

Each condition is a named test on one piece of evidence; the score of a
hypothesis is the weight of its conditions that held over the weight of all,
so a person can follow every point of it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from firebreak.contracts import ChangeRecord, Diagnosis, Evidence, Finding, Hypothesis, Sample
from firebreak.runbook import Condition, Runbook, parse_duration


def _latest_change(evidence: dict[str, Evidence], started: datetime, within: timedelta) -> ChangeRecord | None:
    changes = [c for e in evidence.values() for c in e.changes if started - within <= c.at <= started + within]
    return max(changes, key=lambda c: c.at, default=None)


def _samples(ev: Evidence) -> list[Sample]:
    return sorted((s for series in ev.series for s in series.samples), key=lambda s: s.t)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _test(cond: Condition, ev: Evidence, evidence: dict[str, Evidence], started: datetime) -> tuple[bool, str]:
    within = parse_duration(cond.within)
    if cond.test == "above" or cond.test == "below":
        latest = ev.latest
        if latest is None:
            return False, f"{ev.id}: no data"
        held = latest > cond.threshold if cond.test == "above" else latest < cond.threshold
        return held, f"{ev.id} is {_fmt(latest)} ({cond.test} {_fmt(cond.threshold)}: {'yes' if held else 'no'})"
    if cond.test in ("recent_change", "absent"):
        change = _latest_change({ev.id: ev}, started, within)
        if cond.test == "absent":
            return change is None, "no change in the window" if change is None else f"{change.kind} {change.version or ''} at {change.at:%H:%M:%S}".strip()
        if change is None:
            return False, f"no change to the service within {cond.within} of the alert"
        by = f" by {change.author}" if change.author else ""
        return True, f"{change.kind} {change.version or ''}{by} at {change.at:%H:%M:%S} UTC, {_ago(change.at, started)} the alert"
    if cond.test == "rose_after_change":
        change = _latest_change(evidence, started, within)
        if change is None:
            return False, "no change to compare before and after"
        samples = _samples(ev)
        before = [s.v for s in samples if s.t < change.at]
        after = [s.v for s in samples if s.t >= change.at]
        if not before or not after:
            return False, f"{ev.id}: not enough data on both sides of the {change.kind} at {change.at:%H:%M:%S}"
        mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
        ratio = mean_after / mean_before if mean_before > 0 else (float("inf") if mean_after > 0 else 1.0)
        held = ratio >= cond.factor and mean_after > 0
        return held, (
            f"{ev.id} went from {_fmt(mean_before)} to {_fmt(mean_after)} after the {change.kind} "
            f"{change.version or ''} at {change.at:%H:%M:%S} (x{_fmt(ratio) if ratio != float('inf') else 'inf'}, needs x{_fmt(cond.factor)})"
        )
    raise ValueError(f"unknown test {cond.test}")  # the schema makes this unreachable


def _ago(at: datetime, started: datetime) -> str:
    delta = started - at
    word = "before" if delta >= timedelta(0) else "after"
    seconds = abs(int(delta.total_seconds()))
    return f"{seconds // 60}m{seconds % 60:02d}s {word}"


def diagnose(runbook: Runbook, evidence: list[Evidence], started: datetime) -> Diagnosis:
    by_id = {ev.id: ev for ev in evidence}
    gaps = [ev.gap for ev in evidence if ev.gap]
    hypotheses: list[Hypothesis] = []
    for spec in runbook.diagnose:
        findings: list[Finding] = []
        for cond in spec.conditions:
            ev = by_id.get(cond.evidence)
            if ev is None or not ev.ok:
                held, detail = False, f"{cond.evidence}: not gathered ({ev.gap if ev else 'missing'})"
            else:
                held, detail = _test(cond, ev, by_id, started)
            label = f"{cond.description}: " if cond.description else ""
            findings.append(Finding(evidence=cond.evidence, test=cond.test, held=held, weight=cond.weight, detail=label + detail))
        total = sum(f.weight for f in findings)
        score = sum(f.weight for f in findings if f.held) / total
        hypotheses.append(Hypothesis(id=spec.id, title=spec.title, score=round(score, 4), findings=findings, actions=list(spec.actions)))
    # Stable sort: on a tie the runbook's order decides.
    hypotheses.sort(key=lambda h: -h.score)
    return Diagnosis(hypotheses=hypotheses, gaps=gaps)


