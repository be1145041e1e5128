"""Optional Weights & Biases logging from inside a trial (as the earlier study's prediction logger did).

Each trial is one W&B run (id = trial id, group = experiment) with its config and per-epoch metrics;
whenever the trial's selection metric improves, a panel of validation slices with predicted and true
masks is logged as ``wandb.Image(..., masks=...)``. wandb is imported only here, only when asked for.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from core.config import TrainConfig
from core.data.arrays import SplitArrays
from core.training.trainer import EpochResult, Trainer
from tune.objective import objective_key

PANEL_SLICES = 6


def wandb_mode() -> str:
    """WANDB_MODE when set; otherwise online with an API key and offline without one."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_settings(project: str, group: str, directory: str | None = None) -> dict[str, Any]:
    """What the driver hands each trial (picklable, no secrets): project, group, mode, directory."""
    return {"project": project, "group": group, "mode": wandb_mode(), "directory": directory}


def panel_rows(val: SplitArrays, count: int = PANEL_SLICES) -> np.ndarray:
    """Fixed val slices for the panel: mostly tumour slices (largest lesions first), one empty one."""
    areas = val.masks.reshape(len(val), -1).astype(bool).sum(1)
    tumour = np.argsort(-areas)[: max(1, count - 1)]
    tumour = tumour[areas[tumour] > 0]
    empty = np.flatnonzero(areas == 0)[:1]
    rows = np.concatenate([tumour, empty]) if len(tumour) + len(empty) else np.arange(min(count, len(val)))
    return np.sort(rows.astype(int))


class TrialWandb:
    """One trial's W&B run."""

    def __init__(
        self, cfg: TrainConfig, val: SplitArrays, project: str, group: str, mode: str, directory: str | None = None
    ) -> None:
        import wandb
        from ray import tune

        self.wandb = wandb
        ctx = tune.get_context()
        trial_id = ctx.get_trial_id() or "trial"
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(
            project=project, group=group, name=ctx.get_trial_name() or trial_id, id=trial_id,
            config=cfg.to_dict(), mode=mode, dir=directory, resume="allow", reinit="finish_previous",
        )
        self.rows = panel_rows(val)
        self.images = np.ascontiguousarray(val.images[self.rows].transpose(0, 2, 3, 1))
        self.truth = np.asarray(val.masks[self.rows])
        self.patients = np.asarray(val.patients)[self.rows].astype(str)
        self.slices = np.asarray(val.slices)[self.rows]

    def log_epoch(self, result: EpochResult, trainer: Trainer) -> None:
        data: dict[str, Any] = {**result.metrics, "epoch": result.epoch}
        data[objective_key(trainer.cfg.metric)] = trainer.best_metric
        if trainer.best_epoch == result.epoch:  # this epoch is a new best (epochs only go forward)
            data["val_predictions"] = self.panel(trainer)
        self.run.log(data, step=result.epoch)

    def panel(self, trainer: Trainer) -> list[Any]:
        # the masks validate() just made for this epoch's metrics; predict only if there are none
        pred = (trainer.val_pred if trainer.val_pred is not None else trainer.predict_val())[self.rows]
        labels = {i: name for i, name in enumerate(trainer.class_names)}
        return [
            self.wandb.Image(
                image,
                caption=f"{patient} slice {int(slc)} (epoch {trainer.epoch})",
                masks={
                    "prediction": {"mask_data": p.astype(np.uint8), "class_labels": labels},
                    "ground_truth": {"mask_data": t.astype(np.uint8), "class_labels": labels},
                },
            )
            for image, p, t, patient, slc in zip(self.images, pred, self.truth, self.patients, self.slices, strict=True)
        ]

    def finish(self) -> None:
        self.run.finish()
        # Stop W&B's service process now: Ray ends idle workers abruptly, and a service torn down at
        # interpreter exit then prints a "connection lost" traceback.
        teardown = getattr(self.wandb, "teardown", None)
        if teardown is not None:
            teardown()
