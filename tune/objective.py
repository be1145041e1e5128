"""What a trial reports and Tune selects on: the objective's key, finite values, why a trial stopped.

Its own module so that the trial function (``tune.trainable``) and its loggers (``tune.wandb_logging``)
both read it without importing each other.
"""

from __future__ import annotations

import math

from core.evaluation.metrics import MINIMISED

# Reported on every result; the leaderboard reads the last one to tell why a trial ended.
RUNNING, COMPLETED, PATIENCE, DIVERGED = "running", "completed", "patience", "diverged"
CHECKPOINT_DIR = "checkpoint"


def objective_key(metric: str) -> str:
    """The reported key Tune, ASHA and Optuna select on: the best epoch's value so far."""
    return f"best_{metric}"


def finite(metric: str, value: float) -> float:
    """NaN (an undefined metric) as the worst possible value, so ASHA and Optuna can rank it.

    Every selectable metric lies in [0, 1].
    """
    if value is None or not math.isfinite(value):
        return 1.0 if metric in MINIMISED else 0.0
    return float(value)
