"""Every patch IncidentWorkflow has, and where each is in its lifecycle.

A change to workflow code that a running incident's history depends on goes behind
``workflow.patched(ID)``, and the old branch stays until no open incident needs it. The stages
follow Temporal's patching sample:

1. ``patched``: both branches live; new runs take the new one and record the patch marker.
2. ``deprecated``: once no open incident predates the patch (``firebreak upgrade-check`` says so),
   the call becomes ``workflow.deprecate_patch(ID)`` and the old branch goes. A history recorded
   before the patch stops replaying here, so it retires with the patch: its line leaves
   ``tests/histories/SHA256SUMS``, the file goes, and :attr:`Patch.retired` says why.
3. ``removed``: once no open incident predates the deprecation either, the call goes too.

``tests/test_versions.py`` fails on a ``patched``/``deprecate_patch`` id in the workflow that is
not listed here, and on a recorded history whose patches this table does not account for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Stage = Literal["patched", "deprecated", "removed"]


@dataclass(frozen=True)
class Patch:
    id: str
    added: str  # the commit that introduced it
    why: str
    stage: Stage = "patched"
    # Recorded histories without this patch's marker. Deprecating it means showing that each still replays
    # (a run may never reach the patch's code) or retiring it with the patch.
    histories: tuple[str, ...] = ()
    retired: str = ""  # when deprecated: which histories retired, and why


# The recorded histories, by the commit that recorded them (tests/histories/).
_BEFORE_PATCHES = ("bad-deploy-resolved.json", "bad-deploy-resolved-852f4c8.json")
_ENDINGS_6461365 = tuple(f"ending-{name}-6461365.json" for name in (
    "auto_resolved", "expired-after-escalation", "failed-first-step", "failed-over-caps", "failed-undecided",
    "rejected", "resolved-two-steps", "rollback_failed", "rolled_back"))
_DEADLINE_6BAE36E = tuple(f"approval-{name}-6bae36e.json" for name in ("in-time-api", "in-time-signal", "late-expired"))
_WEDGE_6BAE36E = ("runbook-cannot-run-failed-6bae36e.json",)
_ALL = (*_BEFORE_PATCHES, *_ENDINGS_6461365, *_DEADLINE_6BAE36E, *_WEDGE_6BAE36E)

PATCHES: tuple[Patch, ...] = (
    Patch("lifecycle-v2", "2db0e59", "escalation, budgets, re-checks and patient retry policies",
          histories=_BEFORE_PATCHES),
    Patch("operator-console", "e2a0d87", "the phase search attribute, memo and current details the console reads",
          histories=_BEFORE_PATCHES),
    Patch("plan-binds-all", "2841723", "the plan hash binds every step's parameters and scope",
          histories=(*_BEFORE_PATCHES, "ending-failed-undecided-6461365.json")),
    Patch("correlation", "d7dfba8", "the catalog walk, failing-dependency hypotheses and blast radius",
          histories=(*_BEFORE_PATCHES, *_ENDINGS_6461365)),
    Patch("precheck-with-approval", "d7dfba8", "the alert re-read that an approval triggers before the first write",
          histories=_ALL),
    Patch("approval-in-time", "342c547", "an approval that arrived before the deadline counts after a worker outage",
          histories=(*_BEFORE_PATCHES, *_ENDINGS_6461365)),
    Patch("runbook-cannot-run", "342c547", "a runbook that cannot be evaluated fails its incident and escalates",
          histories=(*_BEFORE_PATCHES, *_ENDINGS_6461365, *_DEADLINE_6BAE36E)),
    Patch("broker-run-closed", "6c1fcbe", "the workflow tells the broker its run closed, so nothing more is minted for it",
          histories=_ALL),
    Patch("blast-radius-says-how-it-knows", "7c1302f",
          "a blast radius whose dependents were not read says so, and a missing traffic figure says why",
          histories=_ALL),
    Patch("rolled-back-while-firing-needs-a-human", "7c1302f",
          "a rollback that leaves the alert firing escalates and ends Failed, never green",
          histories=_ALL),
    Patch("payload-binding", "de678e2", "payloads bound to their workflow, run, message or activity are checked",
          histories=_ALL),
    Patch("signal-requester-receipt", "de678e2", "a requester named in a signal counts only with its own receipt",
          histories=_ALL),
)

# The oldest code whose open incidents this worker still replays: the first recorded history's.
OLDEST_SUPPORTED = "852f4c8"


def patch(patch_id: str) -> Patch:
    found = next((p for p in PATCHES if p.id == patch_id), None)
    if found is None:
        raise KeyError(f"no patch {patch_id!r} in workflows/versions.py")
    return found


def live() -> list[Patch]:
    """Patches whose old branch is still in the code: each keeps the open incidents that predate it running."""
    return [p for p in PATCHES if p.stage == "patched"]
