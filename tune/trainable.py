"""The trial function: one core Trainer per trial, reporting and checkpointing every epoch.

The data arrives through ``tune.with_parameters`` (one object-store copy per node, read zero-copy by
every trial there) and the Trainer copies it to the trial's device once. A trial restarted by
FailureConfig, or resumed with ``--resume``, loads its last checkpoint and continues at the next epoch.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune

from core.config import TrainConfig
from core.data.arrays import SplitArrays
from tune.objective import CHECKPOINT_DIR, COMPLETED, DIVERGED, PATIENCE, RUNNING, finite, objective_key

if TYPE_CHECKING:
    from core.training.trainer import EpochResult, Trainer

def trial_result(trainer: Trainer, metrics: dict[str, float], status: str) -> dict[str, Any]:
    metric = trainer.cfg.metric
    out: dict[str, Any] = {k: float(v) for k, v in metrics.items() if k != "epoch"}
    out[metric] = finite(metric, metrics.get(metric, float("nan")))
    out.update(
        epoch=trainer.epoch,
        best_epoch=trainer.best_epoch,
        stop_reason=status,
    )
    out[objective_key(metric)] = finite(metric, trainer.best_metric)
    return out


def epoch_status(trainer: Trainer) -> str:
    """What ``fit`` will do after this epoch: go on, or stop (and why) — the Trainer's own rule."""
    return {"completed": COMPLETED, "patience": PATIENCE}.get(trainer.stop_reason() or "", RUNNING)


def train_trial(
    config: dict[str, Any],
    train: SplitArrays,
    val: SplitArrays,
    split_info: dict[str, Any],
    wandb: dict[str, Any] | None = None,
) -> None:
    """Train one configuration; Tune passes ``config``, with_parameters the rest."""
    # Ray logs every persisted checkpoint at INFO; one per epoch per trial drowns the driver's output.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    from core.training.trainer import Trainer  # here: the tune commands that train nothing start without torch

    cfg = TrainConfig.from_dict(config)
    trainer = Trainer(cfg, train, val, split_info)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_checkpoint(Path(folder) / CHECKPOINT_DIR)
        status = epoch_status(trainer)
        if status != RUNNING and trainer.history:
            # Finished before the driver last saved its state: report the end again, train nothing.
            tune.report(trial_result(trainer, trainer.history[-1], status))
            return
    logger = None
    if wandb:
        from tune.wandb_logging import TrialWandb  # lazily: W&B is optional

        logger = TrialWandb(cfg, val, **wandb)

    def on_epoch(result: EpochResult, tr: Trainer) -> None:
        status = epoch_status(tr)
        if logger is not None:
            logger.log_epoch(result, tr)
        with tempfile.TemporaryDirectory() as tmp:
            tr.save_checkpoint(Path(tmp) / CHECKPOINT_DIR)
            # report() persists the checkpoint to storage before it returns, so tmp may go after it.
            tune.report(trial_result(tr, result.metrics, status), checkpoint=tune.Checkpoint.from_directory(tmp))

    try:
        trainer.fit(on_epoch)
    except FloatingPointError:
        # A diverged configuration (a large lr) fails the same way on every retry: end it here with
        # the best epoch it reached rather than burning FailureConfig retries on it.
        tune.report(trial_result(trainer, trainer.history[-1] if trainer.history else {}, DIVERGED))
    finally:
        if logger is not None:
            logger.finish()
