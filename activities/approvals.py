"""Signature checks of approvals against the roster: crypto stays out of workflow code."""

from __future__ import annotations

from pathlib import Path

from temporalio import activity

from activities.deps import ActivityDeps
from firebreak.contracts import Approval, ApprovalCheck
from firebreak.roster import Roster
from firebreak.signing import verify_approval


class ApprovalActivities:
    def __init__(self, deps: ActivityDeps) -> None:
        self.deps = deps
        self._roster: tuple[float, Roster] | None = None

    def roster(self) -> Roster:
        """Reloaded when the file changes, so a roster edit needs no worker restart."""
        path = Path(self.deps.settings.resolved_roster())
        mtime = path.stat().st_mtime
        if self._roster is None or self._roster[0] != mtime:
            self._roster = (mtime, Roster.load(path))
        return self._roster[1]

    @activity.defn(name="verify_approval")
    async def verify_approval(self, approval: Approval) -> ApprovalCheck:
        try:
            roster = self.roster()
        except FileNotFoundError:
            return ApprovalCheck(valid=False, reason="no roster is configured: nobody can approve")
        return verify_approval(approval, roster)
