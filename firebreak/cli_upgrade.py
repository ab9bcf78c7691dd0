"""`firebreak upgrade-check`: may a patch be deprecated or removed? Which open incidents still need it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from firebreak.cli_common import Usage, client, settings_of


def register(sub: Any, common: argparse.ArgumentParser, run: Callable[[Any], Any]) -> None:
    p = sub.add_parser("upgrade-check", parents=[common],
                       help="open incidents that a worker without a patch could not replay (before an upgrade)")
    p.add_argument("--patch", action="append", default=None,
                   help="a patch id from workflows/versions.py (default: every live one); repeatable")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run(_upgrade_check))


async def _upgrade_check(args: argparse.Namespace) -> int:
    from firebreak.upgrades import check
    from workflows.versions import live, patch

    try:
        patches = [patch(p) for p in args.patch] if args.patch else live()
    except KeyError as exc:
        raise Usage(str(exc.args[0])) from None
    found = await check(await client(settings_of(args)), [p.id for p in patches])
    if args.json:
        print(json.dumps([{"patch": c.patch_id, "stage": patch(c.patch_id).stage, "safe_to_deprecate": c.safe_to_deprecate,
                           "open_incidents": c.blocking} for c in found], indent=2))
        return 0
    for c in found:
        if c.safe_to_deprecate:
            print(f"{c.patch_id}: no open incident predates it; it may move to deprecate_patch")
        else:
            shown = ", ".join(c.blocking[:10]) + (f" and {len(c.blocking) - 10} more" if len(c.blocking) > 10 else "")
            print(f"{c.patch_id}: {len(c.blocking)} open incident(s) still need its old branch: {shown}")
    return 0
