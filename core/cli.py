"""The shared shape of `python -m core|tune|serve`: sub-command modules that register themselves."""

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


def add_predictor_arguments(parser: argparse.ArgumentParser) -> None:
    """--bundle, --device, --batch-size: what Predictor.from_args reads (core evaluate and core predict)."""
    # A string, not a Path: Path("s3://b/p") would collapse the "//" and lose the scheme.
    parser.add_argument("--bundle", required=True, type=str,
                        help="bundle directory (e.g. RUN/best) or s3://bucket/prefix (fetched once per node, checked)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")
