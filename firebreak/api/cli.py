"""``firebreak api``: the subcommand the main CLI registers.

    firebreak api [--host 127.0.0.1] [--port 8340] [--max-body-bytes N] [--log-level info] [--state-dir DIR]

``settings_loader`` is :func:`firebreak.config.load_settings` (or anything with
its signature); it reads stack.json, the config file and the environment.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from firebreak.api.__main__ import add_arguments, run
from firebreak.config import Settings

SettingsLoader = Callable[[str | Path | None], Settings]


def register(subparsers: argparse._SubParsersAction, settings_loader: SettingsLoader) -> None:  # type: ignore[type-arg]
    """Add ``api`` to the main CLI; its handler is ``args.func(args) -> exit code``."""
    parser = subparsers.add_parser(
        "api", help="run the intake and read API", description="Run the Firebreak intake and read API."
    )
    add_arguments(parser)
    # SUPPRESS: do not overwrite a --state-dir given to the parent parser.
    parser.add_argument("--state-dir", default=argparse.SUPPRESS, help="Firebreak state directory")
    parser.set_defaults(func=lambda args: run(args, settings_loader(getattr(args, "state_dir", None))))
