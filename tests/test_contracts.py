"""Contracts: validation at the boundary, canonical plan hash, escaping."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from firebreak.contracts import Alert, Approval, Hypothesis, IncidentInput, Plan, canonical_json
from firebreak.escaping import TemplateError, path_segment, promql_string, render_plain, render_promql
from firebreak.plan import build_plan, check_plan, undo_params
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
    with pytest.raises(ValidationError):
        Alert(fingerprint="f", labels={"alertname": "A", "bad-name": "x"})


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
    with pytest.raises(ValueError, match="catalog"):
        check_plan(p.model_copy(update={"steps": [step.model_copy(update={"action": "drop_db"})]}), BOOK)
    with pytest.raises(ValueError, match="target, verb"):
        check_plan(p.model_copy(update={"steps": [step.model_copy(update={"verb": "fleet.deploy"})]}), BOOK)
    with pytest.raises(ValueError, match="resource"):
        check_plan(p.model_copy(update={"steps": [step.model_copy(update={"resource": "service/../admin"})]}), BOOK)


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
