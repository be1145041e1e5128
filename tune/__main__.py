"""`python -m tune {run,report,ensemble,cv} ...`: Ray Tune search over core's trainer, its report, ensembles
of its best trials, and patient-level cross-validation."""

import sys

from core.cli import dispatch

# Each module defines register(subparsers); see core/cli.py.
COMMANDS = ("tune.search", "tune.report", "tune.ensemble", "tune.cv")

if __name__ == "__main__":
    sys.exit(dispatch("python -m tune", __doc__, COMMANDS))
