"""Every runbook version the broker ever loaded, kept so that open incidents can finish on theirs.

An incident's plan pins its runbook by name and version. Deploying ``bad-deploy`` v2 and restarting the
broker must not strand the incidents that are still executing, or rolling back, on v1: their writes and
undos are re-derived from v1, the version their approvers signed. So each time the broker loads a runbook
directory it copies every runbook into a content-addressed archive::

    STATE_DIR/broker/runbooks/NAME/vVERSION-SHA256[:16].yaml     (written once, 0600, never rewritten)

and looks plans up by ``(plan.runbook, plan.runbook_version)``. A version the broker never loaded is
refused, naming it. A file whose bytes no longer hash to its name is ignored, with a warning: the broker
derives nothing from a copy it cannot trust. Editing a runbook without bumping its version keeps both
contents under that version; a plan must fit one of them exactly (``check_plan``), the current one first.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from firebreak.contracts import Plan
from firebreak.plan import check_plan
from firebreak.runbook import Runbook, RunbookError, load_runbooks, parse_runbook

log = logging.getLogger(__name__)


def _digest(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()[:16]


def _archive_name(book: Runbook, text: bytes) -> str:
    return f"v{book.version}-{_digest(text)}.yaml"


def _write_once(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` atomically; an existing file (same name, same bytes) is left alone."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


@dataclass
class RunbookArchive:
    """The current runbooks (from the configured directory) and every archived version."""

    current: dict[str, Runbook]
    # (name, version) -> the contents known under it, the current one first
    versions: dict[tuple[str, int], list[Runbook]] = field(default_factory=dict)

    @classmethod
    def load(cls, source_dir: Path, archive_dir: Path) -> RunbookArchive:
        books = load_runbooks(source_dir)  # strict, no duplicate names: a broken directory stops the broker
        for path in sorted(source_dir.glob("*.yaml")):
            text = path.read_bytes()
            book = parse_runbook(text.decode("utf-8"), str(path))
            _write_once(archive_dir / book.name / _archive_name(book, text), text)
        archive = cls(current={b.name: b for b in books})
        for book in books:
            archive.versions[(book.name, book.version)] = [book]
        for path in sorted(archive_dir.glob("*/v*.yaml")):
            archive._add_archived(path)
        return archive

    def _add_archived(self, path: Path) -> None:
        text = path.read_bytes()
        if not path.name.endswith(f"-{_digest(text)}.yaml"):
            log.warning("ignoring archived runbook %s: its content does not match its name", path)
            return
        try:
            book = parse_runbook(text.decode("utf-8"), str(path))
        except (RunbookError, UnicodeDecodeError) as exc:
            log.warning("ignoring archived runbook %s: %s", path, exc)
            return
        if path.parent.name != book.name or not path.name.startswith(f"v{book.version}-"):
            log.warning("ignoring archived runbook %s: it holds %s v%s", path, book.name, book.version)
            return
        known = self.versions.setdefault((book.name, book.version), [])
        if book not in known:
            known.append(book)

    def known_versions(self, name: str) -> list[int]:
        return sorted({version for (book, version) in self.versions if book == name})

    def all_versions(self, name: str) -> list[Runbook]:
        """Every kept content of ``name``: the current one first, then the newest versions first."""
        ordered = sorted((key for key in self.versions if key[0] == name), key=lambda key: -key[1])
        books = [book for key in ordered for book in self.versions[key]]
        current = self.current.get(name)
        return ([current] if current else []) + [book for book in books if book is not current]

    def pinned(self, name: str, version: int) -> list[Runbook]:
        """The contents of ``name`` v``version``, current first; raises LookupError if never loaded."""
        books = self.versions.get((name, version))
        if not books:
            known = self.known_versions(name)
            has = f"it has v{', v'.join(map(str, known))}" if known else "it has no runbook of that name"
            raise LookupError(f"runbook {name!r} v{version} is unknown to the broker ({has})")
        return list(books)

    def for_plan(self, plan: Plan) -> Runbook:
        """The kept content of the plan's pinned version that derives this plan, the current one first;
        if none does, the first, so that the refusal names the field that differs. LookupError if the
        broker never had that version."""
        books = self.pinned(plan.runbook, plan.runbook_version)
        for book in books:
            try:
                check_plan(plan, book)
            except ValueError:
                continue
            return book
        return books[0]
