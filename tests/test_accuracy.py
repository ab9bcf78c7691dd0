"""Diagnosis accuracy on the real pipeline, and the demo's alert rules kept consistent with the runbooks.

The short variant of ``bench/accuracy.py`` runs here: its own stack, one fault of each kind
injected at the target, Prometheus and Alertmanager opening the incidents by themselves, alice
approving, and every trial must name the right hypothesis, propose, and resolve, with no false
escalation. The full run (``python bench/accuracy.py``, 21 trials of each kind) is the benchmark.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.accuracy_report import FAULTS, Trial, render
from conftest import needs
from demo.fleet import HEALTHY_ERRORS
from demo.prom import ALERT_RULES
from firebreak.diagnosis import range_window
from firebreak.runbook import default_runbook_dir, load_runbooks, route

REPO = Path(__file__).resolve().parents[1]

# Each alert rule and the evidence of the runbook it opens that says the same thing.
PAIRS = [
    ("HighErrorRate", "bad-deploy", "error_rate", "above"),
    ("HighLatencyP99", "saturation", "latency_p99", "above"),
    ("HighCPUSaturation", "saturation", "cpu", "above"),
    ("ServiceStuck", "stuck", "throughput", "below"),
]
_COMPARISON = re.compile(r"(>|==)\s*([0-9.]+)\s*$")


def rules() -> dict[str, dict]:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


@pytest.mark.parametrize(("alert", "runbook", "evidence", "test"), PAIRS, ids=[p[0] for p in PAIRS])
def test_each_rule_and_its_runbook_read_the_same_window_and_agree_on_the_threshold(
    alert: str, runbook: str, evidence: str, test: str
) -> None:
    rule = rules()[alert]
    books = load_runbooks(default_runbook_dir())
    book = route(books, {"alertname": alert, "namespace": "shop", "service": "checkout", **rule["labels"]})
    assert book is not None and book.name == runbook
    spec = next(i for i in book.investigate if i.id == evidence)
    # The same range window: what made the rule fire is what the diagnosis reads.
    assert range_window(spec.query) == range_window(rule["expr"]), (spec.query, rule["expr"])
    condition = next(c for h in book.diagnose for c in h.conditions if c.evidence == evidence and c.test == test)
    if test == "above":
        # No stricter than the rule: whenever the rule fires, the condition holds.
        op, value = _COMPARISON.search(rule["expr"].strip()).groups()  # type: ignore[union-attr]
        assert op == ">" and condition.threshold <= float(value)
    else:
        # The rule fires on no request at all in its window; the runbook's "below" holds then.
        assert re.search(r"==\s*0\b", rule["expr"]) and condition.threshold > 0


def test_a_bad_deploy_that_trips_the_alert_always_clears_the_before_after_factor() -> None:
    """From a healthy baseline, the rule's threshold is a rise of threshold/baseline: the factor must be lower."""
    rule = rules()["HighErrorRate"]
    threshold = float(_COMPARISON.search(rule["expr"].strip()).group(2))  # type: ignore[union-attr]
    book = next(b for b in load_runbooks(default_runbook_dir()) if b.name == "bad-deploy")
    rose = next(c for c in book.hypothesis("bad_deploy").conditions if c.test == "rose_after_change")
    assert rose.factor <= threshold / sum(HEALTHY_ERRORS.values())


def test_the_report_counts_a_wrong_top_a_missing_incident_and_a_false_escalation() -> None:
    right = Trial(round=1, fault="bad_deploy", service="checkout", approve=True, incident_id="i", run_id="r",
                  opened_s=11, proposed_s=12, runbook="bad-deploy", top="bad_deploy", top_score=1, phase="resolved")
    wrong_top = Trial(round=1, fault="saturation", service="payments", approve=True, run_id="r", opened_s=7,
                      proposed_s=8, runbook="saturation", top="bad_deploy", top_score=0.5, phase="resolved")
    missing = Trial(round=1, fault="stuck", service="inventory", approve=True)
    escalated = Trial(round=2, fault="bad_deploy", service="payments", approve=True, run_id="r", opened_s=11,
                      runbook="bad-deploy", top="bad_deploy", top_score=0.5, phase="failed")
    text = render([right, wrong_top, missing, escalated])
    assert right.right and not (wrong_top.right or missing.right or escalated.right)
    assert escalated.false_escalations == 1
    assert "1/4 trials right; incidents opened 3/4; false escalations 1" in text


@pytest.mark.e2e
@needs("prometheus", "alertmanager")
def test_every_quick_trial_on_the_real_pipeline_is_right(tmp_path: Path) -> None:
    out = tmp_path / "accuracy.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.accuracy", "--quick", "--state-dir", str(tmp_path / "state"),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=420,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    trials = json.loads(out.read_text())["trials"]
    assert sorted(t["fault"] for t in trials) == sorted(FAULTS)
    for trial in trials:
        assert trial["right"], trial
        assert trial["phase"] == "resolved" and trial["proposed_s"] < 60, trial
    assert "3/3 trials right; incidents opened 3/3; false escalations 0" in result.stdout
