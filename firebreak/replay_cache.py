"""The jtis a target has accepted, kept until each token expires: a token is good for one request.

In memory alone, a target that restarts would forget them and accept a replay of any token
still inside its lifetime (up to 15 minutes). With a ``path``, every jti is appended to a file
before the request it came with is served, and read back at start, so a restart forgets nothing
that still matters.

The file is JSON lines, ``["<jti>", <exp>]`` (``exp`` null: discarded), append-only, and rewritten (atomically) with only
the live entries once the dead ones outnumber them. Each append is flushed to the operating
system, which survives the target process crashing or restarting; surviving a power loss as well
would need an fsync per request, which a demo target does not pay for.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

# Prune the in-memory map once it holds this many entries (dead ones are dropped then).
PRUNE_AT = 1024


class ReplayCache:
    """jti -> exp; ``check_and_add`` is True the first time a jti is seen and False ever after,
    until ``exp + leeway`` has passed (the token is refused as expired by then anyway)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._path = Path(path) if path is not None else None
        self._file: IO[str] | None = None
        self._lines = 0  # lines in the file, live or dead: when to compact
        if self._path is not None:
            self._load(self._path)
            self._file = self._open_append(self._path)

    @property
    def path(self) -> Path | None:
        return self._path

    def check_and_add(self, jti: str, exp: float, now: float, leeway: float) -> bool:
        with self._lock:
            if len(self._seen) > PRUNE_AT:
                self._seen = {j: e for j, e in self._seen.items() if e + leeway >= now}
            if jti in self._seen and self._seen[jti] + leeway >= now:
                return False
            self._seen[jti] = exp
            # Written before the request is served: a crash after this line cannot let the token in twice.
            self._append(jti, exp)
            if self._file is not None and self._lines > 2 * len(self._seen) + PRUNE_AT:
                self._compact(now, leeway)
            return True

    def discard(self, jti: str) -> None:
        """Forget ``jti``: the request it came with was not served after all (a retry must go through)."""
        with self._lock:
            if self._seen.pop(jti, None) is not None and self._file is not None:
                self._file.write(json.dumps([jti, None]) + "\n")  # a tombstone, read back as "forgotten"
                self._file.flush()
                self._lines += 1

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    # -- the file ----------------------------------------------------------------

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        for line in text.splitlines():
            self._lines += 1
            try:
                jti, exp = json.loads(line)
                if exp is None:  # discarded: its request was never served
                    self._seen.pop(str(jti), None)
                    continue
                self._seen[str(jti)] = max(float(exp), self._seen.get(str(jti), float("-inf")))
            except (ValueError, TypeError):
                # A line cut short by a crash mid-write; its request was never served.
                continue
        log.info("replay cache %s: %d jtis read back", path, len(self._seen))

    @staticmethod
    def _open_append(path: Path) -> IO[str]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def _append(self, jti: str, exp: float) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps([jti, exp]) + "\n")
        self._file.flush()
        self._lines += 1

    def _compact(self, now: float, leeway: float) -> None:
        assert self._path is not None and self._file is not None
        self._seen = {j: e for j, e in self._seen.items() if e + leeway >= now}
        tmp = self._path.with_name(self._path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.writelines(json.dumps([j, e]) + "\n" for j, e in self._seen.items())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)
        self._file.close()
        self._file = self._open_append(self._path)
        self._lines = len(self._seen)
