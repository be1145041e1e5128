"""`python -m tune {run,report,ensemble,cv} ...`: Ray Tune search over core's trainer, its report, ensembles
of its best trials, patient-level cross-validation, and the study that ships a model."""

import sys

from core.cli import dispatch

# Each module defines register(subparsers); see core/cli.py.
COMMANDS = ("tune.search", "tune.report", "tune.ensemble", "tune.cv", "tune.study")

if __name__ == "__main__":
    sys.exit(dispatch("python -m tune", __doc__, COMMANDS))
