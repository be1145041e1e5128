"""`python -m core {data,train,evaluate,predict} ...`: data preparation, training, evaluation, inference."""

import sys

from core.cli import dispatch

# Each module defines register(subparsers); see core/cli.py.
COMMANDS = ("core.data.cli", "core.training.cli", "core.evaluation.cli", "core.inference.cli")

if __name__ == "__main__":
    sys.exit(dispatch("python -m core", __doc__, COMMANDS))
