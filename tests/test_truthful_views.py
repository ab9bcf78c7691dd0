"""What the approver and the on-call engineer see is true (issue 26), pure: evidence built by hand.

* a target whose dependents were not read is "dependents unknown (not read)" on the card, the ticket and
  the approval screen, never "no dependents" nor "(none)";
* a missing traffic figure says why: not asked, not answered, or answered with no calls; never "did not
  answer" for a query that answered or was never asked;
* the radius of plans proposed before this keeps its bytes (its hash), so their approvals still count;
* a rollback that left the alert firing reads as needing a human.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from firebreak.blast_radius import NOT_READ, BlastRadius, compute
from firebreak.catalog import CatalogEntry, CatalogWalk
from firebreak.contracts import Evidence, Hypothesis, IncidentStatus, Phase, Plan, Sample, Series
from firebreak.correlation import correlation_lines, impact_of
from firebreak.plan import build_plan
from firebreak.plan_view import render_plan
from firebreak.runbook import default_runbook_dir, load_runbook
from firebreak.watch import changes
from test_correlation import GATHERED, evidence, walk
from workflows.summary import phase_label, plan_markdown, status_markdown, waiting_for

# A false claim about what was read: what no view may say of a target whose dependents were not read,
# or of traffic that was not asked for or that Prometheus answered.
NO_DEPENDENTS = "no dependents"


def plan_for(runbook: str, service: str, action: str, params: dict[str, str] | None = None) -> Plan:
    book = load_runbook(default_runbook_dir() / f"{runbook}.yaml")
    top = Hypothesis(id="h", title="the top hypothesis", score=1.0, findings=[], actions=[action],
                     params=params or {})
    plan = build_plan(book, {"namespace": "shop", "service": service}, top, incident_id=f"shop.{service}.x",
                      run_id="r1", requesters=["bob"], bind_all=True)
    assert plan is not None
    return plan


def views(plan: Plan, ev: list[Evidence], service: str) -> dict[str, str]:
    """The card, the ticket and the approval screen of an incident awaiting approval of ``plan``."""
    status = IncidentStatus(incident_id=plan.incident_id, phase=Phase.awaiting_approval, runbook=plan.runbook,
                            runbook_version=plan.runbook_version, service=service, opened_at=GATHERED,
                            alerts_received=1, evidence=ev, plan=plan, plan_hash=plan.hash)
    return {"card": status_markdown(status), "ticket": plan_markdown(status), "approval screen": "\n".join(
        render_plan(plan)), "correlation": "\n".join(correlation_lines(None, service, ev, plan))}


def catalog_walk(root: str) -> Evidence:
    return walk().model_copy(update={"catalog": walk().catalog.model_copy(update={"root": root})})


def failed(eid: str, kind: str, gap: str) -> Evidence:
    return Evidence(id=eid, kind=kind, source="x", query="", ok=False, gap=gap, gathered_at=GATHERED)


def callers(*pairs: tuple[str, float]) -> Evidence:
    return Evidence(id="callers", kind="prometheus_instant", source="prometheus", query="x", ok=True,
                    series=[Series(labels={"source": s}, samples=[Sample(t=GATHERED, v=v)]) for s, v in pairs],
                    gathered_at=GATHERED)


@pytest.mark.parametrize("catalog, why", [
    (None, "this runbook does not read the catalog"),
    (failed("catalog", "catalog", "catalog: investigation failed: connection refused"), "the catalog read failed"),
])
@pytest.mark.parametrize("runbook, service, action", [
    ("stuck", "payments", "restart"), ("saturation", "inventory", "scale_out"), ("bad-deploy", "checkout", "rollback"),
])
def test_dependents_not_read_are_unknown_on_every_view_never_none(catalog, why, runbook, service, action) -> None:
    ev = [callers(("checkout", 40.0))] + ([catalog] if catalog else [])
    plan = plan_for(runbook, service, action)
    plan = plan.model_copy(update={"impact": impact_of(plan, ev, truthful=True)})
    radius = plan.impact["s1"]
    assert radius.dependents_unknown and why in radius.unread, radius
    for name, text in views(plan, ev, service).items():
        assert NOT_READ in text, (name, text)
        assert NO_DEPENDENTS not in text and "dependents: (none)" not in text, (name, text)
        assert "did not answer" not in text, (name, text)  # the callers query answered


@pytest.mark.parametrize("service, target, dependents", [
    ("payments", "payments", {"checkout": "team-storefront", "orders": "team-fulfilment"}),
    ("inventory", "inventory", {"checkout": "team-storefront"}),
])
def test_a_walk_that_was_read_names_the_real_dependents_with_their_owners(service, target, dependents) -> None:
    runbook, action = ("stuck", "restart") if service == "payments" else ("saturation", "scale_out")
    ev = [catalog_walk(service), callers(("checkout", 30.0), ("orders", 10.0))]
    plan = plan_for(runbook, service, action)
    plan = plan.model_copy(update={"impact": impact_of(plan, ev, truthful=True)})
    radius = plan.impact["s1"]
    assert {d.name: d.owner for d in radius.dependents} == dependents
    for name, text in views(plan, ev, service).items():
        assert all(f"{d} ({owner}" in text or f'"{d}"' in text for d, owner in dependents.items()), (name, text)
        assert NO_DEPENDENTS not in text and NOT_READ not in text and "did not answer" not in text, (name, text)
    # Shares from the answer: payments takes 30/s from checkout and 10/s from orders.
    if service == "payments":
        assert {d.name: d.traffic_share for d in radius.dependents} == {"checkout": 0.75, "orders": 0.25}


def test_the_dependency_sample_names_who_depends_on_the_failing_dependency_on_every_view() -> None:
    ev = evidence(own_deploy=False, payments_failing=True)
    plan = plan_for("bad-deploy", "checkout", "rollback_dependency", {"dependency": "payments"})
    plan = plan.model_copy(update={"impact": impact_of(plan, ev, truthful=True)})
    for name, text in views(plan, ev, "checkout").items():
        assert "checkout (team-storefront" in text and "orders (team-fulfilment" in text, (name, text)
        assert NO_DEPENDENTS not in text and NOT_READ not in text and "did not answer" not in text, (name, text)


def test_a_target_read_with_no_dependents_says_so_and_asks_no_traffic() -> None:
    # checkout is read, and nothing depends on it: "no dependents in the catalog" is then true, and no
    # traffic figure is missing, so none is said to be.
    ev = evidence(own_deploy=True, payments_failing=False)
    plan = plan_for("bad-deploy", "checkout", "rollback")
    radius = impact_of(plan, ev, truthful=True)["s1"]
    assert radius.line() == "checkout (owner team-storefront): no dependents in the catalog"
    assert radius.notes == []
    # Before this change the same radius claimed Prometheus did not answer, though nothing was asked.
    assert impact_of(plan, ev)["s1"].notes == ["no traffic figures (Prometheus did not answer)"]


@pytest.mark.parametrize("traffic, note", [
    (None, "no traffic figures: this runbook does not read the calls to payments by caller"),
    (failed("callers", "prometheus_instant", "callers: HTTP 503"),
     "no traffic figures: Prometheus did not answer (callers: HTTP 503)"),
    (callers(), "no traffic figures: Prometheus answered: no calls to payments by caller"),
    (callers(("checkout", 0.0)), "no traffic figures: Prometheus answered: no calls to payments by caller"),
    (callers(("checkout", 40.0)), None),
])
def test_a_missing_traffic_figure_says_why(traffic, note) -> None:
    ev = [catalog_walk("payments")] + ([traffic] if traffic else [])
    plan = plan_for("stuck", "payments", "restart")
    radius = impact_of(plan, ev, truthful=True)["s1"]
    assert [d.name for d in radius.dependents] == ["checkout", "orders"]
    if note is None:
        assert radius.notes == [] and radius.dependents[0].traffic_share == 1.0
    else:
        assert radius.notes and radius.notes[0].startswith(note), radius.notes
        assert note in radius.line()


def test_radii_proposed_before_keep_their_bytes_and_hash() -> None:
    # The legacy computation (what an incident proposed before the patch replays with) is unchanged, and
    # a radius without `unread` serializes as before the field existed: the plan's hash is the same.
    ev = evidence(own_deploy=False, payments_failing=True)
    plan = plan_for("bad-deploy", "checkout", "rollback_dependency", {"dependency": "payments"})
    legacy = impact_of(plan, ev)
    assert "unread" not in legacy["s1"].model_dump()
    assert legacy == impact_of(plan, ev, truthful=True)  # read, with shares: the same either way
    old = compute("payments", None)
    assert old.notes == ["payments was not read from the catalog: dependents unknown"] and "unread" not in old.model_dump()
    # ...and a legacy radius that was not read still shows as unknown, never as none.
    assert old.line() == f"payments (owner unknown): {NOT_READ}"
    assert BlastRadius.model_validate(compute("payments", None, unread="x").model_dump()).unread == "x"


def test_a_rollback_that_left_the_alert_firing_reads_as_needing_a_human() -> None:
    status = IncidentStatus(incident_id="i", phase=Phase.rolled_back, runbook="bad-deploy", runbook_version=2,
                            opened_at=GATHERED, alerts_received=1, closed_at=GATHERED + timedelta(minutes=4),
                            outcome="step s1 did not help; rolled back, and the alert still fires", needs_a_human=True)
    assert status_markdown(status).startswith("### ROLLED_BACK: needs a human")
    assert waiting_for(status) == "a human (escalated)"
    assert "phase ROLLED_BACK: needs a human" in changes(None, status)  # `status --watch` says it too
    green = status.model_copy(update={"needs_a_human": False})
    assert phase_label(green.phase) == "rolled_back" and waiting_for(green) == "-"
