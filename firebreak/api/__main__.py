"""``python -m firebreak.api --host 127.0.0.1 --port 8340 --state-dir DIR``: run the API service."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from firebreak.api.settings import DEFAULT_HOST, DEFAULT_PORT, ApiSettings
from firebreak.config import Settings, load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--max-body-bytes", type=int, default=None, help="default 1 MiB")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace, settings: Settings) -> int:
    from firebreak.api.server import serve

    overrides: dict[str, object] = {"host": args.host, "port": args.port}
    if args.max_body_bytes:
        overrides["max_body_bytes"] = args.max_body_bytes
    serve(ApiSettings.from_settings(settings, **overrides), log_level=args.log_level)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firebreak.api", description="Run the Firebreak API.")
    add_arguments(parser)
    parser.add_argument("--state-dir", default=None, help="Firebreak state directory (default ~/.firebreak)")
    args = parser.parse_args(argv)
    return run(args, load_settings(args.state_dir))


if __name__ == "__main__":
    raise SystemExit(main())
