"""Correlation in the diagnosis, pure: evidence built by hand, as the catalog walk and Prometheus return it.

* a failing dependency ranks above a bad deploy on the caller when the evidence says so, and the reverse;
* the plan targets the dependency the evidence points at, and the broker's check derives the same step;
* a derived param cannot ride on a hypothesis not judged per dependency;
* a runbook can cap the blast radius (caps.max_dependents);
* earlier incidents add a bounded, visible weight.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from firebreak.blast_radius import compute
from firebreak.catalog import CatalogEntry, CatalogWalk
from firebreak.contracts import ChangeRecord, Evidence, Sample, Series
from firebreak.correlation import correlation_lines, impact_of, owner_to_escalate
from firebreak.diagnosis import diagnose
from firebreak.past_incidents import MAX_PRIOR, PastIncident, PastIncidents
from firebreak.plan import build_plan, check_plan, over_caps
from test_diagnosis import ERRORS, T0, bad_deploy_runbook, change, changes_evidence, error_series, range_evidence

PARAMS = {"namespace": "shop", "service": "checkout"}
GATHERED = T0 + timedelta(seconds=40)


def walk() -> Evidence:
    result = CatalogWalk(root="checkout", entries=[
        CatalogEntry(name="checkout", owner="team-storefront", lifecycle="production",
                     depends_on=["payments", "inventory"]),
        CatalogEntry(name="payments", owner="team-payments", lifecycle="production", dependents=["checkout", "orders"],
                     depth=1),
        CatalogEntry(name="inventory", owner="team-fulfilment", lifecycle="production", dependents=["checkout"],
                     depth=1),
        CatalogEntry(name="orders", owner="team-fulfilment", lifecycle="experimental", depth=-1),
    ])
    return Evidence(id="catalog", kind="catalog", source="catalog", query="walk", ok=True, catalog=result,
                    gathered_at=GATHERED)


def value(eid: str, v: float, labels: dict[str, str] | None = None) -> Evidence:
    return Evidence(id=eid, kind="prometheus_instant", source="prometheus", query="x[30s]", ok=True,
                    series=[Series(labels=labels or {}, samples=[Sample(t=GATHERED, v=v)])], gathered_at=GATHERED)


def dep_changes(name: str, changes: list[ChangeRecord]) -> Evidence:
    return Evidence(id=f"dep_changes:{name}", kind="change_log", source="fleet", query="GET", ok=True,
                    changes=[c.model_copy(update={"service": name}) for c in changes], gathered_at=GATHERED)


def evidence(*, own_deploy: bool, payments_failing: bool) -> list[Evidence]:
    payments_deploy = [change(T0, version="v18")] if payments_failing else []
    return [
        range_evidence("error_rate", ERRORS, error_series(GATHERED), GATHERED),
        changes_evidence([change(T0)] if own_deploy else [], GATHERED),
        walk(),
        value("dep_error_rate:payments", 0.25 if payments_failing else 0.005),
        value("dep_error_share:payments", 0.98 if payments_failing else 0.02),
        dep_changes("payments", payments_deploy),
        Evidence(id="dep_traffic:payments", kind="prometheus_instant", source="prometheus", query="x", ok=True,
                 series=[Series(labels={"source": "checkout"}, samples=[Sample(t=GATHERED, v=40.0)]),
                         Series(labels={"source": "orders"}, samples=[Sample(t=GATHERED, v=10.0)])],
                 gathered_at=GATHERED),
        value("dep_error_rate:inventory", 0.005),
        value("dep_error_share:inventory", 0.01),
        dep_changes("inventory", []),
    ]


def test_a_failing_dependency_ranks_first_and_the_plan_rolls_it_back() -> None:
    book = bad_deploy_runbook()
    d = diagnose(book, evidence(own_deploy=False, payments_failing=True), T0 + timedelta(seconds=10))
    top = d.hypotheses[0]
    assert (top.id, top.title, top.params) == ("dependency_failure", "failing dependency: payments",
                                               {"dependency": "payments"})
    scores = {h.title: h.score for h in d.hypotheses}
    assert scores["failing dependency: payments"] == 1.0
    assert scores["failing dependency: inventory"] < 0.5 and scores["A recent deploy raised the error rate"] < 0.5
    share = next(f for f in top.findings if f.evidence == "dep_error_share")
    assert share.held and "dep_error_share:payments is 0.98" in share.detail  # the deciding figure, shown
    plan = build_plan(book, PARAMS, top, incident_id="shop.checkout.error-rate", run_id="r1", requesters=[])
    assert plan is not None and [s.resource for s in plan.steps] == ["service/payments"]
    check_plan(plan, book)  # the broker derives the same step from the bound, validated params
    plan = plan.model_copy(update={"impact": impact_of(plan, evidence(own_deploy=False, payments_failing=True))})
    radius = plan.impact["s1"]
    assert [(d.name, d.owner, d.traffic_share) for d in radius.dependents] == [
        ("checkout", "team-storefront", 0.8), ("orders", "team-fulfilment", 0.2)]
    assert owner_to_escalate(top, "checkout", evidence(own_deploy=False, payments_failing=True)) == "team-payments"
    lines = "\n".join(correlation_lines(top, "checkout", evidence(own_deploy=False, payments_failing=True), plan))
    assert "failing dependency: payments (owner team-payments" in lines and "orders (team-fulfilment" in lines


def test_the_callers_own_deploy_still_blames_the_caller() -> None:
    book = bad_deploy_runbook()
    d = diagnose(book, evidence(own_deploy=True, payments_failing=False), T0 + timedelta(seconds=10))
    assert d.hypotheses[0].id == "bad_deploy"
    assert all(h.score < 0.5 for h in d.hypotheses if h.id == "dependency_failure")
    plan = build_plan(book, PARAMS, d.hypotheses[0], incident_id="i", run_id="r", requesters=[])
    assert plan is not None and [s.resource for s in plan.steps] == ["service/checkout"]
    assert owner_to_escalate(d.hypotheses[0], "checkout", []) is None


def test_a_dependency_param_cannot_ride_on_another_hypothesis() -> None:
    book = bad_deploy_runbook()
    d = diagnose(book, evidence(own_deploy=True, payments_failing=False), T0 + timedelta(seconds=10))
    plan = build_plan(book, PARAMS, d.hypotheses[0], incident_id="i", run_id="r", requesters=[])
    assert plan is not None
    smuggled = plan.model_copy(update={"params": {**plan.params, "dependency": "payments"}})
    with pytest.raises(ValueError, match="params.dependency: derived from the dependency walk"):
        check_plan(smuggled, book)
    dependency = next(h for h in diagnose(book, evidence(own_deploy=False, payments_failing=True), T0).hypotheses
                      if h.params)
    plan = build_plan(book, PARAMS, dependency, incident_id="i", run_id="r", requesters=[])
    assert plan is not None
    with pytest.raises(ValueError, match="does not match"):
        check_plan(plan.model_copy(update={"params": {**plan.params, "dependency": "Pay/../x"}}), book)


def test_a_runbook_caps_the_blast_radius() -> None:
    book = bad_deploy_runbook()
    capped = book.model_copy(update={"remediate": book.remediate.model_copy(update={
        "caps": book.remediate.caps.model_copy(update={"max_dependents": 1})})})
    top = diagnose(book, evidence(own_deploy=False, payments_failing=True), T0).hypotheses[0]
    plan = build_plan(capped, PARAMS, top, incident_id="i", run_id="r", requesters=[])
    assert plan is not None
    assert over_caps(plan, capped) == "caps.max_dependents: no computed blast radius for step s1"
    plan = plan.model_copy(update={"impact": impact_of(plan, evidence(own_deploy=False, payments_failing=True))})
    assert "caps.max_dependents: step s1 on payments reaches 2 dependents (checkout, orders), at most 1" == \
        over_caps(plan, capped)
    with pytest.raises(ValueError, match="caps.max_dependents"):
        check_plan(plan, capped)


def test_earlier_incidents_add_a_bounded_visible_weight() -> None:
    book = bad_deploy_runbook()
    past = PastIncidents(service="checkout", runbook="bad-deploy", window="30d", incidents=[
        PastIncident(incident_id="shop.checkout.error-rate", run_id=f"r{i}", phase="resolved", hypothesis="bad_deploy")
        for i in range(3)] + [PastIncident(incident_id="x", run_id="r9", phase="expired", hypothesis="bad_deploy")])
    assert past.summary() == "4 incidents in 30d: 3 bad deploy resolved, 1 bad deploy expired"
    history = Evidence(id="past_incidents", kind="past_incidents", source="temporal", query="visibility", ok=True,
                       past=past, gathered_at=GATHERED)
    # Only the error rate is above its threshold: 1/6 of the evidence, plus at most MAX_PRIOR from history.
    own = [range_evidence("error_rate", ERRORS, error_series(GATHERED), GATHERED), changes_evidence([], GATHERED)]
    without = next(h for h in diagnose(book, own, T0).hypotheses if h.id == "bad_deploy")
    with_past = next(h for h in diagnose(book, [*own, history], T0).hypotheses if h.id == "bad_deploy")
    assert with_past.prior == MAX_PRIOR and with_past.score == pytest.approx(without.score + MAX_PRIOR, abs=1e-3)
    note = next(f for f in with_past.findings if f.test == "confirmed_before")
    assert "confirmed before: 3 earlier incidents" in note.detail and f"at most {MAX_PRIOR:.2f}" in note.detail
    # A hypothesis with no support in this incident gains nothing from history.
    dep = next(h for h in diagnose(book, [*own, history], T0).hypotheses if h.id == "dependency_failure")
    assert dep.prior == 0


def test_blast_radius_without_the_catalog_says_so() -> None:
    radius = compute("payments", None)
    assert radius.dependents == [] and "not read from the catalog" in radius.notes[0]


def test_a_dependency_confirmed_before_weighs_only_for_that_dependency() -> None:
    past = PastIncidents(service="checkout", runbook="bad-deploy", window="30d", incidents=[
        PastIncident(incident_id="i", run_id="r1", phase="resolved", hypothesis="dependency_failure",
                     subject="payments")])
    assert "dependencies blamed: payments x1" in past.summary()
    history = Evidence(id="past_incidents", kind="past_incidents", source="temporal", query="visibility", ok=True,
                       past=past, gathered_at=GATHERED)
    # Both dependencies partly supported (no change to checkout): only payments gains the weight.
    d = diagnose(bad_deploy_runbook(), [*evidence(own_deploy=False, payments_failing=False), history], T0)
    priors = {h.title: h.prior for h in d.hypotheses}
    assert priors["failing dependency: payments"] == 0.05 and priors["failing dependency: inventory"] == 0


def test_a_derived_param_is_refused_where_it_has_no_value() -> None:
    from firebreak.runbook import RunbookError, default_runbook_dir, parse_runbook

    text = (default_runbook_dir() / "bad-deploy.yaml").read_text()
    # The service's own change log may not read a dependency: it is not judged per dependency.
    bad = text.replace('    resource: "service/{service}"\n  # Earlier', '    resource: "service/{dependency}"\n  # Earlier', 1)
    assert bad != text
    with pytest.raises(RunbookError, match="uses derived params \\['dependency'\\] without for_each"):
        parse_runbook(bad, "rb.yaml")
    # A derived param never comes from an alert label.
    assert "dependency" not in bad_deploy_runbook().extract_params(
        {"alertname": "HighErrorRate", "namespace": "shop", "service": "checkout", "dependency": "payments"})
