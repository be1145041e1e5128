"""`python -m tune report runs/NAME`: report/index.html with PNG plots of a finished (or running) search.

Plots: optimisation history, parameter importances and parallel coordinates (Optuna's matplotlib
visualisations of the study in optuna.db), learning curves of the top trials, and the best and worst
validation slices of the best bundle (overlays of truth and prediction).
"""

from __future__ import annotations

import argparse
import functools
import html
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and in trials
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from core.config import add_command, from_args, meta  # noqa: E402
from core.data.arrays import SplitArrays, load_split  # noqa: E402
from core.evaluation.metrics import per_slice_dice  # noqa: E402
from core.formats.codecs import overlay  # noqa: E402
from core.io import read_json  # noqa: E402
from tune.results import read_leaderboard  # noqa: E402
from tune.storage import DRIVER_FILES, STUDY_DB, RunStorage  # noqa: E402

log = logging.getLogger(__name__)
TOP_CURVES = 5
PANEL_SLICES = 4


def make_report(run: str, data: str | Path | None = None) -> Path:
    """Write ``run/report/``; returns the local path of index.html (uploaded too for S3 runs)."""
    storage = RunStorage.from_run_path(run)
    storage.pull(*DRIVER_FILES, "best")
    local = storage.local
    if not (local / "run.json").is_file():
        raise FileNotFoundError(f"{storage.uri}/run.json: missing; is {run} a `python -m tune run` directory?")
    info = read_json(local / "run.json")
    out = local / "report"
    out.mkdir(parents=True, exist_ok=True)
    history = read_json(local / "history.json") if (local / "history.json").is_file() else []
    study = _load_study(local / STUDY_DB, info["name"])
    figures: list[tuple[str, str, Callable[[], plt.Figure]]] = [
        ("optimisation_history.png", "Optimisation history", lambda: _optuna_plot("plot_optimization_history", study)),
        ("param_importances.png", "Parameter importances", lambda: _optuna_plot("plot_param_importances", study)),
        ("parallel_coordinates.png", "Parallel coordinates",
         lambda: _optuna_plot("plot_parallel_coordinate", study)),
        ("learning_curves.png", "Learning curves (top trials)", lambda: learning_curves(history, info["metric"])),
    ]
    data_dir = Path(data) if data else Path(info["data"])
    if (local / "best" / "config.json").is_file():
        preds = functools.cache(lambda: ValPredictions.of(local / "best", data_dir))
        figures += [
            ("best_predictions.png", "Best validation slices (best trial)",
             lambda: prediction_panel(preds(), best=True)),
            ("worst_predictions.png", "Worst validation slices (best trial)",
             lambda: prediction_panel(preds(), best=False)),
        ]
    written = []
    for filename, title, make in figures:
        try:
            fig = make()
        except Exception as exc:  # one plot failing (too few trials, missing data) must not lose the rest
            log.warning("%s: %s", filename, exc)
            fig = _message(f"{title}: not available ({exc})")
        fig.savefig(out / filename, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append((filename, title))
    index = out / "index.html"
    leaderboard = read_leaderboard(local / "leaderboard.csv") if (local / "leaderboard.csv").is_file() else []
    index.write_text(_html(info, written, leaderboard))
    storage.push("report")
    log.info("report: %s", f"{storage.uri}/report/index.html")
    return index


def _load_study(path: Path, name: str) -> Any:
    import optuna

    if not path.is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path}")


def _optuna_plot(name: str, study: Any) -> plt.Figure:
    import optuna

    if study is None:
        raise FileNotFoundError("no optuna.db")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        result = getattr(optuna.visualization.matplotlib, name)(study)
    ax = result.flat[0] if isinstance(result, np.ndarray) else result
    fig = ax.figure
    fig.set_size_inches(9, 5)
    return fig


def learning_curves(history: list[dict[str, Any]], metric: str) -> plt.Figure:
    """Validation metric and train loss per epoch: the top trials in colour, the rest in grey."""
    if not history:
        raise ValueError("no trial history")
    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    ranked = sorted(history, key=lambda t: t["rank"])
    for trial in reversed(ranked):  # top trials drawn last, on top
        rows = trial["history"]
        if not rows:
            continue
        top = trial["rank"] <= TOP_CURVES
        epochs = [r["epoch"] for r in rows]
        style: dict[str, Any] = {"lw": 1.8} if top else {"color": "0.75", "lw": 0.8}
        label = f"#{trial['rank']} {trial['trial_id']} ({trial['stop_reason']})" if top else None
        ax_metric.plot(epochs, [r.get(metric) for r in rows], marker="o", ms=3, label=label, **style)
        ax_loss.plot(epochs, [r.get("train_loss") for r in rows], marker="o", ms=3, **style)
    ax_metric.set(xlabel="epoch", ylabel=f"val {metric}", title=f"val {metric} (grey: other trials)")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="train loss")
    ax_metric.legend(fontsize=7)
    return fig


@dataclass
class ValPredictions:
    """The best bundle's val predictions, ranked by slice Dice (worst first); one prediction pass serves
    both panels."""

    val: SplitArrays
    pred: np.ndarray
    dice: np.ndarray
    ranked: np.ndarray

    @classmethod
    def of(cls, bundle: Path, data: Path) -> ValPredictions:
        """Only slices where truth or prediction has foreground are ranked: empty/empty ones are trivially 1."""
        from core.evaluation.evaluate import predict_split
        from core.inference.predictor import Predictor

        val = load_split(data, "val")
        pred = predict_split(Predictor.from_bundle(bundle, device="cpu"), val)  # volumes, as served
        truth = np.asarray(val.masks)
        dice = per_slice_dice(pred, truth)
        candidates = np.flatnonzero(val.tumour | (pred.reshape(len(pred), -1).max(1) > 0))
        if not len(candidates):
            raise ValueError("no validation slice has tumour in truth or prediction")
        return cls(val, pred, dice, candidates[np.argsort(dice[candidates], kind="stable")])


def prediction_panel(preds: ValPredictions, best: bool, count: int = PANEL_SLICES) -> plt.Figure:
    """The ``count`` val slices with the highest (or lowest) Dice under the best bundle."""
    val, pred, dice = preds.val, preds.pred, preds.dice
    chosen = preds.ranked[::-1][:count] if best else preds.ranked[:count]
    fig, axes = plt.subplots(len(chosen), 3, figsize=(9, 3 * len(chosen)), squeeze=False)
    for row, i in zip(axes, chosen, strict=True):
        image = np.ascontiguousarray(val.images[i].transpose(1, 2, 0))
        panels = [(image, f"{val.patients[i]} #{int(val.slices[i])}: image"), (overlay(image, val.masks[i]), "truth"),
                  (overlay(image, pred[i]), f"prediction (Dice {dice[i]:.3f})")]
        for ax, (img, title) in zip(row, panels, strict=True):
            ax.imshow(img)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return fig


def _message(text: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 1.5))
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    ax.axis("off")
    return fig


def _html(info: dict[str, Any], figures: list[tuple[str, str]], leaderboard: list[dict[str, str]]) -> str:
    esc = html.escape
    best = info.get("best_trial") or {}
    summary = {
        "run": info.get("storage", ""), "status": info.get("status", ""), "trials": info.get("trials", ""),
        "objective": f"{info.get('objective')} ({info.get('mode')})", "stop reasons": info.get("stop_reasons", ""),
        "best trial": f"{best.get('trial_id', '-')}: {best.get('objective', '-')} "
                      f"at epoch {best.get('best_epoch', '-')}",
        "space": info.get("space", ""), "constants": info.get("constants", ""),
    }
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in summary.items())
    images = "".join(f"<h2>{esc(t)}</h2><img src='{esc(f)}' alt='{esc(t)}'>" for f, t in figures)
    table = ""
    if leaderboard:
        cols = list(leaderboard[0])
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{esc(_short(r[c]))}</td>" for c in cols) + "</tr>" for r in leaderboard)
        table = f"<h2>Leaderboard</h2><table class='lb'><tr>{head}</tr>{body}</table>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>gliomaseg tune: {esc(str(info.get('name')))}</title><style>"
        "body{font-family:sans-serif;margin:2em} img{max-width:100%;border:1px solid #ddd}"
        "table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
        f"</style></head><body><h1>Search {esc(str(info.get('name')))}</h1><table>{rows}</table>"
        f"{images}{table}</body></html>\n"
    )


def _short(value: str) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return value if number.is_integer() else f"{number:.4g}"


@dataclass
class ReportOptions:
    """The `tune report` options."""

    run: str = field(metadata=meta("run directory (runs/NAME) or s3://bucket/prefix/NAME", positional=True))
    data: Path | None = field(default=None, metadata=meta("prepared directory (default: the one the run used)"))


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "report", report_command, ReportOptions, help="HTML report with plots of a search",
                description=__doc__)


def report_command(args: argparse.Namespace) -> int:
    opts = from_args(args, ReportOptions)
    index = make_report(opts.run, opts.data)
    print(f"report: {index}")
    return 0
