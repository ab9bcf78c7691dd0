"""Plain-text tables the way `kubectl get` and `temporal workflow list` print them. Pure.

Upper-case headers, columns padded to their widest cell, three spaces between columns, nothing
drawn: easy to read, and easy to cut with awk.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h).upper() for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    # The last column is not padded: no trailing spaces, and a long "waiting for" can run on.
    return "\n".join("   ".join(cell.ljust(widths[i]) if i < len(headers) - 1 else cell
                                for i, cell in enumerate(row)).rstrip() for row in cells)


def age(since: datetime | None, now: datetime) -> str:
    """kubectl's AGE: the largest unit or two, e.g. 45s, 12m, 3h5m, 2d4h."""
    if since is None:
        return "?"
    seconds = max(0, int((now - since) / timedelta(seconds=1)))
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes}m" if minutes and hours < 10 else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if hours and days < 10 else f"{days}d"
