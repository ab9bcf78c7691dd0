"""The MCP tools an agent may be given, and what each does: `firebreak privileges` locks this list.

Kept apart from the server (no SDK import) so that the privileges report can read it. A new tool,
or one that starts writing, is a widening that `firebreak privileges diff` fails on until reviewed.
"""

from __future__ import annotations

from typing import Any

# name -> (kind, what it does, whether it writes to production). No tool writes: none approves, rejects,
# mints or thaws; a proposal opens an incident whose every write still needs people's signed approvals.
TOOLS: dict[str, tuple[str, str, bool]] = {
    "list_incidents": ("read", "incidents, as `firebreak list --json` shows them", False),
    "get_incident": ("read", "one incident's card, as `firebreak status ID --json`", False),
    "get_history": ("read", "one incident's history, as `firebreak history ID --json`", False),
    "privileges": ("read", "what this agent may do", False),
    "propose_remediation": ("propose", "opens an incident from a structured alert, as an alert source would; "
                                       "nothing runs without people's approvals", False),
}


def tools_report() -> list[dict[str, Any]]:
    return [{"name": name, "kind": kind, "does": does, "writes": writes}
            for name, (kind, does, writes) in sorted(TOOLS.items())]
