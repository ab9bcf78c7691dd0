"""``python -m firebreak.broker --host 127.0.0.1 --port 8350 --state-dir DIR``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from firebreak.broker.server import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m firebreak.broker", description="Firebreak credential broker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8350)
    parser.add_argument(
        "--state-dir", type=Path, default=Path(os.environ.get("FIREBREAK_STATE_DIR", Path.home() / ".firebreak"))
    )
    parser.add_argument("--roster", type=Path, default=None, help="default: STATE_DIR/roster.yaml")
    parser.add_argument("--runbooks-dir", type=Path, default=None, help="default: the shipped runbooks")
    parser.add_argument("--catalog-url", default=None,
                        help="the service catalog (Backstage API) the broker reads to check dependencies and "
                             "blast radius; without it, such writes are refused")
    args = parser.parse_args(argv)
    run(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        roster_path=args.roster,
        runbooks_dir=args.runbooks_dir,
        catalog_url=args.catalog_url,
    )


if __name__ == "__main__":
    main()
