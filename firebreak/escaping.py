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


# -- markdown shown to people (the Temporal UI's details, the incident card, tickets) -------------
#
# Values from alerts (annotations, labels) and from the systems an incident reads are untrusted: in
# markdown they could become raw HTML or a link (``<a href="javascript:…">``, ``[x](javascript:…)``,
# ``<javascript:…>``). Every such value is escaped so a CommonMark renderer shows it as the same text,
# inert: no tag, no link, no image, no code span broken out of. Emphasis characters are escaped too,
# so what is shown is what was sent.

# CommonMark lets any ASCII punctuation be backslash-escaped. These are the ones that open raw HTML
# (<), entities (&), links and images ([ ]), code spans (`), emphasis (* ~) and escapes themselves.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*<>\[\]&~])")
# An underscore opens emphasis only at a word edge (CommonMark: never inside a word like error_rate).
_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
# A dash before another dash: the Temporal UI's renderer turns "--" into an en dash, so a command in text
# (`firebreak alert --sample x`) would copy as one that fails. Escaped, it renders as the same ASCII.
_DOUBLE_DASH = re.compile(r"-(?=-)")


def markdown_text(value: object) -> str:
    """``value`` as inert markdown text: it renders as the same characters, never as HTML or a link."""
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", str(value))
    text = _DOUBLE_DASH.sub(r"\\-", text)
    return _EDGE_UNDERSCORE.sub(r"\\_", text)


def markdown_code(value: object) -> str:
    """``value`` as one inline code span (CommonMark: a fence longer than any backtick run inside).

    Inside a code span nothing is HTML or a link; the only way out is a backtick run as long as the
    fence, which the fence's length rules out. Line breaks become spaces (a code span is one line).
    """
    text = " ".join(str(value).splitlines()) or " "
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or (text.startswith(" ") and text.endswith(" ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"
