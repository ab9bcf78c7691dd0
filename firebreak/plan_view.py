"""What an approver is shown before signing: every field of the plan, nothing left out.

The screen is rendered from the plan's own JSON, field by field, so a field that
decides what runs can never be hashed without being shown. The CLI then hashes
the plan it rendered (``Plan.hash``) and signs that hash, never one it was told.
"""

from __future__ import annotations

import json
from typing import Any

from firebreak.contracts import Plan

# Shown first, in this order; anything else the plan carries follows, so nothing hides.
_HEAD = ("incident_id", "run_id", "runbook", "runbook_version", "hypothesis", "requesters", "params", "evidence")
_STEP_HEAD = ("action", "target", "verb", "resource", "params", "risk", "blast_radius", "timeout_s", "description")


def _scalar(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _lines(value: Any, indent: str) -> list[str]:
    """A JSON value as indented ``key: value`` lines; lists and mappings nest."""
    if isinstance(value, dict):
        if not value:
            return [f"{indent}(none)"]
        out: list[str] = []
        for key in value:
            child = value[key]
            if isinstance(child, (dict, list)) and child:
                out.append(f"{indent}{key}:")
                out.extend(_lines(child, indent + "  "))
            else:
                out.append(f"{indent}{key}: {_scalar(child) if not isinstance(child, (dict, list)) else '(none)'}")
        return out
    if isinstance(value, list):
        if not value:
            return [f"{indent}(none)"]
        out = []
        for item in value:
            if isinstance(item, (dict, list)):
                out.append(f"{indent}-")
                out.extend(_lines(item, indent + "  "))
            else:
                out.append(f"{indent}- {_scalar(item)}")  # quoted: a value can never fake a line
        return out
    return [f"{indent}{_scalar(value)}"]


def _ordered(data: dict[str, Any], head: tuple[str, ...]) -> dict[str, Any]:
    return {**{k: data[k] for k in head if k in data}, **{k: v for k, v in data.items() if k not in head}}


def render_plan(plan: Plan) -> list[str]:
    """Every field of the plan, as lines; what the hash covers is exactly what is shown."""
    data = json.loads(plan.canonical())
    steps = data.pop("steps")
    impact = data.pop("impact", None)
    out = _lines(_ordered(data, _HEAD), "  ")
    for step in steps:
        step_id = step.pop("id")
        out.append(f"  step {step_id}:")
        out.extend(_lines(_ordered(step, _STEP_HEAD), "    "))
    if impact is not None:
        out.append("  impact:" if impact else "  impact: (none)")
        for step_id, radius in impact.items():
            out.extend(_radius_lines(step_id, radius, plan))
    return out


def _radius_lines(step_id: str, radius: dict[str, Any], plan: Plan) -> list[str]:
    """A step's blast radius: its summary, then every field; dependents that were not read never read as none."""
    known = (plan.impact or {}).get(step_id)
    out = [f"    {step_id}: {_scalar(known.line()) if known is not None else ''}".rstrip()]
    for line in _lines(radius, "      "):
        if line.strip() == "dependents: (none)" and known is not None and known.dependents_unknown:
            line = "      dependents: unknown (not read)"
        out.append(line)
    return out
