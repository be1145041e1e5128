"""Real-data results: the earlier study's baseline and a concurrent search on the LGG data (issue 9).

Runs on a GPU machine that may lack Ray: it uses core's Trainer directly and drives K concurrent
trial processes (sharing the GPU, as fractional-GPU Ray trials would) from tune's search space, with
one Optuna TPE study in SQLite and Optuna's successive-halving pruner (the ASHA rule) on epochs.
Where Ray is installed, `python -m tune run` does the same search with Ray Tune instead.

    python ../shared/data/lgg/restore.py /tmp/lgg-all --pack gpu        # 99 patients
    python bench/real_lgg.py --src /tmp/lgg-all/kaggle_3m --work /tmp/real --val 11 --test 0 \\
        --budget-minutes 20 --concurrent 4 --export pretrained/lgg
    python bench/real_lgg.py --src /tmp/lgg/kaggle_3m --work /tmp/real --val 3 --test 3 --smoke   # CPU check

Writes bench/results/real-lgg-<device>.json: the split, every run's settings, metrics, epoch times,
GPU memory and the device; with --export, the best bundle (fp16 weights) and its MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.machine import RESULTS, device_tag, machine_info  # noqa: E402
from core.config import TrainConfig  # noqa: E402
from core.data.arrays import load_split, load_split_info  # noqa: E402
from core.data.prepare import prepare  # noqa: E402
from core.io import atomic_write_bytes, read_json  # noqa: E402
from core.train import EpochResult, Trainer  # noqa: E402

# The earlier study's best configuration (UNet 32 filters, lr 1.09e-3, batch 16, dropout 0.02, DiceFocal).
BASELINE = {"arch": "unet", "filters": 32, "lr": 1.09e-3, "batch_size": 16, "dropout": 0.02, "loss": "dicefocal"}
# What the real-data search adds to tune's default space.
EXTRA_SPACE = {"oversample": {"uniform": [0.0, 0.5]}, "loss": ["dicefocal", "dicece"]}


def load_data(prepared: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(train, val, split info), read once per process and shared by its trials (Trainer copies to the device)."""
    return (load_split(prepared, "train", mmap=False), load_split(prepared, "val", mmap=False),
            load_split_info(prepared))


def run_trial(cfg: TrainConfig, data: tuple[Any, Any, dict[str, Any]], out: Path, report=None) -> dict[str, Any]:
    """Train one configuration; returns its record (settings, per-epoch metrics, best, memory)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, *data)

    def on_epoch(result: EpochResult, tr: Trainer) -> None:
        if report is not None and report(result):
            tr.should_stop = True

    start = time.perf_counter()
    trainer.fit(on_epoch)
    bundle = trainer.export_bundle(out / "bundle", name="gliomaseg-lgg")
    final = read_json(bundle / "metrics.json")
    return {
        "config": cfg.to_dict(),
        "epochs_run": trainer.epoch,
        "best_epoch": trainer.best_epoch,
        "seconds": time.perf_counter() - start,
        "epoch_seconds": [h["epoch_seconds"] for h in trainer.history],
        "history": trainer.history,
        "best": trainer.best_metrics(),
        "bundle_metrics": final,
        "gpu_peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "bundle": str(bundle),
    }


def search_worker(rank: int, args: dict[str, Any], deadline: float) -> None:
    """One of K processes: ask the shared study for a trial, train it with pruning, tell; until the deadline."""
    import optuna

    from tune.space import load_space

    space = load_space(args.get("config"), EXTRA_SPACE)
    study = optuna.load_study(study_name="real-lgg", storage=f"sqlite:///{args['work']}/optuna.db")
    data = load_data(Path(args["prepared"]))
    while time.time() < deadline:
        trial = study.ask(space.searched)
        cfg = TrainConfig.from_dict({**space.constants, **trial.params, "epochs": args["epochs"],
                                     "seed": args["seed"] + trial.number, "patience": 10})

        def report(result: EpochResult, trial=trial) -> bool:
            trial.report(result.metrics["dsc_volume"], result.epoch)
            return trial.should_prune() or time.time() > deadline

        out = Path(args["work"]) / "trials" / f"{trial.number:04d}"
        try:
            record = run_trial(cfg, data, out, report)
        except (FloatingPointError, torch.cuda.OutOfMemoryError) as exc:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"[worker {rank}] trial {trial.number} failed: {exc}", flush=True)
            continue
        value = record["bundle_metrics"]["val"]["dsc_volume"]
        (out / "record.json").write_text(json.dumps(record, default=float))
        study.tell(trial, value)
        print(f"[worker {rank}] trial {trial.number}: dsc_volume {value:.4f} in {record['epochs_run']} epochs",
              flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="kaggle_3m folder (restore.py output)")
    p.add_argument("--work", required=True)
    p.add_argument("--val", type=float, default=11)
    p.add_argument("--test", type=float, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--budget-minutes", type=float, default=20, help="wall time for the search")
    p.add_argument("--concurrent", type=int, default=4, help="trial processes sharing the device")
    p.add_argument("--config", help="search-space YAML (tune's format)")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--export", help="write the best bundle (fp16) + MODEL_CARD.md here, e.g. pretrained/lgg")
    p.add_argument("--smoke", action="store_true", help="tiny CPU check: 2 epochs, lite net, 1 trial process")
    args = p.parse_args()

    import optuna

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prepared = work / "prepared"
    info = prepare(args.src, prepared, val=args.val, test=args.test, seed=args.seed, progress=False)
    epochs = 2 if args.smoke else args.epochs
    results: dict[str, Any] = {"machine": machine_info(), "split": info, "runs": []}
    result_path = RESULTS / f"real-lgg-{device_tag(results['machine'])}{'-smoke' if args.smoke else ''}.json"

    if not args.skip_baseline:
        base = TrainConfig.from_dict({**BASELINE, "epochs": epochs, "seed": args.seed,
                                      **({"filters": 8} if args.smoke else {})})
        record = run_trial(base, load_data(prepared), work / "baseline")
        results["baseline"] = record
        print("baseline", json.dumps(record["bundle_metrics"].get("val", {}), default=float), flush=True)

    sampler = optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=8, multivariate=True)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=5 if not args.smoke else 1, reduction_factor=3)
    optuna.create_study(study_name="real-lgg", storage=f"sqlite:///{work}/optuna.db", direction="maximize",
                        sampler=sampler, pruner=pruner, load_if_exists=True)
    worker_args = {"work": str(work), "prepared": str(prepared), "epochs": epochs, "seed": args.seed,
                   "config": args.config}
    deadline = time.time() + (20 if args.smoke else args.budget_minutes * 60)
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    procs = [ctx.Process(target=search_worker, args=(r, worker_args, deadline)) for r in
             range(1 if args.smoke else args.concurrent)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()

    records = [json.loads(f.read_text()) for f in sorted((work / "trials").glob("*/record.json"))]
    results["runs"] = records
    results["search"] = {"mode": "concurrent core processes + Optuna TPE/successive halving (no Ray)",
                         "concurrent": len(procs), "budget_minutes": args.budget_minutes, "trials": len(records)}
    candidates = records + ([results["baseline"]] if "baseline" in results else [])
    if candidates:
        best = max(candidates, key=lambda r: r["bundle_metrics"]["val"]["dsc_volume"])
        results["best"] = {k: best[k] for k in ("config", "bundle_metrics", "epochs_run", "bundle")}
        if args.export:
            export(Path(best["bundle"]), Path(args.export), best, info)
    atomic_write_bytes(result_path, json.dumps(results, indent=1, default=float).encode())
    print(f"wrote {result_path}")
    return 0


def export(bundle: Path, target: Path, record: dict[str, Any], info: dict[str, Any]) -> None:
    """Re-save the best bundle with fp16 weights (small enough to ship) and write its model card."""
    from core.bundle import load_bundle, save_bundle

    loaded = load_bundle(bundle)
    save_bundle(target, loaded.model, loaded.config, loaded.metrics, half=True)
    val = record["bundle_metrics"]["val"]
    card = MODEL_CARD.format(
        train=info["counts"]["train"]["patients"], val=info["counts"]["val"]["patients"],
        val_ids=", ".join(info["patients"]["val"]), hp=json.dumps(record["config"], indent=1),
        metrics="\n".join(f"| {k} | {v:.4f} |" for k, v in val.items() if isinstance(v, float)),
    )
    (target / "MODEL_CARD.md").write_text(card)


MODEL_CARD = """# gliomaseg LGG FLAIR-abnormality segmentation model

**Intended use: research only, not diagnosis.** Segments FLAIR abnormality in axial brain MRI slices
of lower-grade glioma patients (3 channels: pre-contrast, FLAIR, post-contrast, 256x256 uint8).

## Data
Kaggle `lgg-mri-segmentation` (Buda et al. 2019; TCIA TCGA-LGG), licence CC BY-NC-SA 4.0: the model
inherits the non-commercial, share-alike terms. {train} training patients, {val} validation patients
(patient-level split, seed 0): {val_ids}.

## Hyperparameters
```json
{hp}
```

## Validation metrics (post-processing as recorded in config.json)
| metric | value |
| --- | --- |
{metrics}

## Limitations
Trained on one public collection (TCIA, five institutions, 1.5T/3T); not validated on other
scanners, sequences, paediatric or high-grade tumours. Validation on 11 patients is a small sample.
"""

if __name__ == "__main__":
    sys.exit(main())
