"""Runbook schema and loader: good runbooks load, bad ones name file, line and field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from firebreak.cli import main
from firebreak.runbook import LabelError, RunbookError, default_runbook_dir, load_runbook, load_runbooks, parse_runbook, route

GOOD = (default_runbook_dir() / "bad-deploy.yaml").read_text()


def test_shipped_runbooks_load_and_cover_the_demo_faults():
    books = {b.name: b for b in load_runbooks(default_runbook_dir())}
    assert {"bad-deploy", "saturation", "stuck"} <= set(books)
    verbs = {a.verb for b in books.values() for a in b.remediate.actions.values()}
    assert {"fleet.rollback", "fleet.scale", "fleet.restart"} <= verbs


def test_typo_in_a_field_names_file_line_and_field(tmp_path: Path):
    bad = GOOD.replace("    blast_radius:", "    blast_radious:")
    path = tmp_path / "typo.yaml"
    path.write_text(bad)
    line = next(i for i, text in enumerate(bad.splitlines(), 1) if "blast_radious" in text)
    with pytest.raises(RunbookError) as err:
        load_runbook(path)
    assert err.value.path == str(path)
    assert err.value.line == line
    assert err.value.field == "remediate.actions.rollback.blast_radious"
    assert f"{path}:{line}: remediate.actions.rollback.blast_radious" in str(err.value)


def test_wrong_type_names_the_line_of_the_value():
    bad = re.sub(r"^version: \d+\n", "version: first\n", GOOD, count=1, flags=re.M)
    with pytest.raises(RunbookError) as err:
        parse_runbook(bad, "rb.yaml")
    line = next(i for i, text in enumerate(bad.splitlines(), 1) if text.startswith("version:"))
    assert err.value.field == "version" and err.value.line == line


def test_unknown_action_in_a_hypothesis_is_refused():
    bad = GOOD.replace("    actions: [rollback]", "    actions: [rm_rf]")
    with pytest.raises(RunbookError, match="rm_rf"):
        parse_runbook(bad, "rb.yaml")


def test_undeclared_param_in_a_query_is_refused():
    bad = GOOD.replace('service="{service}",code=~"5.."}', 'service="{svc}",code=~"5.."}', 1)
    assert bad != GOOD
    with pytest.raises(RunbookError, match="svc"):
        parse_runbook(bad, "rb.yaml")


def test_yaml_syntax_error_names_the_line():
    with pytest.raises(RunbookError) as err:
        parse_runbook("name: x\n  bad: [\n", "rb.yaml")
    assert err.value.line is not None and err.value.field == "(yaml)"


def test_matching_and_params():
    book = parse_runbook(GOOD, "rb.yaml")
    labels = {"alertname": "HighErrorRate", "namespace": "shop", "service": "checkout"}
    assert route([book], labels) is book
    assert route([book], {**labels, "namespace": "other"}) is None
    params = book.extract_params(labels)
    assert book.incident_key(params) == "shop.checkout.error-rate"


def test_hostile_label_is_refused_before_any_substitution():
    book = parse_runbook(GOOD, "rb.yaml")
    fixture = json.loads((Path(__file__).parent / "data" / "webhooks" / "hostile_promql_breakout.json").read_text())
    labels = fixture["alerts"][0]["labels"]
    with pytest.raises(LabelError) as err:
        book.extract_params(labels)
    assert err.value.label == "service"


def test_cli_check_exits_non_zero_with_file_line_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "typo.yaml"
    path.write_text(GOOD.replace("  escalate_to:", "  escalate_too:"))
    assert main(["runbook", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:" in err and "remediate.escalate_too" in err and "unknown field (did you mean 'escalate_to'?)" in err
    assert main(["runbook", "check", str(default_runbook_dir() / "bad-deploy.yaml")]) == 0


def test_cli_schema_is_json_schema(capsys: pytest.CaptureFixture[str]):
    assert main(["runbook", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "apiVersion" in schema["properties"] and "remediate" in schema["required"]
