"""Rank hypotheses from evidence with the runbook's structured conditions. Pure.

Each condition is a named test on one piece of evidence; the score of a
hypothesis is the weight of its conditions that held over the weight of all,
so a person can follow every point of it.

Every condition is judged against the alert's own start (``started``), not
against the moment the investigation happened to run:

* a suspect change is one made in ``[started - within, started + CLOCK_SKEW]``,
  and never one Firebreak made itself (its changes carry the agent's identity
  as author): blaming our own remediation would undo the fix;
* ``rose_after_change`` compares the median before the change with the values
  once the query's own rate window (``[30s]`` in ``rate(...[30s])``) has fully
  passed since the change, so the ramp of a rate window neither dilutes the
  jump nor does an earlier, unrelated spike in the lookback set the baseline.

When the evidence is not conclusive yet, :func:`indecision` says why, so the
workflow can look once more after the runbook's delay instead of escalating
falsely or proposing on a coin toss.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from firebreak.config import AGENT
from firebreak.contracts import ChangeRecord, Diagnosis, Evidence, Finding, Hypothesis, Sample
from firebreak.escaping import render_text
from firebreak.past_incidents import MAX_PRIOR, prior
from firebreak.runbook import Condition, HypothesisSpec, Runbook, parse_duration

# Per-dependency evidence is named `{investigation id}:{dependency}`, e.g. `dep_changes:payments`.
PER_DEPENDENCY = ":"

# A change stamped a little after the alert's start still counts as before it: the change log and the alerting
# system keep separate clocks, and Prometheus stamps an alert at the evaluation that fired it.
CLOCK_SKEW = timedelta(seconds=30)
# Range selectors and subquery ranges in PromQL: `[30s]`, `[5m:1m]`.
_RANGE = re.compile(r"\[(\d+(?:ms|s|m|h|d))(?::[^\]]*)?\]")


def is_agent_change(change: ChangeRecord) -> bool:
    """A change Firebreak made itself (the target records the token's subject as author)."""
    return change.author == AGENT


def range_window(query: str) -> timedelta:
    """The longest range a PromQL query reads (``[30s]``), or zero for a query of gauges only.

    A value at time t then mixes everything in ``(t - window, t]``: only from one window after a
    change does it show the state after the change alone.
    """
    windows = [parse_duration(m) for m in _RANGE.findall(query)]
    return max(windows, default=timedelta(0))


def _suspects(evidence: Iterable[Evidence], started: datetime, within: timedelta) -> list[ChangeRecord]:
    return [
        c for ev in evidence for c in ev.changes
        if not is_agent_change(c) and started - within <= c.at <= started + CLOCK_SKEW
    ]


def _latest_change(evidence: Iterable[Evidence], started: datetime, within: timedelta) -> ChangeRecord | None:
    return max(_suspects(evidence, started, within), key=lambda c: c.at, default=None)


def _samples(ev: Evidence) -> list[Sample]:
    return sorted((s for series in ev.series for s in series.samples), key=lambda s: s.t)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _seconds(delta: timedelta) -> str:
    return f"{int(delta.total_seconds())}s"


def _test(cond: Condition, ev: Evidence, evidence: dict[str, Evidence], started: datetime) -> tuple[bool, str]:
    within = parse_duration(cond.within)
    if cond.test == "above" or cond.test == "below":
        latest = ev.latest
        if latest is None:
            # Asked and answered, with nothing to read (no series, or only NaN): said as such, never "down".
            return False, f"{ev.id}: no data ({ev.source or 'the source'} answered with no value)"
        held = latest > cond.threshold if cond.test == "above" else latest < cond.threshold
        return held, f"{ev.id} is {_fmt(latest)} ({cond.test} {_fmt(cond.threshold)}: {'yes' if held else 'no'})"
    if cond.test in ("recent_change", "absent"):
        change = _latest_change([ev], started, within)
        ours = sum(1 for c in ev.changes if is_agent_change(c))
        note = f" (not counting {ours} change{'s' if ours != 1 else ''} Firebreak made itself)" if ours else ""
        if cond.test == "absent":
            if change is None:
                return True, f"no change in the window{note}"
            return False, f"{change.kind} {change.version or ''} at {change.at:%H:%M:%S}".strip()
        if change is None:
            return False, f"no change to the service within {cond.within} before the alert{note}"
        by = f" by {change.author}" if change.author else ""
        return True, f"{change.kind} {change.version or ''}{by} at {change.at:%H:%M:%S} UTC, {_ago(change.at, started)} the alert"
    if cond.test == "rose_after_change":
        return _rose_after_change(cond, ev, evidence, started, within)
    raise ValueError(f"unknown test {cond.test}")  # the schema makes this unreachable


def _rose_after_change(
    cond: Condition, ev: Evidence, evidence: dict[str, Evidence], started: datetime, within: timedelta
) -> tuple[bool, str]:
    change = _latest_change(evidence.values(), started, within)
    if change is None:
        return False, "no change to compare before and after"
    samples = _samples(ev)
    window = range_window(ev.query)
    before = [s.v for s in samples if s.t < change.at]
    # Once a full rate window has passed, a value reflects the state after the change alone. Until then the
    # latest value is the furthest along its ramp, so it is the best, and a conservative, reading.
    settled = [s.v for s in samples if s.t >= change.at + window]
    after_change = [s for s in samples if s.t >= change.at]
    if not before or not after_change:
        return False, f"{ev.id}: not enough data on both sides of the {change.kind} at {change.at:%H:%M:%S}"
    # Medians: a spike earlier in the lookback (an older incident) must not set the baseline.
    baseline = statistics.median(before)
    after = statistics.median(settled) if settled else after_change[-1].v
    ratio = after / baseline if baseline > 0 else (float("inf") if after > 0 else 1.0)
    held = ratio >= cond.factor and after > 0
    settling = "" if settled else (
        f"; {_seconds(after_change[-1].t - change.at)} after it, inside the {_seconds(window)} window, so still rising"
    )
    return held, (
        f"{ev.id} went from {_fmt(baseline)} to {_fmt(after)} after the {change.kind} "
        f"{change.version or ''} at {change.at:%H:%M:%S} (x{_fmt(ratio) if ratio != float('inf') else 'inf'}, "
        f"needs x{_fmt(cond.factor)}{settling})"
    )


def _ago(at: datetime, started: datetime) -> str:
    delta = started - at
    word = "before" if delta >= timedelta(0) else "after"
    seconds = abs(int(delta.total_seconds()))
    return f"{seconds // 60}m{seconds % 60:02d}s {word}"


def unsettled(evidence: list[Evidence]) -> list[str]:
    """Metrics whose latest values still straddle a change Firebreak made itself.

    Right after Firebreak remediated, an alert computed over a rate window can still fire (or fire for the
    first time) on values from before the fix. Such evidence describes the past, not the service now.
    """
    ours = [c for ev in evidence for c in ev.changes if is_agent_change(c)]
    notes: list[str] = []
    for ev in evidence:
        window = range_window(ev.query) if ev.kind != "change_log" else timedelta(0)
        if not ev.ok or window <= timedelta(0):
            continue
        for change in ours:
            if ev.gathered_at - window < change.at <= ev.gathered_at:
                notes.append(
                    f"{ev.id}: Firebreak's own {change.kind} at {change.at:%H:%M:%S} is "
                    f"{_seconds(ev.gathered_at - change.at)} old, inside this query's {_seconds(window)} window: "
                    f"its values still mix the time before that change"
                )
                break
    return notes


def dependencies(evidence: Iterable[Evidence]) -> list[str]:
    """The alerting service's direct dependencies, as the catalog walk validated and read them."""
    for ev in evidence:
        if ev.kind == "catalog" and ev.ok and ev.catalog is not None:
            return ev.catalog.dependencies
    return []


def evidence_for(evidence: Iterable[Evidence], dependency: str | None) -> dict[str, Evidence]:
    """The evidence a hypothesis reads, by its runbook id: the service's own, plus ``dependency``'s own
    per-dependency evidence (``dep_changes:payments`` read as ``dep_changes``). Another dependency's never mixes in."""
    view = {ev.id: ev for ev in evidence if PER_DEPENDENCY not in ev.id}
    if dependency is not None:
        view |= {ev.id.split(PER_DEPENDENCY)[0]: ev for ev in evidence
                 if ev.id.endswith(f"{PER_DEPENDENCY}{dependency}")}
    return view


def _judge(spec: HypothesisSpec, by_id: dict[str, Evidence], started: datetime,
           dependency: str | None = None) -> Hypothesis:
    findings: list[Finding] = []
    for cond in spec.conditions:
        ev = by_id.get(cond.evidence)
        if ev is None or not ev.ok:
            missing = "no dependency from the catalog" if spec.for_each and dependency is None else "missing"
            held, detail = False, f"{cond.evidence}: not gathered ({ev.gap if ev else missing})"
        else:
            held, detail = _test(cond, ev, by_id, started)
        label = f"{cond.description}: " if cond.description else ""
        findings.append(Finding(evidence=cond.evidence, test=cond.test, held=held, weight=cond.weight,
                                detail=label + detail))
    total = sum(f.weight for f in findings)
    score = sum(f.weight for f in findings if f.held) / total
    if not spec.for_each:
        return Hypothesis(id=spec.id, title=spec.title, score=round(score, 4), findings=findings,
                          actions=list(spec.actions))
    subject = dependency or "(none found)"
    return Hypothesis(
        id=spec.id, title=render_text(spec.title, {spec.for_each: subject}), score=round(score, 4), findings=findings,
        # Without a dependency there is no target to derive a step for.
        actions=list(spec.actions) if dependency else [],
        params={spec.for_each: dependency} if dependency else {},
    )


def _with_prior(hypothesis: Hypothesis, past: Evidence) -> Hypothesis:
    """A hypothesis confirmed by earlier incidents gains a bounded, visible weight, only if this incident's
    own evidence already supports it somewhat: history breaks a near tie, it never makes a case alone."""
    assert past.past is not None
    subject = hypothesis.params.get("dependency", "")
    weight = prior(past.past, hypothesis.id, subject)
    if weight <= 0 or hypothesis.score <= 0:
        return hypothesis
    count = past.past.confirmed[(hypothesis.id, subject)]
    finding = Finding(
        evidence=past.id, test="confirmed_before", held=True, weight=0,
        detail=(f"confirmed before: {count} earlier incident{'s' if count != 1 else ''} resolved by this "
                f"hypothesis's plan ({past.past.summary()}): +{weight:.2f} (at most {MAX_PRIOR:.2f})"),
    )
    return hypothesis.model_copy(update={"score": round(min(1.0, hypothesis.score + weight), 4), "prior": weight,
                                         "findings": [*hypothesis.findings, finding]})


def diagnose(runbook: Runbook, evidence: list[Evidence], started: datetime) -> Diagnosis:
    if started.tzinfo is None:  # an incident system that sent a naive time means UTC
        started = started.replace(tzinfo=timezone.utc)
    gaps = [ev.gap for ev in evidence if ev.gap] + unsettled(evidence)
    own = evidence_for(evidence, None)
    found = dependencies(evidence)
    hypotheses: list[Hypothesis] = []
    for spec in runbook.diagnose:
        if spec.for_each:
            # One hypothesis per dependency, each judged on that dependency's evidence alone.
            hypotheses += [_judge(spec, evidence_for(evidence, d), started, d) for d in found] or [
                _judge(spec, own, started)]
        else:
            hypotheses.append(_judge(spec, own, started))
    past = next((ev for ev in evidence if ev.kind == "past_incidents" and ev.ok and ev.past is not None), None)
    if past is not None:
        hypotheses = [_with_prior(h, past) for h in hypotheses]
    # Stable sort: on a tie the runbook's order decides.
    hypotheses.sort(key=lambda h: -h.score)
    return Diagnosis(hypotheses=hypotheses, gaps=gaps)


# -- is it decided? ---------------------------------------------------------------

_EPSILON = 1e-9  # scores are rounded to 4 places: a score exactly at the margin counts as within it


def indecision(diagnosis: Diagnosis, threshold: float, margin: float) -> str | None:
    """Why looking again a little later could change the decision, or None when it is clear.

    Undecided when:

    * the top score is within ``margin`` of ``threshold``, on either side: one condition more or less
      flips between proposing and escalating;
    * the top score is below the threshold while evidence is missing or unsettled (``diagnosis.gaps``):
      the escalation would rest on what could not be seen;
    * the runner-up clears the threshold too and scores within ``margin`` of the top: the ranking, and
      with it the remediation, could flip.
    """
    if not diagnosis.hypotheses:
        return None
    top = diagnosis.hypotheses[0]
    if abs(top.score - threshold) <= margin + _EPSILON:
        return f"the top hypothesis ({top.id}) scores {_fmt(top.score)}, within {_fmt(margin)} of the threshold {_fmt(threshold)}"
    if top.score < threshold and diagnosis.gaps:
        return f"the top hypothesis ({top.id}) scores {_fmt(top.score)} while evidence is missing or unsettled: {diagnosis.gaps[0]}"
    if len(diagnosis.hypotheses) > 1:
        second = diagnosis.hypotheses[1]
        if second.score >= threshold and top.score - second.score <= margin + _EPSILON:
            return (f"{second.id} scores {_fmt(second.score)}, within {_fmt(margin)} of the top hypothesis "
                    f"({top.id}, {_fmt(top.score)})")
    return None


def undecided(diagnosis: Diagnosis, threshold: float, margin: float) -> bool:
    """True when the workflow should investigate once more (after the runbook's delay) before deciding."""
    return indecision(diagnosis, threshold, margin) is not None
