"""Contracts: validation at the boundary, canonical plan hash, escaping."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from firebreak.contracts import Alert, Approval, Hypothesis, IncidentInput, Plan, canonical_json
from firebreak.escaping import TemplateError, path_segment, promql_string, render_plain, render_promql
from firebreak.plan import build_plan, check_plan, undo_params
from firebreak.plan_view import render_plan
from firebreak.runbook import default_runbook_dir, load_runbook

BOOK = load_runbook(default_runbook_dir() / "bad-deploy.yaml")
PARAMS = {"namespace": "shop", "service": "checkout"}
TOP = Hypothesis(id="bad_deploy", title="t", score=1.0, findings=[], actions=["rollback"])


def plan(**changes) -> Plan:
    built = build_plan(BOOK, PARAMS, TOP, incident_id="shop.checkout.error-rate", run_id="run-1")
    assert built is not None
    return built.model_copy(update=changes)


def test_alert_needs_alertname_and_valid_label_names():
    with pytest.raises(ValidationError, match="alertname"):
        Alert(fingerprint="f", labels={"service": "x"})
    # UTF-8 names (Alertmanager >= 0.27) are accepted; control characters and over-long names are not.
    assert Alert(fingerprint="f", labels={"alertname": "A", "service.name": "x", "région": "y"}).labels["région"] == "y"
    for bad in ("bad\nname", "", "x" * 129):
        with pytest.raises(ValidationError):
            Alert(fingerprint="f", labels={"alertname": "A", bad: "x"})


def test_invalid_workflow_input_is_refused_before_start():
    with pytest.raises(ValidationError, match="incident_id"):
        IncidentInput(incident_id="has spaces/and slashes", runbook=BOOK, params=PARAMS)


def test_plan_hash_is_canonical_and_changes_with_any_field():
    p = plan()
    assert p.hash == plan().hash and len(p.hash) == 64
    step = p.steps[0].model_copy(update={"resource": "service/payments"})
    assert p.model_copy(update={"steps": [step]}).hash != p.hash
    assert plan(run_id="run-2").hash != p.hash
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_plan_holds_only_catalog_actions():
    p = plan()
    check_plan(p, BOOK)
    [step] = p.steps
    assert (step.verb, step.resource, step.target) == ("fleet.rollback", "service/checkout", "fleet")
    assert step.verify is not None and 'service="checkout"' in step.verify.query
    with pytest.raises(ValueError, match="answers with \\['rollback'\\], not \\['drop_db'\\]"):
        check_plan(p.model_copy(update={"steps": [step.model_copy(update={"action": "drop_db"})]}), BOOK)
    with pytest.raises(ValueError, match="step s1: verb differs"):
        check_plan(p.model_copy(update={"steps": [step.model_copy(update={"verb": "fleet.deploy"})]}), BOOK)
    with pytest.raises(ValueError, match="step s1: resource differs"):
        check_plan(p.model_copy(update={"steps": [step.model_copy(update={"resource": "service/../admin"})]}), BOOK)


@pytest.mark.parametrize(("change", "field"), [
    ({"undo": {"verb": "fleet.deploy", "params": {"version": "pwned"}}}, "undo.params.version"),
    ({"verify": {"threshold": 1e9}}, "verify.threshold"),
    ({"verify": {"test": "above"}}, "verify.test"),
    ({"timeout_s": 900.0}, "timeout_s"),
    ({"description": "harmless"}, "description"),
    ({"blast_radius": "none"}, "blast_radius"),
    ({"params": {"version": "v1"}}, "params.version"),
])
def test_plan_fields_the_runbook_does_not_derive_are_named(change: dict, field: str):
    p = plan()
    step = p.steps[0].model_dump(mode="json")
    for key, value in change.items():
        step[key] = {**step[key], **value} if isinstance(step.get(key), dict) and key != "params" else value
    crafted = p.model_copy(update={"steps": [p.steps[0].model_validate(step)]})
    with pytest.raises(ValueError, match=f"step s1: {field.replace('.', '[.]')} differs"):
        check_plan(crafted, BOOK)


def test_plan_binds_its_params_and_they_must_fit_the_runbook():
    with pytest.raises(ValueError, match="params.service: does not match"):
        check_plan(plan(params={"namespace": "shop", "service": "Checkout; drop"}), BOOK)
    with pytest.raises(ValueError, match="params: the plan does not bind"):
        check_plan(plan(params=None), BOOK)
    # params of another service re-derive another resource: the plan's own step no longer fits
    with pytest.raises(ValueError, match="step s1: blast_radius differs|step s1: description differs"):
        check_plan(plan(params={"namespace": "shop", "service": "payments"}), BOOK)


def test_plan_hash_covers_every_field_and_the_screen_shows_it():
    """Each leaf of the plan's JSON changes the hash and the approval screen: nothing is left out."""
    p = plan(requesters=["bob"], evidence=["deploy v42 4s before the alert"])
    data = p.model_dump(mode="json")

    def leaves(value, path=()):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from leaves(v, (*path, k))
        elif isinstance(value, list) and value:
            for i, v in enumerate(value):
                yield from leaves(v, (*path, i))
        else:
            yield path

    checked = 0
    for path in leaves(data):
        changed = json.loads(json.dumps(data))
        node = changed
        for part in path[:-1]:
            node = node[part]
        old = node[path[-1]]
        node[path[-1]] = (old + 1) if isinstance(old, (int, float)) and not isinstance(old, bool) else (
            f"{old}x" if isinstance(old, str) else ["x"] if isinstance(old, list) else {"x": "y"} if old == {} else "x")
        try:
            other = Plan.model_validate(changed)
        except ValidationError:
            continue  # a literal (executor, risk, test) has no other valid value of this shape
        assert other.hash != p.hash, path
        # ...and what the approver is shown changes with it (firebreak approve renders this).
        assert render_plan(other) != render_plan(p), path
        checked += 1
    assert checked >= 25


def test_a_plan_built_before_plans_bound_everything_keeps_its_hash():
    """Replays of incidents started earlier rebuild their plan without the new fields: same hash."""
    legacy = build_plan(BOOK, PARAMS, TOP, incident_id="i", run_id="r", bind_all=False)
    assert legacy is not None and legacy.params is None
    assert b'"params":null' not in legacy.canonical() and b'"requesters"' not in legacy.canonical()


def test_undo_params_come_from_the_result():
    [step] = plan().steps
    assert undo_params(step, {"previous_version": "v42", "version": "v41"}) == {"version": "v42"}
    with pytest.raises(ValueError, match="previous_version"):
        undo_params(step, {})


def test_escaping_keeps_values_literal():
    hostile = 'checkout"} or vector(1) or {a="'
    query = render_promql('up{service="{service}"}', {"service": hostile})
    assert query == 'up{service="checkout\\"} or vector(1) or {a=\\""}'
    assert promql_string("a\\b\n") == "a\\\\b\\n"
    assert path_segment("a/../b?x#y") == "a%2F..%2Fb%3Fx%23y"
    with pytest.raises(TemplateError):
        path_segment("..")
    with pytest.raises(TemplateError):
        render_plain("service/{service}", {"service": "a/b"})


def test_approval_signing_payload_excludes_signature_and_keeps_expiry_bytes():
    a = Approval(workflow_id="w", plan_hash="a" * 64, decision="approve", nonce="n" * 16,
                 expires_at="2030-01-01T00:00:00Z", approver="alice")
    assert b'"expires_at":"2030-01-01T00:00:00Z"' in a.signing_payload()
    assert a.signing_payload() == a.model_copy(update={"signature": "x"}).signing_payload()
    with pytest.raises(ValidationError):
        Approval(workflow_id="w", plan_hash="a" * 64, decision="approve", nonce="n" * 16,
                 expires_at="2030-01-01T00:00:00", approver="alice")


def test_the_broker_refuses_a_plan_over_the_runbooks_caps():
    from firebreak.runbook import Caps

    def with_caps(caps: Caps):
        return BOOK.model_copy(update={"remediate": BOOK.remediate.model_copy(update={"caps": caps})})

    with pytest.raises(ValueError, match=r"caps.services: 'checkout' is not among \['payments'\]"):
        check_plan(plan(), with_caps(Caps(services=["payments"])))
    check_plan(plan(), with_caps(Caps(max_steps=1)))  # one step: within
