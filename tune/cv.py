"""`python -m tune cv`: one configuration on K patient-disjoint folds of train + val, as parallel trials.

    python -m tune cv --data prepared --folds 5 --from runs/study1          # the search's best config
    python -m tune cv --data prepared --folds 5 --config best.yaml --epochs 30
    python -m tune cv --data prepared --folds 5 --from runs/study1 --pool train   # val kept out

The folds pool the prepared train and val patients (``--pool train``: train only, so the fold
ensemble can be compared with a single model on val patients no fold saw; test stays out), balance
the tumour-slice share as `core data prepare` balances splits, and are saved in
``runs/NAME/folds.json`` (``--folds-file`` reuses them). Each fold is one Ray Tune trial (they run in
parallel, several per GPU), trained on the other folds and validated on its own, so every patient is
validated exactly once by a model that never saw it. ``cv.json`` holds per-fold and mean +- sd metrics
and the worst patient; ``ensemble/`` is the fold ensemble as one bundle (with val in the pool no
patient is held out from all folds, so its threshold, TTA and post-processing are the folds' most
common choices; with ``--pool train`` they are chosen on val).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ray import tune

from core.config import TrainConfig, add_command, from_args, meta
from core.data.arrays import SplitArrays, load_split, load_split_info, split_hash
from core.data.prepare import fold_patients
from core.evaluation.evaluate import predict_split
from core.evaluation.metrics import METRIC_KEYS, MINIMISED, per_patient_dice
from core.inference.predictor import Predictor
from core.io import read_json, write_json
from core.training.ensemble import build_ensemble_bundle
from tune import results
from tune.objective import COMPLETED, DIVERGED, PATIENCE, objective_key
from tune.search import sets_field, tune_env
from tune.trainable import train_trial

log = logging.getLogger(__name__)


POOLS = ("train+val", "train")
# How a fold's training may end for the CV to be summarised: its schedule run out, or its own stop rules.
FINISHED = {results.STOP_REASONS[reason] for reason in (COMPLETED, PATIENCE, DIVERGED)}


def pool_splits(prepared: Path, pool: str = "train+val") -> tuple[SplitArrays, dict[str, Any]]:
    """Train + val (or train alone) of a prepared directory as one pool (in memory: one object-store copy)."""
    if pool not in POOLS:
        raise ValueError(f"--pool {pool!r} is not one of {', '.join(POOLS)}")
    info = load_split_info(prepared)
    parts = [load_split(prepared, split, mmap=False) for split in pool.split("+")]
    return SplitArrays(*(np.concatenate([getattr(p, k) for p in parts])
                         for k in ("images", "masks", "patients", "slices"))), info


def make_folds(pool: SplitArrays, folds: int, seed: int) -> list[list[str]]:
    patients = np.asarray(pool.patients).astype(str)
    tumour = pool.tumour
    share = {p: float(tumour[patients == p].mean()) for p in np.unique(patients)}
    return fold_patients(share, folds, seed)


def cv_trial(config: dict[str, Any], pool: SplitArrays, folds: list[list[str]], split_info: dict[str, Any]) -> None:
    """One fold: core's trainer through tune's trial function, on this fold's train and val."""
    k = int(config["fold"])
    train, val, info = pool.fold(folds, k, split_info)
    train_trial(fold_config(config, k), train, val, info)


def fold_config(config: dict[str, Any], k: int) -> dict[str, Any]:
    """A CV trial's config as fold k trains and exports it: no ``fold`` key, ``{fold}`` in its init made k."""
    config = {x: v for x, v in config.items() if x != "fold"}
    if config.get("init"):
        config["init"] = fold_init(config["init"], k)
    return config


FOLD = "{fold}"


def fold_init(init: str, k: int) -> str:
    """Fold k's --init: ``{fold}`` in the path names that fold's own bundle. Progressive resizing in a CV starts
    each fold from its own smaller-image model, which never saw the fold's patients; one bundle for every fold
    would have seen them all."""
    return init.replace(FOLD, str(k))


def check_fold_inits(init: str, folds: list[list[str]]) -> None:
    """An --init in a CV must be per fold (``{fold}``), and fold k's bundle must be a fold-k model of these folds:
    by its own record of its training patients, or by the folds.json of the CV that made it."""
    if not init:
        return
    if FOLD not in init:
        raise ValueError(f"init {init}: in a CV every fold would start from weights that saw its patients; "
                         f"name each fold's own bundle with {FOLD} (e.g. runs/study/cv/folds/fold{FOLD})")
    for k, fold in enumerate(folds):
        bundle = Path(fold_init(init, k))
        if not (bundle / "metrics.json").is_file():
            raise ValueError(f"init {init}: fold {k} has no bundle at {bundle}")
        metrics = read_json(bundle / "metrics.json")
        trained_on = metrics.get("train_patients")
        made_by = bundle.parent.parent / "folds.json"
        if trained_on is not None:
            seen = set(trained_on) & set(fold)
        elif metrics.get("fold") == k and made_by.is_file():
            seen = set() if read_json(made_by)["folds"] == folds else set(fold)
        else:
            raise ValueError(f"{bundle}: records neither its training patients nor a CV's folds.json")
        if seen:
            raise ValueError(f"{bundle}: trained on patients of fold {k} (or on other folds): not fold {k}'s start")


def base_config(config_file: Path | None, from_run: Path | None, fixed: dict[str, Any]) -> dict[str, Any]:
    """The configuration to cross-validate: a YAML of constants, or a search's best trial, then --set."""
    if (config_file is None) == (from_run is None):
        raise ValueError("give exactly one of --config FILE or --from runs/NAME")
    if config_file is not None:
        values = yaml.safe_load(Path(config_file).read_text()) or {}
        bad = {k: v for k, v in values.items() if isinstance(v, (list, dict))}
        if bad:
            raise ValueError(f"{config_file}: cv takes one configuration (constants), not a space: {sorted(bad)}")
    else:
        run = read_json(Path(from_run) / "run.json")
        if not run.get("best_trial"):
            raise ValueError(f"{from_run}: the run has no best trial yet")
        values = dict(run["best_trial"]["config"])
    values.update(fixed)
    return {k: v for k, v in TrainConfig.from_dict(values).to_dict().items() if k not in ("workers", "device")}


def run_cv(
    data: Path, name: str, folds: int, config: dict[str, Any], storage: Path, folds_file: Path | None = None,
    cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0, seed: int = 0, half: bool = False,
    pool_name: str = "train+val",
) -> dict[str, Any]:
    """Run (or continue) the CV; returns cv.json's content."""
    import ray

    run_dir = (storage / name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    pool, info = pool_splits(Path(data).resolve(), pool_name)
    held_out = load_split(Path(data).resolve(), "val") if pool_name == "train" else None
    fold_lists = read_json(folds_file)["folds"] if folds_file else make_folds(pool, folds, seed)
    covered = sorted(p for f in fold_lists for p in f)
    if covered != sorted(np.unique(np.asarray(pool.patients).astype(str)).tolist()):
        raise ValueError(f"{folds_file}: its folds do not cover the pool's patients exactly once")
    write_json(run_dir / "folds.json", {"folds": fold_lists, "seed": seed, "data": str(data),
                                        "split_hash": split_hash(info)})
    if config.get("init") and "://" not in config["init"]:  # trials run in their own directories
        config = {**config, "init": str(Path(config["init"]).resolve())}
    cfg = TrainConfig.from_dict(config)
    check_fold_inits(cfg.init, fold_lists)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, configure_logging=False)
    trainable = tune.with_resources(tune.with_parameters(cv_trial, pool=pool, folds=fold_lists, split_info=info),
                                    {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    experiment = run_dir / "ray"
    if tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={**config, "fold": tune.grid_search(list(range(len(fold_lists))))},
            tune_config=tune.TuneConfig(metric=objective_key(cfg.metric), mode="min" if cfg.metric in MINIMISED
                                        else "max", trial_dirname_creator=lambda t: f"fold_{t.config['fold']}"),
            run_config=tune.RunConfig(name="ray", storage_path=str(run_dir), verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=2)),
        )
    with tune_env(len(fold_lists)):  # the search's snapshot settings: a killed CV resumes from what exists
        grid = tuner.fit()
    return summarise(grid, run_dir, pool, fold_lists, info, cfg, half, held_out)


def summarise(grid: Any, run_dir: Path, pool: SplitArrays, folds: list[list[str]], info: dict[str, Any],
              cfg: TrainConfig, half: bool, held_out: SplitArrays | None = None) -> dict[str, Any]:
    """Per-fold bundles and metrics, mean +- sd, and the fold ensemble."""
    rows, bundles = [], []
    trials = sorted(results.collect(grid, cfg.metric, "none"), key=lambda t: t["config"]["fold"])
    for trial in trials:  # an interrupted CV (Ctrl+C, a killed trial) is continued, never summarised
        if trial["checkpoint"] is None or trial["stop_reason"] not in FINISHED:
            raise RuntimeError(f"fold {trial['config']['fold']} stopped at epoch {trial['epochs_run']} "
                               f"({trial['stop_reason']}); rerun to continue it")
    for trial in trials:
        k = int(trial["config"]["fold"])
        train, val, fold_info = pool.fold(folds, k, info)
        bundle = run_dir / "folds" / f"fold{k}"
        with trial["checkpoint"].as_directory() as folder:
            results.export_trial(Path(folder), fold_config(trial["config"], k), bundle,
                                 train, val, fold_info, "gliomaseg-cv-fold",
                                 {"fold": k, "train_patients": fold_info["patients"]["train"],
                                  "val_patients": fold_info["patients"]["val"]})
        metrics = read_json(bundle / "metrics.json")
        # Each patient's own dsc_volume, so two CVs on the same folds compare patient by patient.
        pred = predict_split(Predictor.from_bundle(bundle, "cpu"), val)
        rows.append({"fold": k, "patients": len(folds[k]), "slices": len(val), "best_epoch": trial["best_epoch"],
                     "val": {m: metrics["val"].get(m) for m in METRIC_KEYS}, "tta": metrics.get("tta"),
                     "postprocess": metrics.get("postprocess"),
                     "per_patient_dsc_volume": per_patient_dice(pred, np.asarray(val.masks), val.patients)})
        bundles.append(bundle)
    summary = {m: {"mean": statistics.fmean(r["val"][m] for r in rows),
                   "sd": statistics.stdev([r["val"][m] for r in rows]) if len(rows) > 1 else 0.0}
               for m in METRIC_KEYS if all(r["val"][m] is not None for r in rows)}
    if "dsc_volume_min" in summary:  # the worst patient of the whole pool, each scored by a model that never saw it
        summary["worst_patient_dsc_volume"] = min(r["val"]["dsc_volume_min"] for r in rows)
    # No patient is outside every fold's training data, so the ensemble's settings are the folds' majority.
    fixed = {"tta": Counter(r["tta"] or "none" for r in rows).most_common(1)[0][0],
             "postprocess": Counter(tuple(sorted((r["postprocess"] or {}).items())) for r in rows).most_common(1)[0][0]}
    fixed["postprocess"] = dict(fixed["postprocess"])
    # With val held out of every fold (--pool train), the ensemble's threshold, TTA and post-processing are
    # chosen on val, as a single model's are, so the two compare on the same patients.
    class_names = list(info.get("class_names") or ["background", "tumour"])
    build_ensemble_bundle(bundles, held_out, class_names, run_dir / "ensemble", name="gliomaseg-cv-ensemble",
                          sources=[f"fold {r['fold']}" for r in rows], fixed=fixed, half=half)
    out = {"folds": rows, "summary": summary, "config": cfg.to_dict(), "ensemble": str(run_dir / "ensemble"),
           "pool": "train" if held_out is not None else "train+val",
           "note": "each fold's metrics are on its own patients, never seen in its training; the epoch, TTA and "
                   "post-processing were chosen on that fold (slightly optimistic per fold)"}
    if held_out is not None:
        out["ensemble_val"] = read_json(run_dir / "ensemble" / "metrics.json").get("val", {})
    write_json(run_dir / "cv.json", out)
    return out


@dataclass
class CVOptions:
    """The `tune cv` options."""

    data: Path = field(metadata=meta("prepared directory (train + val are pooled)"))
    folds: int = field(default=5, metadata=meta("folds (one trial each)"))
    config: Path | None = field(default=None, metadata=meta("YAML of core train options (constants)"))
    from_run: Path | None = field(default=None, metadata=meta(
        "a tune run directory: its best trial's config", flag="--from"))
    fixed: dict[str, Any] = sets_field("override one core train option (YAML value); repeatable")
    epochs: int | None = field(default=None, metadata=meta("epochs per fold (unset: the configuration's)"))
    name: str = field(default="cv", metadata=meta("writes STORAGE/NAME"))
    storage: Path = field(default=Path("runs"), metadata=meta("where runs go"))
    folds_file: Path | None = field(default=None, metadata=meta("reuse the folds of a folds.json"))
    cpus_per_trial: float = field(default=1.0, metadata=meta("CPUs per fold"))
    gpus_per_trial: float = field(default=0.0, metadata=meta("GPU share per fold"))
    seed: int = field(default=0, metadata=meta("seeds the fold assignment"))
    half: bool = field(default=False, metadata=meta("fp16 weights in the fold ensemble"))
    pool: str = field(default="train+val", metadata=meta(
        "patients the folds cover; train keeps val out, to compare the fold ensemble on it", choices=POOLS))


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "cv", cv_command, CVOptions, doc=__doc__,
                help="patient-level K-fold cross-validation of one configuration")


def cv_command(args: argparse.Namespace) -> int:
    opts = from_args(args, CVOptions)
    fixed = dict(opts.fixed)
    if opts.epochs:
        fixed["epochs"] = opts.epochs
    config = base_config(opts.config, opts.from_run, fixed)
    out = run_cv(opts.data, opts.name, opts.folds, config, opts.storage, opts.folds_file, opts.cpus_per_trial,
                 opts.gpus_per_trial, opts.seed, opts.half, opts.pool)
    for row in out["folds"]:
        m = row["val"]
        print(f"fold {row['fold']} ({row['patients']} patients): dsc_volume {m['dsc_volume']:.4f} "
              f"dice_tumour {m['dice_tumour']:.4f} fp_slice_rate {m['fp_slice_rate']:.4f}")
    s = out["summary"]
    print("mean +- sd: " + ", ".join(f"{k} {s[k]['mean']:.4f} +- {s[k]['sd']:.4f}"
                                    for k in ("dsc_volume", "dice_tumour", "fp_slice_rate")))
    print(f"fold ensemble: {out['ensemble']}; folds: {opts.storage / opts.name / 'folds.json'}")
    if "ensemble_val" in out:
        print(f"fold ensemble on val: dsc_volume {out['ensemble_val'].get('dsc_volume', float('nan')):.4f}")
    return 0
