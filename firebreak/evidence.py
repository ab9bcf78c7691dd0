"""Evidence within a byte budget: what an investigation keeps of a large answer.

A range query can return tens of series of thousands of points; all of it would travel into
history, into the diagnosis request and into every status. So each piece of evidence is cut to
its runbook's ``max_bytes``: the series that matter most first (the highest latest values), each
downsampled evenly with its first, last and extreme points kept, so that a before/after test and
a threshold test read the same shape. What was cut is said in the evidence, never silently.
"""

from __future__ import annotations

from firebreak.contracts import Evidence, Sample, Series

MAX_CHANGES = 50


def size_of(evidence: Evidence) -> int:
    return len(evidence.model_dump_json().encode("utf-8"))


def downsample(samples: list[Sample], keep: int) -> list[Sample]:
    """At most ``keep`` samples: evenly spaced, plus the first, the last, the minimum and the maximum."""
    n = len(samples)
    if n <= keep:
        return samples
    if keep < 4:
        return samples[:keep]
    chosen = {0, n - 1, min(range(n), key=lambda i: samples[i].v), max(range(n), key=lambda i: samples[i].v)}
    spread = keep - len(chosen)
    chosen |= {round(i * (n - 1) / (spread + 1)) for i in range(1, spread + 1)}
    filler = (i for i in range(n) if i not in chosen)
    while len(chosen) < keep:  # rounding can land two picks on one index
        chosen.add(next(filler))
    return [samples[i] for i in sorted(chosen)[:keep]]


def within_budget(evidence: Evidence, max_bytes: int) -> Evidence:
    """The evidence, cut to ``max_bytes`` of JSON if it is larger; ``gap`` says what was cut."""
    if size_of(evidence) <= max_bytes:
        return evidence
    notes: list[str] = []
    changes = sorted(evidence.changes, key=lambda c: c.at)[-MAX_CHANGES:]
    if len(changes) < len(evidence.changes):
        notes.append(f"kept the latest {len(changes)} of {len(evidence.changes)} changes")
    series = sorted(evidence.series, key=lambda s: s.samples[-1].v if s.samples else float("-inf"), reverse=True)
    total_points = sum(len(s.samples) for s in series)
    cut = evidence.model_copy(update={"changes": changes, "series": series})
    keep = max((len(s.samples) for s in series), default=0)
    while size_of(cut) > max_bytes and (keep > 4 or len(cut.series) > 1):
        if keep > 4:
            keep = max(4, keep // 2)
        else:
            series = series[: max(1, len(series) // 2)]
        cut = cut.model_copy(update={"series": [Series(labels=s.labels, samples=downsample(s.samples, keep))
                                                for s in series]})
    kept_points = sum(len(s.samples) for s in cut.series)
    if len(cut.series) < len(evidence.series):
        notes.append(f"kept the {len(cut.series)} series with the highest latest values of {len(evidence.series)}")
    if kept_points < total_points:
        notes.append(f"downsampled {total_points} points to {kept_points}")
    note = f"{evidence.id}: over its {max_bytes}-byte budget: " + "; ".join(notes)
    return cut.model_copy(update={"gap": f"{evidence.gap}; {note}" if evidence.gap else note})
