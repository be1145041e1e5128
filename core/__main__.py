"""`python -m core {data,train,evaluate,predict} ...`: each stage registers its own sub-command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Sub-command modules; each defines ``register(subparsers)`` that adds its parser with ``func`` set.
COMMANDS = ("core.data.cli", "core.train", "core.evaluate", "core.predict")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
