"""The shared shape of `python -m core|tune|serve`: sub-command modules that register themselves.

The top of core's stack: only the ``__main__`` modules import it, and it imports the commands by name.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence


def dispatch(prog: str, description: str, modules: Sequence[str], argv: list[str] | None = None) -> int:
    """Build the parser from ``modules`` (each defines ``register(subparsers)`` setting ``func``) and run.

    ValueError / FileNotFoundError / FileExistsError are the user's to fix: one ``error:`` line, exit 2.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in modules:
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
