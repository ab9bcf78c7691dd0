"""Typed substitution of validated parameters into queries, URLs and commands.

A template names parameters as ``{name}``. Each destination has its own
renderer that escapes the value for that destination; there is no generic
``str.format`` anywhere, so a label value can never become syntax.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from urllib.parse import quote

_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)?)\}")


class TemplateError(ValueError):
    """A template that cannot be rendered with the parameters given."""


def placeholders(template: str) -> set[str]:
    """Parameter names a template uses (``result.*`` names are filled after a step runs)."""
    return {name for name in _PLACEHOLDER.findall(template) if not name.startswith("result.")}


def _render(template: str, params: Mapping[str, object], escape: Callable[[str], str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in params:
            raise TemplateError(f"template uses {{{name}}} but no such parameter is set")
        return escape(str(params[name]))

    return _PLACEHOLDER.sub(substitute, template)


def promql_string(value: str) -> str:
    """Escape a value for use inside a double-quoted PromQL string literal."""
    out = []
    for ch in value:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def path_segment(value: str) -> str:
    """Escape a value as one URL path segment: '/', '?', '#', '..' cannot survive."""
    if value in ("", ".", ".."):
        raise TemplateError(f"{value!r} cannot be a path segment")
    return quote(value, safe="")


def render_promql(template: str, params: Mapping[str, object]) -> str:
    return _render(template, params, promql_string)


_PLAIN = re.compile(r"[A-Za-z0-9._:-]{1,200}")


def _plain(value: str) -> str:
    if not _PLAIN.fullmatch(value) or value in (".", ".."):
        raise TemplateError(f"{value!r} is not a plain name (letters, digits, '._:-')")
    return value


def render_plain(template: str, params: Mapping[str, object]) -> str:
    """For ids and resource names: a value is refused, not escaped, if it is not a plain name."""
    return _render(template, params, _plain)


def render_text(template: str, params: Mapping[str, object]) -> str:
    """For human-readable text only (titles, descriptions); never for a query or request."""
    return _render(template, params, str)
