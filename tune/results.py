"""From Tune's results to the run's products: leaderboard.csv, history.json and the best bundle.

The best bundle is exported from the best trial's last checkpoint, which carries the best epoch's
weights (Trainer keeps them), so nothing is trained again.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from ray.tune import Checkpoint, ResultGrid

from core.config import TrainConfig
from core.data.arrays import SplitArrays
from core.evaluation.metrics import METRIC_KEYS, MINIMISED, worst_value
from core.io import write_csv, write_json
from tune.objective import CHECKPOINT_DIR, COMPLETED, DIVERGED, PATIENCE, RUNNING, objective_key

log = logging.getLogger(__name__)

HISTORY_KEYS = ("epoch", "train_loss", "lr", "epoch_seconds", "epoch_cpu_seconds", *METRIC_KEYS)
STOP_REASONS = {
    COMPLETED: "completed",
    PATIENCE: "early-stopped by patience",
    DIVERGED: "diverged (non-finite loss)",
}


def stop_reason(last: dict[str, Any], error: Exception | None, scheduler: str) -> str:
    if error is not None:
        return f"error: {type(error).__name__}"
    status = last.get("stop_reason")
    if status is None:
        return "not started"
    if status == RUNNING:
        # A trial that ended mid-schedule without error was stopped by the scheduler.
        return f"early-stopped by {scheduler.upper() if scheduler == 'asha' else scheduler}"
    return STOP_REASONS.get(status, str(status))


def trial_history(result: Any) -> list[dict[str, float]]:
    """Per-epoch rows (one per epoch; a re-reported final epoch after a resume counts once).

    Tune's result files are written by the driver and copied to storage in the background, so a driver
    killed mid-copy can lose a trial's earlier lines; the trial's own checkpoint (written by its worker
    before each report returns) carries every epoch, and fills what the result files lack.
    """
    rows: dict[int, dict[str, float]] = {}
    frame = result.metrics_dataframe
    for record in [] if frame is None or "epoch" not in frame else frame.to_dict("records"):
        epoch = record.get("epoch")
        if epoch is None or (isinstance(epoch, float) and math.isnan(epoch)):
            continue
        rows[int(epoch)] = {k: _plain(record[k]) for k in HISTORY_KEYS if k in record}
    last = int((result.metrics or {}).get("epoch") or max(rows, default=0))
    if set(rows) != set(range(1, last + 1)):  # lines lost: read the checkpoint only then (one file per trial)
        for row in checkpoint_history(result.checkpoint):
            rows.setdefault(int(row["epoch"]), row)
    return [rows[e] for e in sorted(rows)]


def checkpoint_history(checkpoint: Checkpoint | None) -> list[dict[str, float]]:
    """The per-epoch rows a trial checkpoint's state.json holds (reads that one file; [] without one)."""
    from core.training.checkpoint import STATE  # lazily: torch loads only where a checkpoint is read

    if checkpoint is None:
        return []
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{CHECKPOINT_DIR}/{STATE}") as fh:
            history = json.loads(fh.read()).get("history", [])
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: no history in the trial checkpoint (%s)", checkpoint.path, exc)
        return []
    return [{k: _plain(row[k]) for k in HISTORY_KEYS if k in row} for row in history if "epoch" in row]


def collect(grid: ResultGrid, metric: str, scheduler: str) -> list[dict[str, Any]]:
    """One record per trial: id, config, history, best metrics, epochs run, stop reason, checkpoint."""
    key = objective_key(metric)
    trials = []
    for result in grid:
        last = dict(result.metrics or {})
        history = trial_history(result)
        best_epoch = int(last.get("best_epoch") or 0)
        best_row = next((r for r in history if r["epoch"] == best_epoch), {})
        trials.append({
            "trial_id": last.get("trial_id") or Path(result.path).name,
            "config": {k: _plain(v) for k, v in (result.config or {}).items()},
            "objective": last.get(key),
            "best_epoch": best_epoch,
            "epochs_run": int(last.get("epoch") or 0),
            "stop_reason": stop_reason(last, result.error, scheduler),
            "best": {k: best_row.get(k) for k in METRIC_KEYS},
            "history": history,
            "checkpoint": result.checkpoint,
            "path": result.path,
        })
    worst = worst_value(metric)
    sign = 1 if metric in MINIMISED else -1
    trials.sort(key=lambda t: sign * (t["objective"] if t["objective"] is not None else worst))
    for rank, trial in enumerate(trials, 1):
        trial["rank"] = rank
    return trials


def write_leaderboard(path: Path, trials: list[dict[str, Any]], searched: list[str]) -> None:
    """leaderboard.csv: rank, id, stop reason, epochs, objective, best-epoch metrics, then the config."""
    config_keys = list(searched) + sorted({k for t in trials for k in t["config"]} - set(searched))
    columns = ["rank", "trial_id", "stop_reason", "epochs_run", "best_epoch", "objective", *METRIC_KEYS, *config_keys]
    lines: list[dict[str, Any]] = []
    for t in trials:
        lines.append({
            **{k: t[k] for k in ("rank", "trial_id", "stop_reason", "epochs_run", "best_epoch", "objective")},
            **t["best"],
            **{k: t["config"].get(k) for k in config_keys},
        })
    write_csv(path, lines, columns)


def write_history(path: Path, trials: list[dict[str, Any]]) -> None:
    """history.json: each trial's config, stop reason and per-epoch metrics (for the report)."""
    keep = ("rank", "trial_id", "config", "objective", "best_epoch", "epochs_run", "stop_reason", "best", "history")
    write_json(path, [{k: t[k] for k in keep} for t in trials])


def read_leaderboard(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def export_trial(
    checkpoint_dir: Path, config: dict[str, Any], out: Path, train: SplitArrays, val: SplitArrays,
    info: dict[str, Any], name: str, extra_metrics: dict[str, Any] | None = None,
) -> Path:
    """A trial's bundle from one of its checkpoints (which carry the best epoch's weights so far)."""
    cfg = TrainConfig.from_dict(config)
    from core.training.trainer import Trainer  # here: `python -m tune report|--help` starts without torch

    # The driver may have no GPU (or share one with finishing trials): export on what it has.
    trainer = Trainer(cfg.replace(device="auto"), train, val, info)
    trainer.load_checkpoint(Path(checkpoint_dir) / CHECKPOINT_DIR)
    return trainer.export_bundle(out, name=name, extra_metrics=extra_metrics)


def export_best(
    trials: list[dict[str, Any]], out: Path, train: SplitArrays, val: SplitArrays, info: dict[str, Any], name: str,
) -> dict[str, Any] | None:
    """Export the best trial that has a checkpoint as a core bundle at ``out``; returns that trial."""
    for trial in trials:
        checkpoint = trial["checkpoint"]
        if checkpoint is None or trial["objective"] is None:
            continue
        with checkpoint.as_directory() as folder:
            export_trial(Path(folder), trial["config"], out, train, val, info, name, {"trial_id": trial["trial_id"]})
        log.info("best trial %s (%s=%.4f at epoch %d) -> %s", trial["trial_id"], trial["config"].get("metric"),
                 trial["objective"], trial["best_epoch"], out)
        return trial
    log.warning("no trial has a checkpoint; no best bundle written")
    return None


def _plain(value: Any) -> Any:
    """numpy scalars and NaN as JSON/CSV-friendly Python values."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

