"""What every `firebreak` subcommand shares: exit codes, settings, output, reaching Temporal.

Exit codes: 0 success, 1 refused or failed, 2 bad usage. A command that needs the stack and finds
it down says so plainly, with what to run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydantic: loaded by the commands that read settings, not by `--version`
    from firebreak.config import Settings


class Refused(Exception):
    """An operation that was refused or failed: exit code 1."""


class Usage(Exception):
    """Bad usage that argparse cannot see (a bad alert file, a bad filter value): exit code 2."""


def settings_of(args: argparse.Namespace) -> Settings:
    from firebreak.config import load_settings

    return load_settings(getattr(args, "state_dir", None))


def out(*lines: str) -> None:
    print("\n".join(lines), flush=True)


def stack_value(settings: Settings, key: str) -> str | None:
    if settings.stack_file.exists():
        return json.loads(settings.stack_file.read_text()).get("demo", {}).get(key)
    return None


def temporal_down(settings: Settings) -> Refused:
    return Refused(f"no Temporal at {settings.temporal.address}: run `firebreak up` "
                   "(or point FIREBREAK_TEMPORAL_ADDRESS at your cluster)")


async def client(settings: Settings) -> Any:
    """A Temporal client, or a plain "the stack is down" refusal."""
    from firebreak.temporal import connect

    try:
        return await connect(settings.temporal)
    except RuntimeError as exc:  # the SDK's "Failed client connect: ..."
        if "connect" in str(exc).lower():
            raise temporal_down(settings) from None
        raise


def load_key(path: str | Path) -> Any:
    """An approver's Ed25519 private key, or one line saying what is wrong with the file (exit 2)."""
    from firebreak import signing

    try:
        return signing.load_private_key(path)
    except PermissionError as exc:  # ours says why and how to fix it; the OS's names the file
        raise Usage(str(exc) if str(path) in str(exc) else f"{path}: {exc.strerror or exc}") from None
    except FileNotFoundError:
        raise Usage(f"{path}: no such key file") from None
    except IsADirectoryError:
        raise Usage(f"{path}: is a directory, not a key file") from None
    except OSError as exc:
        raise Usage(f"{path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError):  # not PEM, a password-protected key, or not Ed25519
        raise Usage(f"{path}: not an unencrypted Ed25519 private key in PEM (make one with `firebreak keys new`)") \
            from None


def not_found(exc: BaseException) -> bool:
    from temporalio.service import RPCError, RPCStatusCode

    return isinstance(exc, RPCError) and exc.status == RPCStatusCode.NOT_FOUND


@contextmanager
def reading_incident(incident_id: str) -> Iterator[None]:
    """Reading an incident from Temporal: no worker, or no such incident, is a refusal that says so."""
    from firebreak.incidents import WorkerDown

    try:
        yield
    except WorkerDown as exc:
        raise Refused(str(exc)) from None
    except Exception as exc:
        if not_found(exc):
            raise Refused(f"no incident {incident_id!r}") from None
        raise
