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
from firebreak.runbook import Investigation, Runbook, ScalarParam, metrics_read, parse_duration


def derive_step(runbook: Runbook, params: Mapping[str, str], action_name: str, number: int) -> PlanStep:
    """Step number ``number`` of a plan, as the runbook's catalog action renders it with ``params``.

    The workflow builds plans with this and the broker re-derives them with it, so the two
    can only agree when every field comes from the catalog.
    """
    action = runbook.remediate.actions[action_name]
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
    return PlanStep(
        id=f"s{number}",
        action=action_name,
        description=render_text(action.description or action_name, params),
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


def build_plan(
    runbook: Runbook,
    params: Mapping[str, str],
    hypothesis: Hypothesis,
    *,
    incident_id: str,
    run_id: str,
    requesters: list[str] | None = None,
    evidence: list[str] | None = None,
    bind_all: bool = True,
) -> Plan | None:
    """The steps that answer a hypothesis, or None if the runbook offers none.

    ``bind_all`` puts the params, the requesters and the evidence shown into the plan (and
    so into its hash); only replays of incidents started before that existed pass False.
    """
    # A hypothesis judged per dependency adds that dependency (validated by the walk) to the params.
    params = {**params, **hypothesis.params}
    steps = [derive_step(runbook, params, name, number) for number, name in enumerate(hypothesis.actions, start=1)]
    if not steps:
        return None
    return Plan(
        incident_id=incident_id,
        run_id=run_id,
        runbook=runbook.name,
        runbook_version=runbook.version,
        hypothesis=hypothesis.id,
        steps=steps,
        params=dict(params) if bind_all else None,
        requesters=sorted(set(requesters or [])) if bind_all else None,
        evidence=list(evidence or []) if bind_all else None,
    )


def _metrics_read(runbook: Runbook) -> Investigation:
    """Verification reads metrics with the read scope the runbook already declares."""
    read = metrics_read(runbook)
    if read is None:  # refused at load (runbook.unmet_read_need); only a runbook that skipped loading gets here
        raise ValueError(f"runbook {runbook.name} verifies with a query but declares no prometheus read")
    return read


def over_caps(plan: Plan, runbook: Runbook) -> str | None:
    """The runbook cap this plan breaks, named, or None: such a plan is never proposed nor minted."""
    caps = runbook.remediate.caps
    if caps.max_steps is not None and len(plan.steps) > caps.max_steps:
        return f"caps.max_steps: {len(plan.steps)} steps, at most {caps.max_steps}"
    for name in ("service", "dependency"):  # the alerting service, and a dependency a step targets
        service = (plan.params or {}).get(name)
        if caps.services is not None and service is not None and service not in caps.services:
            return f"caps.services: {service!r} is not among {caps.services}"
    if caps.max_dependents is not None:
        # A cap on the blast radius needs one: a step without a computed radius is not judged safe.
        unknown = [step.id for step in plan.steps if step.id not in (plan.impact or {})]
        if unknown:
            return f"caps.max_dependents: no computed blast radius for step {', '.join(unknown)}"
        for step_id, radius in (plan.impact or {}).items():
            if len(radius.dependents) > caps.max_dependents:
                return (f"caps.max_dependents: step {step_id} on {radius.target} reaches {len(radius.dependents)} "
                        f"dependents ({', '.join(d.name for d in radius.dependents)}), at most {caps.max_dependents}")
    for step in plan.steps:
        for name, ceiling in caps.max_params.items():
            value = step.params.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > ceiling:
                return f"caps.max_params.{name}: step {step.id} asks {value}, at most {ceiling:g}"
    return None


def param_problem(runbook: Runbook, name: str, value: str) -> str | None:
    """Why a param value may not be used with this runbook (undeclared, or off its pattern), or None."""
    spec = runbook.params.get(name)
    if spec is None:
        return f"not declared by runbook {runbook.name!r}"
    if not re.fullmatch(spec.pattern.removeprefix("^").removesuffix("$"), value):
        return f"does not match {spec.pattern}"
    return None


def check_plan(plan: Plan, runbook: Runbook) -> None:
    """Deny by default: re-derive every step from this runbook and the plan's params.

    Raises ValueError naming the first field that differs from what the catalog gives,
    so a plan with hidden changes (undo params, verification, timeout...) never passes.
    """
    if (plan.runbook, plan.runbook_version) != (runbook.name, runbook.version):
        raise ValueError(f"plan is for runbook {plan.runbook} v{plan.runbook_version}, not {runbook.name} v{runbook.version}")
    if plan.params is None:
        raise ValueError("params: the plan does not bind the params its steps are derived from")
    for name, value in plan.params.items():
        problem = param_problem(runbook, name, value)
        if problem is not None:
            raise ValueError(f"params.{name}: {problem}")
    cap = over_caps(plan, runbook)
    if cap is not None:
        raise ValueError(cap)
    hypothesis = next((h for h in runbook.diagnose if h.id == plan.hypothesis), None)
    if hypothesis is None:
        raise ValueError(f"hypothesis: {plan.hypothesis!r} is not in runbook {runbook.name!r}")
    for name in plan.params:
        # A derived param (the dependency a step targets) only answers a hypothesis judged per dependency.
        derived = runbook.params[name].derived
        if derived and hypothesis.for_each != derived:
            raise ValueError(f"params.{name}: derived from the {derived} walk, but hypothesis "
                             f"{hypothesis.id!r} is not judged per {derived}")
    missing = [n for n, p in runbook.params.items() if p.derived and p.derived == hypothesis.for_each
               and n not in plan.params]
    if missing:
        raise ValueError(f"params: hypothesis {hypothesis.id!r} needs {missing}")
    if [s.action for s in plan.steps] != list(hypothesis.actions):
        raise ValueError(f"steps: hypothesis {hypothesis.id!r} answers with {hypothesis.actions}, "
                         f"not {[s.action for s in plan.steps]}")
    for number, step in enumerate(plan.steps, start=1):
        try:
            derived = derive_step(runbook, plan.params, step.action, number).model_dump(mode="json")
        except (KeyError, ValueError) as exc:
            raise ValueError(f"step {step.id}: cannot be derived from the catalog: {exc}") from None
        field = _first_difference(step.model_dump(mode="json"), derived)
        if field is not None:
            raise ValueError(f"step {step.id}: {field} differs from catalog action {step.action!r}")


def _first_difference(given: Any, derived: Any, path: str = "") -> str | None:
    """The dotted path of the first place two JSON values differ, or None."""
    if isinstance(given, dict) and isinstance(derived, dict):
        for key in sorted(set(given) | set(derived)):
            found = _first_difference(given.get(key), derived.get(key), f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    return None if given == derived else (path or "(value)")


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
