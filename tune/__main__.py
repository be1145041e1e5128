"""`python -m tune {run,report} ...`: Ray Tune search over core's trainer, and its report."""

import sys

from core.cli import dispatch

# Each module defines register(subparsers); see core/cli.py.
COMMANDS = ("tune.search", "tune.report")

if __name__ == "__main__":
    sys.exit(dispatch("python -m tune", __doc__, COMMANDS))
