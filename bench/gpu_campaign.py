"""The study's fold training at full size, in one command on a lent GPU machine, without Ray.

`python -m tune study` trains its K fold models as Ray Tune trials; on the CPU that takes hours at the
lite-16 / 128 px size. This script trains the same folds (the study's folds.json, its configuration with the
study's fixed settings: keep the last epoch, no early stopping, no TTA or post-processing) with core's
Trainer at GPU size (U-Net 32, 256 px, 50 epochs, bf16 autocast), all folds at once on the one GPU, one
spawned process each, within a wall-clock budget. It imports torch, MONAI, nibabel (core.bundle needs it),
numpy, tifffile, Pillow and a JPEG-XL decoder, never Ray, whose 79 MB wheel cannot be carried there.

1. here, on the CPU: ``--make-pack DIR`` writes what the GPU machine needs and lacks: the pool's patients
   of ../shared/data/lgg/gpu-pack.zip (the 20 test patients of bench/results/real-lgg-test-split.json
   left out), restore.py, data.csv, the study's folds.json and the wheels (monai, nibabel,
   pillow-jxl-plugin for Python 3.12 on x86-64);
2. there: ``--carry DIR --out OUT`` restores and prepares the pool, trains every fold and writes OUT/folds.json,
   OUT/fold<k>.zip (one fp16 bundle each: a `run` call brings back at most 8 files of 16 MiB) and
   OUT/timing.json (samples/s, peak GPU memory, epochs, wall and CPU seconds per fold, the device, versions,
   the configuration);
3. here again: ``--unpack BACK --out DIR`` lays the bundles out as DIR/folds.json, DIR/timing.json and
   DIR/fold<k>/{config.json,model.safetensors,metrics.json}, each loaded and checked, for
   ``python -m tune study --folds-from DIR``.

    python bench/gpu_campaign.py --make-pack runs/gpu-carry                 # here (make gpu-campaign-pack)
    python3 bench/gpu_campaign.py --carry runs/gpu-carry --out "$OUT"       # there (make gpu-campaign)
    python bench/gpu_campaign.py --unpack /work/.device/.../ --out runs/gpu-campaign
    python bench/gpu_campaign.py --smoke --out /tmp/gc-out --work /tmp/gc-work   # the same path on the CPU: < 3 min
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import sys
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import ROOT  # first: it puts the repository on sys.path
from gpu_carry import BUNDLE_FILES, make_pack, unpack, write_carry
from lgg_data import LGG, restore

from core.io import read_json, write_json

MiB = 2**20
BUDGET_S = 520.0  # the whole script: with the wheels' install and start-up, under the issue's 9 minutes
EXPORT_RESERVE_S = 40.0  # no epoch starts that would end later than this before the budget: export and zip
PACK_RESERVE_S = 12.0  # a fold process still running this close to the budget is stopped
BACK_FILES, BACK_FILE_BYTES, BACK_TOTAL_BYTES = 8, 16 * MiB, 64 * MiB  # what one `run` call brings back
CARRY = ROOT / "runs" / "gpu-carry"
TEST_SPLIT = ROOT / "bench" / "results" / "real-lgg-test-split.json"
STUDY_CONFIG = ROOT / "tune" / "studies" / "lgg-lite16.yaml"
GPU_SIZE = {"arch": "unet", "filters": 32, "image_size": 256, "epochs": 50, "amp": True}
SMOKE_SIZE = {"arch": "lite", "filters": 8, "image_size": 64, "epochs": 2, "batch_size": 4, "eval_batch_size": 16}
SMOKE_BUDGET_S, SMOKE_PATIENTS, SMOKE_FOLDS = 170.0, 4, 2


# ---- 2. the campaign (there) ----------------------------------------------------------------------------
def pool_data(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, float]]:
    """The pool restored from the carried pack (synthesised for a smoke without the real data) and prepared
    whole (no val, no test: the folds split it); both kept under ``work``, so a second run skips them."""
    from core.data.prepare import SplitOptions, prepare

    tiffs, prepared = work / "kaggle_3m", work / "prepared"
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if not (tiffs / "data.csv").is_file():
        if args.carry is None:
            from core.data.synth import synthesize

            synthesize(work, patients=SMOKE_PATIENTS, slices=12, size=64, seed=args.seed)
        else:
            restore(Path(args.carry), work, "gpu", 0)  # in parallel, restore.py's own decoding
    times["restore_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not (prepared / "split.json").is_file():
        prepare(tiffs, prepared, SplitOptions(val=0, test=0, seed=args.seed), progress=False)
    times["prepare_s"] = time.perf_counter() - t0
    return prepared, times


def campaign_folds(args: argparse.Namespace, prepared: Path) -> list[list[str]]:
    """The folds file's folds (as given), or folds made as `tune cv` makes them; they must cover the pool."""
    import numpy as np

    from core.data.arrays import load_split, load_split_info
    from core.data.prepare import fold_patients

    pool = sorted(load_split_info(prepared)["patients"]["train"])
    if args.folds_file is not None:
        folds = [list(map(str, f)) for f in read_json(args.folds_file)["folds"]]
    else:
        train = load_split(prepared, "train")
        patients, tumour = np.asarray(train.patients).astype(str), train.tumour
        folds = fold_patients({p: float(tumour[patients == p].mean()) for p in pool}, args.folds, args.seed)
    if sorted(p for f in folds for p in f) != pool:
        raise SystemExit(f"{args.folds_file}: its folds do not cover the {len(pool)} restored patients exactly once "
                         f"(a pack changed since {prepared} was made? remove it)")
    return folds


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` options, each value read as YAML (numbers, booleans, strings)."""
    import yaml

    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def campaign_config(args: argparse.Namespace) -> Any:
    """The study's configuration file, at GPU size (or the smoke's), --set, then the study's fixed settings."""
    import yaml

    from core.config import TrainConfig

    values = yaml.safe_load(Path(args.config).read_text()) or {}
    values.update(SMOKE_SIZE if args.smoke else GPU_SIZE)
    values.update(parse_sets(args.set))
    from core.evaluation.oof import OUT_OF_FOLD_TRAINING

    values.update(OUT_OF_FOLD_TRAINING, device=args.device)
    return TrainConfig.from_dict(values)


def check_return_size(cfg: Any, folds: int) -> dict[str, Any]:
    """Each fold comes back as one zip of its fp16 bundle, beside folds.json and timing.json: fail before
    training if that cannot fit what a `run` call brings back."""
    from core.networks.models import build_model
    from core.training.trainer import preprocessing_from_config

    channels = len(preprocessing_from_config(cfg).channel_names)  # 3, or more with 2.5D context
    state = build_model(cfg.arch, channels, 1, cfg.filters, cfg.dropout).state_dict()
    params = sum(v.numel() for v in state.values())
    fold_bytes = sum(v.numel() * (2 if v.is_floating_point() else v.element_size()) for v in state.values())
    fold_bytes += 64 * 1024  # config.json, metrics.json, zip headers (deflate saves ~10% on fp16 weights)
    if folds + 2 > BACK_FILES or fold_bytes > BACK_FILE_BYTES or folds * fold_bytes > BACK_TOTAL_BYTES - MiB // 4:
        raise SystemExit(f"{folds} fold bundles of {fold_bytes / MiB:.1f} MiB cannot come back from a `run` call "
                         f"(at most {BACK_FILES} files of {BACK_FILE_BYTES // MiB} MiB, {BACK_TOTAL_BYTES // MiB} "
                         "MiB in all): fewer folds or a smaller network")
    return {"parameters": params, "fold_zip_mib_estimate": round(fold_bytes / MiB, 2)}


# ---- one fold, in its own process ------------------------------------------------------------------------
def shorten(trainer: Any, epochs: int) -> None:
    """Re-fit the run's warm-up + cosine schedule to ``epochs`` from the step it is at, so the weights it ends
    with are annealed rather than cut mid-schedule; its config, and so its bundle, records the epochs it ran."""
    from core.training.trainer import warmup_cosine

    trainer.cfg = trainer.cfg.replace(epochs=epochs)
    steps = trainer.steps_per_epoch
    trainer.scheduler.lr_lambdas[0] = warmup_cosine(trainer.cfg.warmup_epochs * steps, epochs * steps)


def budget_guard(stop_at: float, calibrate_after: int = 3) -> Callable[[Any, Any], None]:
    """An on_epoch callback keeping training inside the budget: after ``calibrate_after`` epochs (the first,
    with its kernel selection, left out of the estimate) a run whose remaining epochs would end after
    ``stop_at`` is shortened once to those that fit; after that no epoch starts that would end past it."""

    def on_epoch(result: Any, trainer: Any) -> None:
        recent = [h["epoch_seconds"] for h in trainer.history[1:][-3:]] or [trainer.history[-1]["epoch_seconds"]]
        if trainer.epoch == calibrate_after < trainer.cfg.epochs:  # with the margin the check below keeps
            fits = trainer.epoch + int((stop_at - time.time()) / (1.2 * max(recent)))
            if fits < trainer.cfg.epochs:
                shorten(trainer, max(fits, trainer.epoch + 1))
        if trainer.epoch >= trainer.cfg.epochs or time.time() + 1.2 * max(recent) > stop_at:
            trainer.should_stop = True

    return on_epoch


def export_fold(trainer: Any, path: Path, fold_info: dict[str, Any], stop_reason: str, planned: int) -> Path:
    """The fold's bundle with fp16 weights, as the study stores them: Trainer.export_bundle writes fp32, which
    is loaded and saved again half. metrics.json records the fold and exactly which patients trained it."""
    from core.bundle import load_bundle, save_bundle

    extra = {"fold": fold_info["fold"], "train_patients": fold_info["patients"]["train"],
             "val_patients": fold_info["patients"]["val"], "stop_reason": stop_reason, "epochs_planned": planned,
             "trained_by": "bench/gpu_campaign.py"}
    full = trainer.export_bundle(path.with_name(path.name + ".fp32"), name="gliomaseg-cv-fold", extra_metrics=extra)
    bundle = load_bundle(full)
    save_bundle(path, bundle.model, bundle.config, bundle.metrics, half=True)
    shutil.rmtree(full)
    return path


def peak_memory_mib(device: Any) -> dict[str, float]:
    """This process's peak device memory (CUDA allocator) and peak resident host memory, in MiB."""
    import torch

    out = {"host_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / MiB, 1)
        out["cuda_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / MiB, 1)
    return out


def fold_figures(trainer: Any, started: float, stop_reason: str) -> dict[str, Any]:
    """What timing.json keeps of one fold: epochs, seconds, samples/s, memory, the device, the history."""
    import torch

    history = trainer.history
    wall = sum(h["epoch_seconds"] for h in history)
    samples = trainer.epoch * trainer.steps_per_epoch * trainer.cfg.batch_size
    usage = resource.getrusage(resource.RUSAGE_SELF)
    device = trainer.device
    keys = ("epoch", "train_loss", "lr", "dsc_volume", "dice_tumour", "fp_slice_rate", "epoch_seconds",
            "epoch_cpu_seconds")
    return {
        "epochs": trainer.epoch, "stop_reason": stop_reason, "train_slices": len(trainer.train_data),
        "val_slices": len(trainer.val_data), "steps_per_epoch": trainer.steps_per_epoch,
        "wall_seconds": round(wall, 2), "process_wall_seconds": round(time.time() - started, 2),
        "epoch_cpu_seconds": round(sum(h["epoch_cpu_seconds"] for h in history), 2),
        "process_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "train_samples_per_s": round(samples / wall, 2) if wall else None,
        "peak_memory": peak_memory_mib(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "val_last": {m: history[-1].get(m) for m in ("dsc_volume", "dsc_volume_min", "dice_tumour", "fp_slice_rate")},
        "history": [{k: h.get(k) for k in keys} for h in history],
    }


def train_fold(job: dict[str, Any]) -> dict[str, Any]:
    """Fold ``job['fold']``: its data copied to the device once (the Trainer's DeviceDataset), trained until
    its epochs or the budget, exported as an fp16 bundle; returns its figures."""
    started = time.time()
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])  # before torch: this process's share of the CPUs
    import torch

    from core.config import TrainConfig
    from core.data.arrays import load_split, load_split_info
    from core.training.trainer import Trainer

    torch.set_num_threads(job["threads"])
    cfg = TrainConfig.from_dict(job["config"])
    if cfg.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed 256 px batches: pick the fastest kernels once
    prepared = Path(job["prepared"])
    train, val, fold_info = load_split(prepared, "train").fold(job["folds"], job["fold"], load_split_info(prepared))
    trainer = Trainer(cfg, train, val, fold_info)
    fit_started = time.time()
    trainer.fit(on_epoch=budget_guard(job["stop_at"]))
    fit_ended = time.time()
    # completed: every epoch of its schedule (shortened to the budget where epochs_planned says more)
    stop_reason = "completed" if trainer.epoch >= trainer.cfg.epochs else "budget"
    export_fold(trainer, Path(job["bundle"]), fold_info, stop_reason, cfg.epochs)
    return {"fold": job["fold"], **fold_figures(trainer, started, stop_reason), "epochs_planned": cfg.epochs,
            "epochs_scheduled": trainer.cfg.epochs, "fit_started": fit_started,
            "fit_ended": fit_ended, "ray_imported": "ray" in sys.modules}


def run_fold(job: dict[str, Any]) -> None:
    """A spawned fold process: its figures, or its error, go to ``job['result']``."""
    try:
        result = train_fold(job)
    except Exception as exc:
        write_json(Path(job["result"]), {"fold": job["fold"], "error": f"{type(exc).__name__}: {exc}",
                                         "traceback": traceback.format_exc()[-4000:]})
        raise
    write_json(Path(job["result"]), result)


# ---- all folds ------------------------------------------------------------------------------------------
def launch_folds(jobs: list[dict[str, Any]], parallel: int, hard_stop: float) -> dict[int, int | None]:
    """Run the fold processes, ``parallel`` at a time (spawned: no CUDA state shared); any still running at
    ``hard_stop`` is stopped. Returns each fold's exit code (None: stopped)."""
    ctx = multiprocessing.get_context("spawn")
    pending, running, codes = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            running[job["fold"]] = ctx.Process(target=run_fold, args=(job,), name=f"fold{job['fold']}")
            running[job["fold"]].start()
        for k, proc in list(running.items()):
            if not proc.is_alive():
                proc.join()
                codes[k] = proc.exitcode
                del running[k]
        if time.time() > hard_stop:
            for k, proc in running.items():
                print(f"fold {k}: still running at the budget; stopped", flush=True)
                proc.terminate()
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                codes[k] = None
            codes.update({job["fold"]: None for job in pending})
            break
        time.sleep(0.2)
    return codes


def fold_jobs(args: argparse.Namespace, cfg: Any, prepared: Path, folds: list[list[str]], work: Path,
              stop_at: float) -> list[dict[str, Any]]:
    """One picklable job per fold: where its data is, what it writes, when it must stop, its CPU threads."""
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    shutil.rmtree(work / "folds", ignore_errors=True)
    return [{"fold": k, "folds": folds, "config": cfg.to_dict(), "prepared": str(prepared), "threads": threads,
             "bundle": str(work / "folds" / f"fold{k}"), "result": str(work / "folds" / f"fold{k}.json"),
             "stop_at": stop_at} for k in range(len(folds))]


def fold_results(jobs: list[dict[str, Any]], codes: dict[int, int | None]) -> list[dict[str, Any]]:
    """Each fold's figures, or what went wrong (its error, or that the budget stopped it)."""
    out = []
    for job in jobs:
        path, k = Path(job["result"]), job["fold"]
        result = read_json(path) if path.is_file() else {"fold": k, "error": "stopped at the budget, or no result"}
        out.append({**result, "exit_code": codes.get(k)})
    return out


def pack_outputs(out: Path, results: list[dict[str, Any]], work: Path) -> dict[str, int]:
    """OUT/fold<k>.zip per exported fold (members fold<k>/config.json, model.safetensors, metrics.json)."""
    sizes = {}
    for old in out.glob("fold*.zip"):  # an earlier run's, in a reused OUT
        old.unlink()
    for r in results:
        bundle = work / "folds" / f"fold{r['fold']}"
        if "error" in r or not (bundle / "config.json").is_file():
            continue
        archive = out / f"fold{r['fold']}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in BUNDLE_FILES:
                zf.write(bundle / name, f"{bundle.name}/{name}")
        sizes[archive.name] = archive.stat().st_size
    return sizes


def environment(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The device (as a fold process saw it) and the library versions."""
    import platform
    from importlib.metadata import version

    import torch

    devices = sorted({r["device"] for r in results if "device" in r})
    return {"device": devices[0] if len(devices) == 1 else devices, "torch": torch.__version__,
            "cuda": torch.version.cuda, "monai": version("monai"), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "host": platform.node()}


def compute(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The study's compute figures (tune/study.py's keys), summed over the folds."""
    done = [r for r in results if "error" not in r]
    return {"training_process_cpu_seconds": round(sum(r["process_cpu_seconds"] for r in done), 1),
            "training_fold_wall_seconds": round(sum(r["wall_seconds"] for r in done), 1),
            "epochs": sum(r["epochs"] for r in done),
            "note": "process CPU seconds: each fold's whole process, all its threads, summed over folds; wall "
                    "seconds: each fold's epochs end to end, summed over folds (folds ran in parallel on one GPU)"}


def samples_per_s(done: list[dict[str, Any]], batch_size: int) -> float | None:
    """Training samples per second of all folds together, from the first fold's first epoch to the last
    fold's last (validation passes included): what the one device delivered."""
    if not done:
        return None
    samples = sum(r["epochs"] * r["steps_per_epoch"] * batch_size for r in done)
    return round(samples / (max(r["fit_ended"] for r in done) - min(r["fit_started"] for r in done)), 2)


def smoke_carry(args: argparse.Namespace, work: Path) -> None:
    """A smoke with the real data here restores a small pack of 4 lossless pool patients, as the GPU run
    restores its pack (without it, the smoke synthesises its patients)."""
    lgg = Path(args.lgg)
    if args.smoke and args.carry is None and (lgg / "lossless.zip").is_file():
        args.carry = work / "carry"
        if not (args.carry / "pack.json").is_file():
            write_carry(lgg / "lossless.zip", lgg, args.carry, args.test_split, None, SMOKE_PATIENTS, wheels=False)


def timing_record(args: argparse.Namespace, cfg: Any, info: dict[str, Any], data_times: dict[str, float],
                  results: list[dict[str, Any]], returned: dict[str, Any], started: float,
                  training_wall: float) -> dict[str, Any]:
    """timing.json: the device and versions, the configuration, per-fold figures and the totals."""
    done = [r for r in results if "error" not in r]
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return {
        "benchmark": "gpu-campaign-smoke" if args.smoke else "gpu-campaign", "smoke": args.smoke,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), **environment(results),
        "config": cfg.to_dict(), "config_file": str(args.config),
        "folds_file": str(args.folds_file) if args.folds_file else None,
        "budget_s": args.budget, "parallel": args.parallel,
        "data": {"patients": len(info["patients"]["train"]), "slices": info["counts"]["train"]["slices"],
                 **{k: round(v, 2) for k, v in data_times.items()}},
        "folds": results, "compute": compute(results), "returned": returned,
        "samples_per_s": samples_per_s(done, cfg.batch_size),
        "training_wall_s": round(training_wall, 2), "total_wall_s": round(time.time() - started, 2),
        "campaign_cpu_seconds": round(sum(u.ru_utime + u.ru_stime for u in usage), 1),
        "complete": len(done) == len(results) and all(r["epochs"] == r["epochs_planned"] for r in done),
        "ray_imported": "ray" in sys.modules or any(r.get("ray_imported") for r in done),
    }


def campaign(args: argparse.Namespace) -> dict[str, Any]:
    """Restore, prepare, train every fold in parallel within the budget, write OUT; returns timing.json."""
    t0, work, out = time.time(), Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    smoke_carry(args, work)
    cfg = campaign_config(args)
    prepared, data_times = pool_data(args, work / "data")
    folds = campaign_folds(args, prepared)
    returned = check_return_size(cfg, len(folds))
    args.parallel = min(args.parallel or len(folds), len(folds))
    jobs = fold_jobs(args, cfg, prepared, folds, work, t0 + args.budget - EXPORT_RESERVE_S)
    print(f"{len(folds)} folds, {args.parallel} at a time, {cfg.arch} "
          f"f{cfg.filters} {cfg.image_size} px, {cfg.epochs} epochs on {cfg.device}; data ready after "
          f"{time.time() - t0:.0f} s", flush=True)
    t_train = time.time()
    codes = launch_folds(jobs, args.parallel, t0 + args.budget - PACK_RESERVE_S)
    training_wall = time.time() - t_train
    results = fold_results(jobs, codes)
    info = read_json(prepared / "split.json")
    write_json(out / "folds.json", {"folds": folds, "seed": args.seed, "source": str(args.folds_file or "made here"),
                                    "pool_split_hash": info["split_hash"], "pool": sorted(info["patients"]["train"])})
    returned["files"] = pack_outputs(out, results, work)
    timing = timing_record(args, cfg, info, data_times, results, returned, t0, training_wall)
    write_json(out / "timing.json", timing)
    return timing


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--make-pack", type=Path, metavar="DIR", help="write the carry folder here (on the CPU)")
    mode.add_argument("--unpack", type=Path, metavar="BACK", help="lay out what came back from the GPU in --out")
    mode.add_argument("--smoke", action="store_true", help="the campaign's path on the CPU, tiny: < 3 minutes")
    p.add_argument("--carry", type=Path, help=f"the carry folder (make-pack's DIR), e.g. {CARRY.relative_to(ROOT)}")
    p.add_argument("--out", type=Path, help="the campaign's output folder (on the GPU: $OUT), or --unpack's")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu-campaign-work", help="data and fold bundles")
    p.add_argument("--lgg", type=Path, default=LGG, help="folder with restore.py and the packs")
    p.add_argument("--test-split", type=Path, default=TEST_SPLIT, help="split.json whose test patients stay out")
    p.add_argument("--folds-file", type=Path, help="the study's folds.json (default: the carry's, or the study's "
                                                   "runs/study-lgg/cv/folds.json for --make-pack)")
    p.add_argument("--folds", type=int, help="folds to make when no folds file is given (smoke: 2)")
    p.add_argument("--config", type=Path, default=STUDY_CONFIG, help="YAML of core train options")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    p.add_argument("--device", help="cuda (default), or cpu for --smoke")
    p.add_argument("--budget", type=float, help=f"seconds for the whole run (default {BUDGET_S:.0f}; smoke "
                                                f"{SMOKE_BUDGET_S:.0f})")
    p.add_argument("--parallel", type=int, default=0, help="fold processes at a time (0: all folds at once)")
    p.add_argument("--no-wheels", action="store_true", help="--make-pack without downloading the wheels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.budget = args.budget or (SMOKE_BUDGET_S if args.smoke else BUDGET_S)
    args.folds = args.folds or (SMOKE_FOLDS if args.smoke else 5)
    if args.folds_file is None and args.carry is not None and (args.carry / "folds.json").is_file():
        args.folds_file = args.carry / "folds.json"
    if (args.unpack or not args.make_pack) and args.out is None:
        p.error("--out is required")
    if not (args.make_pack or args.unpack or args.smoke or args.carry):
        p.error("give --carry DIR (the GPU run), --smoke, --make-pack DIR or --unpack BACK")
    return args


def main() -> None:
    args = parse()
    if args.make_pack:
        make_pack(args)
        return
    if args.unpack:
        for bundle in unpack(args.unpack, args.out):
            print(f"fold bundle {bundle}")
        print(f"next: python -m tune study --folds-from {args.out} ...")
        return
    timing = campaign(args)
    for r in timing["folds"]:
        print(f"fold {r['fold']}: " + (r["error"] if "error" in r else
              f"{r['epochs']} epochs ({r['stop_reason']}), {r['wall_seconds']:.0f} s, {r['train_samples_per_s']} "
              f"samples/s, val dsc_volume {r['val_last']['dsc_volume']:.3f}, peak {r['peak_memory']}"))
    print(f"{timing['samples_per_s']} samples/s over all folds; {timing['total_wall_s']:.0f} s in all; "
          f"wrote {args.out}")
    if any("error" in r for r in timing["folds"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
