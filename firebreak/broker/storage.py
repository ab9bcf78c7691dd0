"""Checked writes for the broker's files: a short or failed write is an error, never silently half-done.

``os.write`` may write fewer bytes than asked (a full disk writes what fits, then refuses the rest), and
a file whose last line is cut short would swallow the next line appended to it. Every writer of the
broker's append-only files goes through :func:`append_line` / :func:`write_all`, which write the whole
buffer or raise :class:`StorageError`, saying how far they got.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class StorageError(OSError):
    """A write, fsync or truncate of a broker file failed. ``written`` bytes of the buffer reached the file."""

    def __init__(self, path: Path, what: str, cause: OSError | None, *, written: int = 0, wanted: int = 0) -> None:
        code = cause.errno if cause is not None and cause.errno is not None else errno.EIO
        why = os.strerror(code) if cause is None or not cause.strerror else cause.strerror
        super().__init__(code, f"{what} {path}: {why}" + (f" ({written} of {wanted} bytes written)" if wanted else ""))
        self.path, self.what, self.written, self.wanted = path, what, written, wanted

    @property
    def why(self) -> str:
        """errno name and text, e.g. "ENOSPC: No space left on device"."""
        return f"{errno.errorcode.get(self.errno or 0, 'EIO')}: {os.strerror(self.errno or errno.EIO)}"


def write_all(fd: int, data: bytes, path: Path) -> None:
    """Write every byte (retrying a short write for the rest), or raise saying how many reached the file."""
    view = memoryview(data)
    written = 0
    while written < len(data):
        try:
            n = os.write(fd, view[written:])
        except OSError as exc:
            raise StorageError(path, "write to", exc, written=written, wanted=len(data)) from exc
        if n <= 0:  # never seen on a regular file, but a loop that cannot advance must not spin
            raise StorageError(path, "write to", None, written=written, wanted=len(data))
        written += n


def fsync_fd(fd: int, path: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise StorageError(path, "fsync of", exc) from exc


def fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise StorageError(path, "open for fsync of", exc) from exc
    try:
        fsync_fd(fd, path)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """A new or renamed file's name is durable only once its directory is fsynced."""
    fsync_path(directory)


def truncate(path: Path, size: int) -> None:
    try:
        os.truncate(path, size)
    except OSError as exc:
        raise StorageError(path, "truncate of", exc) from exc


def append_bytes(path: Path, data: bytes, *, fsync: bool) -> int:
    """Append ``data`` whole at the end of ``path`` (0600 if created); return the file's size before it.

    On a short or failed write, the bytes that did reach the file are cut off again (best effort; the
    caller's repair at start covers a truncate that fails too) and :class:`StorageError` is raised.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        raise StorageError(path, "open for append of", exc) from exc
    try:
        start = os.fstat(fd).st_size
        try:
            write_all(fd, data, path)
            if fsync:
                fsync_fd(fd, path)
        except StorageError as exc:
            if exc.written:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass  # the torn tail stays; whoever reads the file next cuts it (see the callers)
            raise
        return start
    finally:
        os.close(fd)
