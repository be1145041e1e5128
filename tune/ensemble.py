"""`python -m tune ensemble runs/NAME --top K [--out DIR]`: one bundle from a search's K best trials.

Each member is the trial's best epoch (its last checkpoint carries those weights), exported as a bundle
under ``runs/NAME/members/<trial>``; the ensemble averages their probabilities, each at its own input
size, with threshold, TTA and post-processing chosen on val for the ensemble as a whole
(core.training.ensemble). ``runs/NAME/ensemble.json`` compares it with the best single trial: both
were selected on the same val split, so neither figure is an unbiased estimate.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import add_command, from_args, meta
from core.data.arrays import load_split, load_split_info
from core.evaluation.metrics import METRIC_KEYS
from core.io import read_json, write_json
from core.training.ensemble import build_ensemble_bundle
from tune.results import export_trial

log = logging.getLogger(__name__)


def latest_checkpoint(trial_dir: Path) -> Path | None:
    """The trial's newest kept checkpoint: its best-epoch weights are the best the trial reached."""
    found = sorted(trial_dir.glob("checkpoint_*"), key=lambda p: p.name)
    return found[-1] if found else None


def ranked_trials(run_dir: Path) -> list[dict[str, Any]]:
    """Trials with a result, best first (history.json is written in leaderboard order)."""
    path = run_dir / "history.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the search has not finished (tune run --resume completes it)")
    return [t for t in read_json(path) if t.get("objective") is not None]


def build_run_ensemble(
    run_dir: str | Path, top: int, out: str | Path | None = None, data: str | Path | None = None,
    half: bool = False,
) -> dict[str, Any]:
    """Build the top-``top`` ensemble of a finished local run; returns the comparison in ensemble.json."""
    run_dir = Path(run_dir)
    if top < 2:
        raise ValueError(f"--top {top}: an ensemble needs at least 2 members")
    info = read_json(run_dir / "run.json")
    if str(info.get("storage", "")).startswith("s3://"):
        raise ValueError(f"{info['storage']}: build ensembles from a local copy of the run (aws s3 sync it first)")
    prepared = Path(data or info["data"])
    split_info = load_split_info(prepared)
    train, val = load_split(prepared, "train", mmap=False), load_split(prepared, "val", mmap=False)
    members, sources = [], []
    for trial in ranked_trials(run_dir):
        if len(members) == top:
            break
        checkpoint = latest_checkpoint(run_dir / "ray" / f"trial_{trial['trial_id']}")
        if checkpoint is None:
            log.warning("trial %s has no checkpoint; skipped", trial["trial_id"])
            continue
        bundle = run_dir / "members" / trial["trial_id"]
        if not (bundle / "config.json").is_file():
            export_trial(checkpoint, trial["config"], bundle, train, val, split_info, f"{info['name']}-member",
                         {"trial_id": trial["trial_id"]})
        members.append(bundle)
        sources.append(f"trial {trial['trial_id']} (rank {trial['rank']})")
    if len(members) < top:
        raise ValueError(f"{run_dir}: only {len(members)} trial(s) with checkpoints; --top {top} needs {top}")
    out = Path(out) if out else run_dir / "ensemble"
    class_names = list(split_info.get("class_names") or ["background", "tumour"])
    build_ensemble_bundle(members, val, class_names, out, name=f"{info['name']}-ensemble", sources=sources,
                          half=half, extra_metrics={"run": info["name"], "top": top})
    ensemble = read_json(out / "metrics.json")
    best_single = read_json(members[0] / "metrics.json")
    comparison = {
        "ensemble": {"bundle": str(out), "top": top, "val": _pick(ensemble["val"]), "tta": ensemble["tta"],
                     "postprocess": ensemble["postprocess"], "threshold": read_json(out / "config.json")["threshold"]},
        "best_single": {"bundle": str(members[0]), "source": sources[0], "val": _pick(best_single["val"]),
                        "tta": best_single.get("tta"), "postprocess": best_single.get("postprocess")},
        "members": [{"source": s, "val": _pick(read_json(m / "metrics.json")["val"])} for s, m in zip(sources, members,
                                                                                                     strict=True)],
        "selection": "the members, the best single trial and every inference setting were selected on this val "
                     "split: the comparison is fair between them, and both figures are optimistic",
    }
    write_json(run_dir / "ensemble.json", comparison)
    return comparison


def _pick(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: metrics[k] for k in METRIC_KEYS if k in metrics}


@dataclass
class EnsembleOptions:
    """The `tune ensemble` options."""

    run: Path = field(metadata=meta("the run directory (runs/NAME)", positional=True))
    top: int = field(default=3, metadata=meta("members: the K best trials"))
    out: Path | None = field(default=None, metadata=meta("bundle directory (default RUN/ensemble)"))
    data: Path | None = field(default=None, metadata=meta("prepared directory (default: the run's)"))
    half: bool = field(default=False, metadata=meta("fp16 weights (half the size)"))


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "ensemble", ensemble_command, EnsembleOptions, doc=__doc__,
                help="one bundle from a search's K best trials")


def ensemble_command(args: argparse.Namespace) -> int:
    opts = from_args(args, EnsembleOptions)
    result = build_run_ensemble(opts.run, opts.top, opts.out, opts.data, opts.half)
    ens, single = result["ensemble"], result["best_single"]
    print(f"ensemble of {ens['top']}: val dsc_volume {ens['val']['dsc_volume']:.4f} (tta {ens['tta']}, "
          f"threshold {ens['threshold']}) vs best single trial {single['val']['dsc_volume']:.4f}; "
          f"bundle: {ens['bundle']} (all selected on val)")
    return 0
