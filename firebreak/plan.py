"""Plan building and checking: pure functions, safe inside workflow code.

A plan holds only actions from the runbook's catalog, rendered with the
incident's validated params. Its hash (``Plan.hash``) is what approvers sign.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from firebreak.contracts import Hypothesis, Plan, PlanStep, UndoStep, VerifyCheck
from firebreak.escaping import render_plain, render_promql, render_text
from firebreak.runbook import Investigation, Runbook, ScalarParam, parse_duration


def build_plan(runbook: Runbook, params: Mapping[str, str], hypothesis: Hypothesis, *, incident_id: str, run_id: str) -> Plan | None:
    """The steps that answer a hypothesis, or None if the runbook offers none."""
    steps: list[PlanStep] = []
    for number, name in enumerate(hypothesis.actions, start=1):
        action = runbook.remediate.actions[name]
        verify = None
        if action.verify:
            read = _metrics_read(runbook)
            verify = VerifyCheck(
                target=read.target,
                resource=render_plain(read.resource, params),
                query=render_promql(action.verify.query, params),
                test=action.verify.test,
                threshold=action.verify.threshold,
                within_s=parse_duration(action.verify.within).total_seconds(),
                interval_s=parse_duration(action.verify.interval).total_seconds(),
            )
        steps.append(
            PlanStep(
                id=f"s{number}",
                action=name,
                description=render_text(action.description or name, params),
                executor=action.executor,
                target=action.target,
                verb=action.verb,
                resource=render_plain(action.resource, params),
                params=dict(action.params),
                risk=action.risk,
                blast_radius=render_text(action.blast_radius, params),
                timeout_s=parse_duration(action.timeout).total_seconds(),
                verify=verify,
                undo=UndoStep(verb=action.undo.verb, params=dict(action.undo.params)) if action.undo else None,
            )
        )
    if not steps:
        return None
    return Plan(
        incident_id=incident_id,
        run_id=run_id,
        runbook=runbook.name,
        runbook_version=runbook.version,
        hypothesis=hypothesis.id,
        steps=steps,
    )


def _metrics_read(runbook: Runbook) -> Investigation:
    """Verification reads metrics with the read scope the runbook already declares."""
    for spec in runbook.investigate:
        if spec.kind.startswith("prometheus"):
            return spec
    raise ValueError(f"runbook {runbook.name} verifies with a query but declares no prometheus read")


def _template_regex(template: str, runbook: Runbook) -> re.Pattern[str]:
    parts: list[str] = []
    pos = 0
    for match in re.finditer(r"\{([a-z][a-z0-9_]*)\}", template):
        parts.append(re.escape(template[pos : match.start()]))
        pattern = runbook.params[match.group(1)].pattern.removeprefix("^").removesuffix("$")
        parts.append(f"(?:{pattern})")
        pos = match.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


def check_plan(plan: Plan, runbook: Runbook) -> None:
    """Deny by default: every step must be a catalog action of this runbook, unchanged."""
    if (plan.runbook, plan.runbook_version) != (runbook.name, runbook.version):
        raise ValueError(f"plan is for runbook {plan.runbook} v{plan.runbook_version}, not {runbook.name} v{runbook.version}")
    for step in plan.steps:
        action = runbook.remediate.actions.get(step.action)
        if action is None:
            raise ValueError(f"step {step.id}: action {step.action!r} is not in the runbook's catalog")
        if (step.target, step.verb, step.risk) != (action.target, action.verb, action.risk):
            raise ValueError(f"step {step.id}: target, verb or risk differ from the catalog action {step.action!r}")
        if not _template_regex(action.resource, runbook).fullmatch(step.resource):
            raise ValueError(f"step {step.id}: resource {step.resource!r} does not fit {action.resource!r}")
        if step.params != dict(action.params):
            raise ValueError(f"step {step.id}: params differ from the catalog action {step.action!r}")
        expected_undo = action.undo.verb if action.undo else None
        if (step.undo.verb if step.undo else None) != expected_undo:
            raise ValueError(f"step {step.id}: undo differs from the catalog action {step.action!r}")


def undo_params(step: PlanStep, response: Mapping[str, Any]) -> dict[str, ScalarParam]:
    """Fill an undo's ``{result.FIELD}`` params from the step's response."""
    if step.undo is None:
        return {}
    out: dict[str, ScalarParam] = {}
    for key, value in step.undo.params.items():
        match = re.fullmatch(r"\{result\.([a-z][a-z0-9_]*)\}", value) if isinstance(value, str) else None
        if match:
            field = match.group(1)
            if field not in response or not isinstance(response[field], (str, int, float, bool)):
                raise ValueError(f"undo of {step.id} needs {field!r} in the step's result")
            out[key] = response[field]
        else:
            out[key] = value
    return out
