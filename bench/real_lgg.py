"""Real-data results on the LGG data, made with the product itself: `tune run`, then `core train`.

One command drives the whole study; every step is one of gliomaseg's own commands, run as a subprocess,
and each is resumable, so the command can be re-run after an interruption and continues where it was:

1. `python -m core data prepare` with the recorded split (bench/results/real-lgg-split.json: 88/11, seed 0);
2. `python -m tune run` (Ray Tune: Optuna TPE + ASHA) over the space in bench/real_lgg_space.yaml,
   `--resume`d when the run exists and is unfinished;
3. optionally `python -m core train` of the winning configuration for longer (`--final-epochs`, at
   `--final-image-size`), `--resume`d likewise, then optionally fine-tuned at `--finetune-image-size`
   from its best epoch (`core train --init`: progressive resolution, `--finetune-epochs`);
4. optionally `python -m tune ensemble` of the search's `--ensemble K` best trials, and
   `python -m tune cv` of the winning configuration on `--cv-folds K` patient-level folds;
5. the best candidate by val dsc_volume (selected on val; the CV's fold ensemble only with ``--cv-pool
   train``) is re-saved with fp16 weights in `--export` with its MODEL_CARD.md, scored on val as volumes,
   one slice at a time, and with pre- and post-contrast replaced by FLAIR (bench/missing_sequences.py).

The studies behind the earlier pretrained/lgg (bench/results/real-lgg-cpu.json, real-lgg-ms50-cpu.json;
the search ran in a session whose run directory was lost, so ``--search-record`` takes it from the record):

    python ../shared/data/lgg/restore.py runs/lgg-all --pack gpu          # 99 patients
    python bench/real_lgg.py --src runs/lgg-all/kaggle_3m --work runs --name lgg-ms50 \\
        --search-record bench/results/real-lgg-cpu.json --set missing_sequence=0.5 \\
        --final-epochs 60 --final-patience 15 --cv-folds 5 --cv-epochs 24 --cv-pool train \\
        --versus bench/results/real-lgg-cpu.json --export pretrained/lgg --result real-lgg-ms50

``--set`` trains a variant of the search's winner; ``--versus`` exports only where this study's CV beats
the record's by the paired per-patient differences (same folds). With ``--cv-pool train`` the folds cover
the 88 training patients only, so the fold ensemble competes with the single models on val.

Writes bench/results/real-lgg-<device>.json (every trial, the final run, the CV, wall time, CPU hours).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine_info, write_result  # noqa: E402
from bench.missing_sequences import missing_sequence_check  # noqa: E402
from bench.real_lgg_card import model_card  # noqa: E402
from core.bundle import load_bundle, save_bundle  # noqa: E402
from core.config import TrainConfig  # noqa: E402
from core.data.arrays import load_split, load_split_info, split_hash  # noqa: E402
from core.evaluation.stats import paired_difference  # noqa: E402
from core.io import read_json, write_json  # noqa: E402
from tune.search import parse_sets  # noqa: E402

SPLIT = ROOT / "bench" / "results" / "real-lgg-split.json"
SPACE = ROOT / "bench" / "real_lgg_space.yaml"
# Keys of a trial's config that are the search's own, not the model's (tune sets them per run).
NOT_HYPERPARAMETERS = ("epochs", "metric", "seed", "device", "workers")


def step(argv: list[str], log: Path, phase: str = "") -> float:
    """Run one gliomaseg command, appending its output to ``log``; its wall seconds are added to the
    ``phase`` total in LOG's wall-time ledger (a resumed step adds to the same phase)."""
    start = time.perf_counter()
    print("+", " ".join(argv), flush=True)
    with log.open("a") as out:
        out.write(f"\n+ {' '.join(argv)}\n")
        out.flush()
        code = subprocess.call([sys.executable, *argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if phase:
        ledger = wall_ledger(log)
        write_json(log.with_suffix(".wall.json"), {**ledger, phase: ledger.get(phase, 0.0) + seconds})
    if code:
        raise SystemExit(f"{argv[:3]} failed with exit code {code}; see {log}")
    return seconds


def wall_ledger(log: Path) -> dict[str, float]:
    path = log.with_suffix(".wall.json")
    return read_json(path) if path.is_file() else {}


def recorded_search(record: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(run.json's fields, trial records) from a study's earlier result JSON: the search ran in an earlier
    session whose run directory is gone, so its trials, CPU time and winner come from what it recorded."""
    rec = read_json(record)
    search = rec["search"]
    run = {"options": search["run"], "space": search["space"], "stop_reasons": search["stop_reasons"],
           "best_trial": search["best_trial"], "created": search["created"], "finished": search["finished"],
           "status": "finished", "record": str(record)}
    return run, rec["trials"]


def search(args: argparse.Namespace, prepared: Path, log: Path) -> dict[str, Any]:
    """`tune run` (or `--resume`, or nothing when the run has finished); returns its run.json."""
    run_dir = args.work / args.name
    info = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    if info.get("status") == "finished":
        return info
    argv = ["-m", "tune", "run", "--data", str(prepared), "--name", args.name, "--storage", str(args.work),
            "--quiet", "--cpus-per-trial", str(args.cpus_per_trial)]
    if info:
        argv.append("--resume")
    else:
        argv += ["--config", str(args.space), "--num-samples", str(args.num_samples),
                 "--max-epochs", str(args.max_epochs), "--grace-period", str(args.grace_period),
                 "--reduction-factor", str(args.reduction_factor)]
    step(argv, log, "search")
    return read_json(run_dir / "run.json")


def train(prepared: Path, settings: dict[str, Any], out: Path, log: Path, phase: str) -> Path:
    """`core train` with every TrainConfig field given (``--resume`` where a checkpoint exists); returns ``out``."""
    if (out / "best" / "config.json").is_file():
        return out
    argv = ["-m", "core", "train", "--data", str(prepared), "--out", str(out), "--name", "gliomaseg-lgg"]
    for key, value in TrainConfig.from_dict(settings).to_dict().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    if (out / "checkpoint").exists():
        argv.append("--resume")
    step(argv, log, phase)
    return out


def final_run(args: argparse.Namespace, prepared: Path, winner: dict[str, Any], log: Path) -> Path | None:
    """`core train` of the winning configuration for ``--final-epochs``; returns its run directory."""
    if args.final_epochs <= 0:
        return None
    settings = {k: v for k, v in winner.items() if k not in NOT_HYPERPARAMETERS}
    settings.update(epochs=args.final_epochs, patience=args.final_patience)
    if args.final_image_size is not None:
        settings["image_size"] = args.final_image_size
    if args.final_init:  # progressive resolution: fine-tune the search's best at the final size
        settings.update(init=str(args.work / args.name / "best"), warmup_epochs=0)
        if args.final_lr:
            settings["lr"] = args.final_lr
    return train(prepared, settings, args.work / f"{args.name}-final", log, "final")


def finetune_run(args: argparse.Namespace, prepared: Path, final_dir: Path | None, log: Path) -> Path | None:
    """Progressive resolution: `core train --init` of the final run's best at ``--finetune-image-size``."""
    if args.finetune_epochs <= 0 or final_dir is None:
        return None
    base = read_json(final_dir / "best" / "config.json")["hyperparameters"]
    settings = {k: v for k, v in base.items() if k not in NOT_HYPERPARAMETERS and k != "init"}
    settings.update(init=str(final_dir / "best"), image_size=args.finetune_image_size, epochs=args.finetune_epochs,
                    patience=args.final_patience, warmup_epochs=0, lr=args.finetune_lr or settings["lr"] / 4)
    return train(prepared, settings, args.work / f"{args.name}-finetune{args.finetune_image_size}", log, "finetune")


def run_summary(run_dir: Path, source: str) -> dict[str, Any]:
    """A `core train` run's best bundle with its per-epoch val dsc_volume and epoch times."""
    with (run_dir / "metrics.csv").open(newline="") as fh:
        history = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]
    return {**bundle_summary(run_dir / "best"), "source": source,
            "epoch_seconds": [h["epoch_seconds"] for h in history],
            "val_dsc_volume_by_epoch": [h["dsc_volume"] for h in history]}


def one_slice_at_a_time(bundle: str, prepared: Path) -> dict[str, Any]:
    """Val metrics of the path that sees one slice at a time (serve's /v1/segment, SageMaker per slice):
    per-slice standardisation and crop, the slice rule of post-processing; per-patient dsc_volume beside."""
    from core.evaluation.evaluate import predict_split
    from core.evaluation.metrics import per_patient_dice, segmentation_metrics
    from core.inference.predictor import Predictor

    val = load_split(prepared, "val")
    predictor = Predictor.from_bundle(bundle, device="cpu")
    out: dict[str, Any] = {}
    for name, volume in (("volume", True), ("one_slice", False)):
        pred = predict_split(predictor, val, volume=volume)
        out[name] = segmentation_metrics(pred, np.asarray(val.masks), val.patients)
        out[f"{name}_per_patient"] = per_patient_dice(pred, np.asarray(val.masks), val.patients)
    return out


def ensemble(args: argparse.Namespace, log: Path) -> dict[str, Any] | None:
    """`tune ensemble` of the search's ``--ensemble`` best trials (once); returns its ensemble.json."""
    if args.ensemble < 2:
        return None
    path = args.work / args.name / "ensemble.json"
    if not path.is_file():
        step(["-m", "tune", "ensemble", str(args.work / args.name), "--top", str(args.ensemble), "--half"], log,
             "ensemble")
    return read_json(path)


def cross_validate(args: argparse.Namespace, prepared: Path, winner: dict[str, Any], log: Path,
                   ) -> dict[str, Any] | None:
    """`tune cv` of the winning configuration on ``--cv-folds`` folds (once); returns its cv.json."""
    if args.cv_folds < 2:
        return None
    name = args.cv_name or f"{args.name}-cv{args.cv_folds}"
    path = args.work / name / "cv.json"
    if not path.is_file():
        config = args.work / f"{name}-config.yaml"  # the winner as constants: `tune cv --config`
        config.write_text(yaml.safe_dump({k: v for k, v in winner.items() if k not in NOT_HYPERPARAMETERS}))
        step(["-m", "tune", "cv", "--data", str(prepared), "--folds", str(args.cv_folds), "--config",
              str(config), "--epochs", str(args.cv_epochs), "--name", name, "--storage",
              str(args.work), "--half", "--pool", args.cv_pool], log, "cv")
    return read_json(path)


def versus(record: Path, cv: dict[str, Any] | None) -> dict[str, Any]:
    """This study's CV against an earlier study's on the same folds, by the paired per-patient differences of
    dsc_volume (core.evaluation.stats): beaten only where their 95% interval lies above 0. A record without
    per-patient figures (before tune cv kept them) cannot be beaten that way, whatever the means."""
    def summary(c: dict[str, Any]) -> dict[str, Any]:
        per_patient = {p: d for f in c["folds"] for p, d in (f.get("per_patient_dsc_volume") or {}).items()}
        return {"dsc_volume": c["summary"]["dsc_volume"]["mean"],
                "worst_patient": c["summary"].get("worst_patient_dsc_volume"), "per_patient": per_patient}

    theirs = summary(read_json(record)["cv"])
    ours = summary(cv) if cv else None
    out: dict[str, Any] = {"record": str(record), "theirs": theirs, "ours": ours, "beaten": False}
    if ours and ours["per_patient"] and theirs["per_patient"]:
        out["paired"] = paired_difference(ours["per_patient"], theirs["per_patient"])
        out["beaten"] = out["paired"]["verdict"] == "a"
    else:
        out["paired"] = "no per-patient figures in one of the CVs: no paired comparison, nothing beaten"
    return out


def trial_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every trial from the run's history.json: settings, best metrics, epochs and epoch times."""
    out = []
    for t in read_json(run_dir / "history.json"):
        seconds = [h.get("epoch_seconds") for h in t["history"] if h.get("epoch_seconds") is not None]
        out.append({
            "rank": t["rank"], "trial_id": t["trial_id"], "stop_reason": t["stop_reason"],
            "epochs_run": t["epochs_run"], "best_epoch": t["best_epoch"], "objective": t["objective"],
            "config": {k: v for k, v in t["config"].items() if k not in ("device", "workers")},
            "best": t["best"], "epoch_seconds": seconds,
            "val_dsc_volume_by_epoch": [h.get("dsc_volume") for h in t["history"]],
        })
    return out


def bundle_summary(bundle: Path) -> dict[str, Any]:
    metrics = read_json(bundle / "metrics.json")
    keep = ("val", "val_raw", "val_postprocessed", "val_tta", "tta", "postprocess", "epoch", "epochs_trained")
    return {"bundle": str(bundle), "config": read_json(bundle / "config.json")["hyperparameters"],
            **{k: metrics[k] for k in keep if k in metrics}}


def export(bundle: Path, target: Path, card: str) -> None:
    """Re-save a bundle with fp16 weights (small enough to ship) and write its model card."""
    loaded = load_bundle(bundle)
    save_bundle(target, loaded.model, loaded.config, loaded.metrics, half=True)
    (target / "MODEL_CARD.md").write_text(card)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, required=True, help="restored Kaggle layout (.../kaggle_3m)")
    p.add_argument("--work", type=Path, default=ROOT / "runs", help="prepared data and runs go here")
    p.add_argument("--name", default="lgg-cpu", help="tune run name (runs WORK/NAME)")
    p.add_argument("--space", type=Path, default=SPACE)
    p.add_argument("--num-samples", type=int, default=12)
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--grace-period", type=int, default=2)
    p.add_argument("--reduction-factor", type=int, default=3)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--final-epochs", type=int, default=0, help="train the winner again for N epochs (0: no)")
    p.add_argument("--final-image-size", type=int, help="the final run's resolution (default: the winner's)")
    p.add_argument("--final-patience", type=int, default=10)
    p.add_argument("--final-init", action="store_true",
                   help="the final run fine-tunes the search's best bundle (core train --init), not anew")
    p.add_argument("--final-lr", type=float, help="the fine-tuning run's peak lr (default: the winner's)")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="then fine-tune the final run's best for N epochs at --finetune-image-size (0: no)")
    p.add_argument("--finetune-image-size", type=int, default=256)
    p.add_argument("--finetune-lr", type=float, help="its peak lr (default: a quarter of the final run's)")
    p.add_argument("--ensemble", type=int, default=0, help="also build the K best trials' ensemble (0: no)")
    p.add_argument("--cv-folds", type=int, default=0, help="also cross-validate the winner on K folds (0: no)")
    p.add_argument("--cv-epochs", type=int, default=6)
    p.add_argument("--cv-name", help="the CV run's name (default NAME-cvK)")
    p.add_argument("--cv-pool", choices=("train+val", "train"), default="train",
                   help="train: val stays out of every fold, so the fold ensemble competes on val")
    p.add_argument("--search-record", type=Path,
                   help="an earlier study's result JSON: its search stands in for WORK/NAME when that is gone")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a variant of the winner: this setting overrides it in the final run and the CV")
    p.add_argument("--versus", type=Path,
                   help="an earlier study's result JSON: export only if this study's CV beats its CV by the "
                        "paired per-patient dsc_volume difference (interval above 0)")
    p.add_argument("--export", type=Path, help="write the shipped bundle (fp16) + MODEL_CARD.md here")
    p.add_argument("--result", default="real-lgg",
                   help="bench/results/RESULT-<device>.json (a study that ships nothing yet keeps its own name)")
    return p.parse_args()


def prepare(args: argparse.Namespace, log: Path) -> tuple[Path, dict[str, Any]]:
    """The prepared data with the recorded split (prepared once; refused if its split is another)."""
    prepared = args.work / "lgg-prepared"
    if not (prepared / "split.json").is_file():
        step(["-m", "core", "data", "prepare", "--src", str(args.src), "--out", str(prepared),
              "--split-file", str(SPLIT), "--no-progress"], log)
    info = load_split_info(prepared)
    if split_hash(info) != split_hash(read_json(SPLIT)):
        raise SystemExit(f"{prepared}: not the recorded split ({SPLIT})")
    return prepared, info


def candidates_of(args: argparse.Namespace, prepared: Path, run: dict[str, Any], winner: dict[str, Any],
                  log: Path) -> dict[str, Any]:
    """Every bundle that may ship (the search's best, the final run, its fine-tune, the ensemble, the CV's
    fold ensemble), each run or resumed here, with the runs that made them."""
    run_dir = args.work / args.name
    final_dir = final_run(args, prepared, winner, log)
    candidates = []
    if (run_dir / "best" / "config.json").is_file():  # not when the search is only a record
        candidates.append({**bundle_summary(run_dir / "best"), "source": f"the search's best trial "
                           f"({run['best_trial']['trial_id']}, best epoch {run['best_trial']['best_epoch']})"})
    final: dict[str, Any] | None = None
    if final_dir is not None:
        final = run_summary(final_dir, "the final run of the winning configuration")
        candidates.append(final)
    finetune_dir = finetune_run(args, prepared, final_dir, log)
    finetuned: dict[str, Any] | None = None
    if finetune_dir is not None:
        finetuned = run_summary(finetune_dir, f"the final run fine-tuned at {args.finetune_image_size} px "
                                "(core train --init)")
        candidates.append(finetuned)
    ensembled = ensemble(args, log)
    if ensembled is not None:
        candidates.append({**bundle_summary(Path(ensembled["ensemble"]["bundle"])),
                           "source": f"the ensemble of the search's {args.ensemble} best trials"})
    cv = cross_validate(args, prepared, winner, log)
    if cv and cv.get("pool") == "train":  # no fold saw a val patient: the fold ensemble may compete there
        candidates.append({**bundle_summary(Path(cv["ensemble"])),
                           "source": f"the {args.cv_folds}-fold CV's fold ensemble (nnU-Net's way)"})
    return {"candidates": candidates, "final": final, "finetune": finetuned, "ensemble": ensembled, "cv": cv}


def study_results(args: argparse.Namespace, prepared: Path, info: dict[str, Any], run: dict[str, Any],
                  trials: list[dict[str, Any]], made: dict[str, Any], shipped: dict[str, Any],
                  log: Path) -> dict[str, Any]:
    """The study's record: the split, the search, every candidate, the shipped one's checks, the compute."""
    final, finetuned, cv = made["final"], made["finetune"], made["cv"]
    trial_epochs = sum(t["epochs_run"] for t in trials)
    search_seconds = sum(sum(t["epoch_seconds"]) for t in trials)
    robustness = missing_sequence_check(shipped["bundle"], prepared)
    cores = machine_info().get("cpu_count") or os.cpu_count() or 1
    train_seconds = sum(sum(r["epoch_seconds"]) for r in (final, finetuned) if r)
    cv_seconds = wall_ledger(log).get("cv", 0.0)
    # CPU-hours: each trial-epoch holds cpus_per_trial cores; the final run, its fine-tune and the CV hold every core.
    results: dict[str, Any] = {
        "split": {"hash": split_hash(info), "counts": info["counts"], "val_patients": info["patients"]["val"],
                  "file": str(SPLIT.relative_to(ROOT))},
        "search": {"run": run.get("options", {}), "space": run.get("space"), "trials": len(trials),
                   "trial_epochs": trial_epochs, "stop_reasons": run.get("stop_reasons"),
                   "trial_seconds": round(search_seconds, 1),
                   "cpu_hours": round(search_seconds * args.cpus_per_trial / 3600, 3),
                   "best_trial": run.get("best_trial"), "created": run.get("created"),
                   "finished": run.get("finished")},
        "trials": trials,
        "final": final,
        "finetune": finetuned,
        "shipped_paths": one_slice_at_a_time(shipped["bundle"], prepared),
        "shipped": {k: shipped[k] for k in ("source", "config", "val", "tta", "postprocess") if k in shipped},
        "candidates": [{k: c[k] for k in ("source", "val", "val_raw", "tta") if k in c} for c in made["candidates"]],
        "ensemble": made["ensemble"],
        "cv": cv and {k: cv[k] for k in ("folds", "summary", "config", "note", "pool", "ensemble_val") if k in cv},
        "missing_sequences": {**{k: v for k, v in robustness.items() if k not in ("intact", "pre_post_as_flair")},
                              **{k: {m: robustness[k][m] for m in ("dsc_volume", "dsc_volume_min")}
                                 for k in ("intact", "pre_post_as_flair")}},
        "cpu_hours": round((search_seconds * args.cpus_per_trial + (train_seconds + cv_seconds) * cores) / 3600, 3),
        "wall_seconds": {k: round(v, 1) for k, v in wall_ledger(log).items()},
        "selection": "every figure is on the 11 validation patients, which also selected the model",
        "machine_note": f"{cores} CPU cores, no GPU",
    }
    if final:
        results["final_note"] = (f"`core train` of the winner for up to {args.final_epochs} epochs "
                                 f"({len(final['epoch_seconds'])} run, "
                                 f"{sum(final['epoch_seconds']) / 3600:.2f} h wall)")
    return results


def main() -> int:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / f"{args.name}.log"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("WANDB_MODE", "disabled")
    prepared, info = prepare(args, log)
    run_dir = args.work / args.name
    if args.search_record and not (run_dir / "run.json").is_file():
        run, trials = recorded_search(args.search_record)
    else:
        run = search(args, prepared, log)
        trials = trial_records(run_dir)
    variant = parse_sets(args.set)
    winner = {**run["best_trial"]["config"], **variant}
    made = candidates_of(args, prepared, run, winner, log)
    shipped = max(made["candidates"], key=lambda c: c["val"]["dsc_volume"])
    results = study_results(args, prepared, info, run, trials, made, shipped, log)
    if variant:
        results["variant"] = variant
    if args.versus:
        results["versus"] = versus(args.versus, made["cv"])
    if args.export and args.versus and not results["versus"]["beaten"]:
        print(f"not exported: the CV does not beat {args.versus}'s ({results['versus']['theirs']['dsc_volume']})")
    elif args.export:
        export(Path(shipped["bundle"]), args.export, model_card(results, shipped, info))
        results["exported"] = str(args.export)
    path = write_result(args.result, results)
    write_json(args.work / f"{args.name}-study.json", results)  # the same, beside the runs
    print(f"shipped {shipped['source']}: val dsc_volume {shipped['val']['dsc_volume']:.4f}; wrote {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
