"""How a resource name becomes a URL on an HTTP target: escaped path segments only."""

from __future__ import annotations

import httpx

from firebreak.escaping import TemplateError, path_segment


def resource_url(base: str, resource: str, *suffix: str) -> str:
    """``service/checkout`` on ``http://fleet`` -> ``http://fleet/services/checkout[/suffix]``."""
    kind, sep, name = resource.partition("/")
    if not sep or not kind.isidentifier():
        raise TemplateError(f"resource {resource!r} is not KIND/NAME")
    parts = [f"{kind}s", name, *suffix]
    return base.rstrip("/") + "/" + "/".join(path_segment(p) for p in parts)


def reason(response: httpx.Response) -> str:
    """The target's own short reason for an error answer, if it gave one."""
    try:
        body = response.json()
        return str(body.get("reason") or body.get("error") or "")[:200]
    except (ValueError, AttributeError):
        return ""
