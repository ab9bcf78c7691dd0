"""Diagnosis judged against the alert's own start, with Firebreak's own changes never a suspect.

Pure: evidence is built by hand, shaped like what Prometheus and the demo fleet return when an
alert opens the incident a few seconds after the fault (the rate window still ramping).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from activities.investigate import range_start
from firebreak.config import AGENT
from firebreak.contracts import ChangeRecord, Diagnosis, Evidence, Finding, Hypothesis, Sample, Series
from firebreak.diagnosis import CLOCK_SKEW, diagnose, indecision, range_window, undecided, unsettled
from firebreak.runbook import RunbookError, default_runbook_dir, load_runbook, parse_duration, parse_runbook

T0 = datetime(2025, 1, 2, 12, 0, 0, tzinfo=UTC)  # the bad deploy
ERRORS = ('sum(rate(http_requests_total{namespace="shop",service="checkout",code=~"5.."}[30s])) / '
          'sum(rate(http_requests_total{namespace="shop",service="checkout"}[30s]))')


def bad_deploy_runbook():
    return load_runbook(default_runbook_dir() / "bad-deploy.yaml")


def change(at: datetime, *, author: str = "ci-bot", kind: str = "deploy", version: str = "v42") -> ChangeRecord:
    return ChangeRecord(id=f"chg-{at:%H%M%S}-{author}", service="checkout", kind=kind, at=at, version=version,
                        author=author, description=f"{kind} {version}")


def ramp(t: datetime, healthy: float = 0.005, bad: float = 0.25, window_s: float = 30.0) -> float:
    """A [30s] rate of a ratio that steps from healthy to bad at T0: linear over one window."""
    share = min(max((t - T0).total_seconds() / window_s, 0.0), 1.0)
    return healthy + share * (bad - healthy)


def range_evidence(eid: str, query: str, values: list[tuple[datetime, float]], gathered: datetime) -> Evidence:
    return Evidence(id=eid, kind="prometheus_range", source="prometheus", query=query, ok=True,
                    series=[Series(samples=[Sample(t=t, v=v) for t, v in values])], gathered_at=gathered)


def changes_evidence(changes: list[ChangeRecord], gathered: datetime) -> Evidence:
    return Evidence(id="changes", kind="change_log", source="fleet", query="GET changes", ok=True, changes=changes,
                    gathered_at=gathered)


def instant(eid: str, value: float, gathered: datetime) -> Evidence:
    return Evidence(id=eid, kind="prometheus_instant", source="prometheus", query="histogram_quantile(0.99, x[30s])",
                    ok=True, series=[Series(samples=[Sample(t=gathered, v=value)])], gathered_at=gathered)


def error_series(until: datetime, *, start: datetime | None = None, step_s: int = 5,
                 spike: tuple[datetime, datetime] | None = None) -> list[tuple[datetime, float]]:
    """Samples every step up to ``until`` (inclusive), as range_start aligns them."""
    start = start or T0 - timedelta(minutes=15)
    out = []
    t = until
    while t >= start:
        value = ramp(t)
        if spike and spike[0] <= t <= spike[1]:
            value = 0.3
        out.append((t, value))
        t -= timedelta(seconds=step_s)
    return sorted(out)


def top(d: Diagnosis) -> Hypothesis:
    return d.hypotheses[0]


def finding(h: Hypothesis, test: str) -> Finding:
    return next(f for f in h.findings if f.test == test)


# -- the alert opens the incident while the rate window is still ramping --------------------------


def test_an_alert_early_in_the_rate_window_still_names_the_deploy() -> None:
    # The rule fires on the [30s] ratio above 5% for 5 s: the alert starts ~11 s after the deploy,
    # and the investigation reads 1 s later. The old mean over every sample after the deploy gave x2.3.
    started, gathered = T0 + timedelta(seconds=11), T0 + timedelta(seconds=12)
    evidence = [
        range_evidence("error_rate", ERRORS, error_series(gathered), gathered),
        instant("latency_p99", 0.2, gathered),
        changes_evidence([change(T0 - timedelta(days=3), version="v41"), change(T0)], gathered),
    ]
    d = diagnose(bad_deploy_runbook(), evidence, started)
    assert top(d).id == "bad_deploy" and top(d).score == 1.0, [(f.detail, f.held) for f in top(d).findings]
    rose = finding(top(d), "rose_after_change")
    assert rose.held and "v42" in rose.detail and "still rising" in rose.detail, rose.detail
    assert not undecided(d, 0.5, 0.1)


def test_once_the_window_has_passed_the_settled_values_are_compared() -> None:
    started, gathered = T0 + timedelta(seconds=11), T0 + timedelta(minutes=2)
    evidence = [
        range_evidence("error_rate", ERRORS, error_series(gathered), gathered),
        changes_evidence([change(T0)], gathered),
    ]
    rose = finding(top(diagnose(bad_deploy_runbook(), evidence, started)), "rose_after_change")
    assert rose.held and "to 0.25 " in rose.detail and "x50" in rose.detail and "rising" not in rose.detail


def test_an_older_spike_in_the_lookback_does_not_set_the_baseline() -> None:
    # An earlier incident on the same service, 10 minutes before: a mean baseline would be 5x higher.
    started, gathered = T0 + timedelta(seconds=11), T0 + timedelta(seconds=12)
    spike = (T0 - timedelta(minutes=10), T0 - timedelta(minutes=7))
    evidence = [
        range_evidence("error_rate", ERRORS, error_series(gathered, spike=spike), gathered),
        changes_evidence([change(T0)], gathered),
    ]
    rose = finding(top(diagnose(bad_deploy_runbook(), evidence, started)), "rose_after_change")
    assert rose.held and "went from 0.005 " in rose.detail, rose.detail


# -- whose change, and when ----------------------------------------------------------------------


def test_a_change_firebreak_made_is_never_a_suspect() -> None:
    # Firebreak rolled back (or scaled out) moments before this alert: blaming that would undo the fix.
    started, gathered = T0 + timedelta(seconds=11), T0 + timedelta(seconds=12)
    ours = change(T0, author=AGENT, kind="scale", version="v41")
    evidence = [
        range_evidence("error_rate", ERRORS, error_series(gathered), gathered),
        changes_evidence([change(T0 - timedelta(days=3), version="v41"), ours], gathered),
    ]
    d = diagnose(bad_deploy_runbook(), evidence, started)
    bad = next(h for h in d.hypotheses if h.id == "bad_deploy")
    assert not finding(bad, "recent_change").held and not finding(bad, "rose_after_change").held
    assert "Firebreak made itself" in finding(bad, "recent_change").detail
    dependency = next(h for h in d.hypotheses if h.id == "dependency_failure")
    assert finding(dependency, "absent").held


def test_a_change_after_the_alert_started_is_not_its_cause() -> None:
    started = T0
    later = change(T0 + CLOCK_SKEW + timedelta(seconds=5), author="alice")
    evidence = [changes_evidence([later], T0 + timedelta(minutes=1))]
    d = diagnose(bad_deploy_runbook(), evidence, started)
    bad = next(h for h in d.hypotheses if h.id == "bad_deploy")
    assert not finding(bad, "recent_change").held
    # Within the clock skew it still counts: the change log and the alerting clock differ a little.
    evidence = [changes_evidence([change(T0 + CLOCK_SKEW - timedelta(seconds=1))], T0 + timedelta(minutes=1))]
    bad = next(h for h in diagnose(bad_deploy_runbook(), evidence, started).hypotheses if h.id == "bad_deploy")
    assert finding(bad, "recent_change").held


def test_metrics_that_straddle_firebreaks_own_fix_are_reported_unsettled() -> None:
    gathered = T0 + timedelta(seconds=10)
    ours = change(T0, author=AGENT, kind="scale")
    evidence = [instant("latency_p99", 1.8, gathered), changes_evidence([ours], gathered)]
    [note] = unsettled(evidence)
    assert note.startswith("latency_p99: Firebreak's own scale") and "30s window" in note
    # Once the window has passed, the values are the service's own again.
    later = T0 + timedelta(seconds=31)
    assert unsettled([instant("latency_p99", 0.2, later), changes_evidence([ours], later)]) == []
    # And a person's change is a suspect, not a reason to wait.
    assert unsettled([instant("latency_p99", 1.8, gathered), changes_evidence([change(T0)], gathered)]) == []


# -- undecided --------------------------------------------------------------------------------------


def diagnosis_of(*scores: float, gaps: list[str] | None = None) -> Diagnosis:
    return Diagnosis(hypotheses=[Hypothesis(id=f"h{i}", title="", score=s, findings=[], actions=[])
                                 for i, s in enumerate(scores)], gaps=gaps or [])


@pytest.mark.parametrize(("scores", "gaps", "expected"), [
    ((0.5,), [], True),            # exactly the threshold: the three coin tosses
    ((0.6,), [], True),            # the margin is inclusive
    ((0.4,), [], True),
    ((0.6667,), [], False),        # clearly above: propose
    ((0.3333,), [], False),        # clearly below, nothing missing: escalate
    ((0.3333,), ["x: down"], True),  # below, but evidence is missing: look again first
    ((1.0, 0.95), [], True),       # the runner-up is as good: the ranking could flip
    ((1.0, 0.4), [], False),
    ((), [], False),
])
def test_undecided(scores: tuple[float, ...], gaps: list[str], expected: bool) -> None:
    d = diagnosis_of(*scores, gaps=gaps)
    assert undecided(d, 0.5, 0.1) is expected
    assert (indecision(d, 0.5, 0.1) is not None) is expected


# -- the windows the investigation reads ----------------------------------------------------------


def test_range_window_reads_the_longest_range_of_a_query() -> None:
    assert range_window(ERRORS) == timedelta(seconds=30)
    assert range_window("max_over_time(rate(x[1m])[5m:10s])") == timedelta(minutes=5)
    assert range_window("max(service_cpu_utilization)") == timedelta(0)


def test_range_queries_cover_the_lookback_before_the_alert_and_end_now() -> None:
    started, now = T0, T0 + timedelta(minutes=3, seconds=2)  # a re-investigation, three minutes on
    start, step = range_start(started, now, timedelta(minutes=15), timedelta(seconds=5))
    assert start <= started - timedelta(minutes=15) and step == timedelta(seconds=5)
    assert (now - start) % step == timedelta(0)  # `now` is itself a point: the latest value is current
    # Prometheus takes at most 11,000 points: the step grows instead of the query failing.
    start, step = range_start(started, now, timedelta(days=2), timedelta(seconds=5))
    assert (now - start) / step <= 11_000


# -- the runbooks ask only for evidence they read ----------------------------------------------------


def test_a_condition_that_looks_further_back_than_its_evidence_is_refused_with_its_line() -> None:
    text = (default_runbook_dir() / "bad-deploy.yaml").read_text()
    broken = text.replace("within: 30m, weight: 2, description: a deploy", "within: 2h, weight: 2, description: a deploy", 1)
    assert broken != text
    with pytest.raises(RunbookError) as caught:
        parse_runbook(broken, "bad.yaml")
    line = next(i for i, ln in enumerate(broken.splitlines(), 1) if "within: 2h" in ln)
    assert caught.value.line == line and caught.value.field == "diagnose.0.conditions.0.within"
    assert "reads changes only 30m back" in str(caught.value)


def test_a_change_test_on_a_metric_is_refused() -> None:
    text = (default_runbook_dir() / "bad-deploy.yaml").read_text()
    broken = text.replace("{evidence: changes, test: recent_change", "{evidence: error_rate, test: recent_change", 1)
    with pytest.raises(RunbookError, match="recent_change needs change_log evidence"):
        parse_runbook(broken, "bad.yaml")


@pytest.mark.parametrize("path", sorted(default_runbook_dir().glob("*.yaml")), ids=lambda p: Path(p).stem)
def test_shipped_runbooks_wait_at_least_a_rate_window_before_looking_again(path: Path) -> None:
    book = load_runbook(path)
    longest = max(range_window(inv.query) for inv in book.investigate)
    assert parse_duration(book.decide.reinvestigate_after) >= longest
