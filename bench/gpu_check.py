"""GPU acceptance run: everything a GPU must prove, in one command of at most 8 minutes, without Ray.

Needs core's dependencies only (torch, monai, tifffile, numpy; a JPEG-XL decoder for the real data:
imagecodecs or pillow-jxl-plugin, see ../shared/data/lgg/README.md). In order:

1. data: the real LGG set restored (``restore.py --pack gpu``, 99 patients) and prepared (88/11 split);
   kept under --work, so a second run skips it;
2. train: core's Trainer on it at 256 px with bf16 autocast: finite loss every epoch, val dsc_volume
   rising, the split resident on the device;
3. sharing: K = 1, 2, 4 trial processes training on the one device at once, as fractional-GPU trials
   do: trial-epochs per hour against K = 1, and each trial's peak memory;
4. predictor: the trained bundle's Predictor on the device by batch size (slices/s, uint8 in, masks out);
5. pipeline: bench/train_pipeline.py's gliomaseg vs earlier-study (MONAI CacheDataset) pipelines, on the
   same real TIFFs.

Writes bench/results/gpu-check-<device>.json (``--smoke``: gpu-check-smoke-<device>.json; ``--out`` elsewhere).

    python bench/gpu_check.py --device cuda
    python bench/gpu_check.py --device cpu --smoke --out /tmp/gpu-check   # same paths, tiny: < 3 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import ROOT, LoadSampler, fmt, row, sync, timed_repeats
from lgg_data import LGG, real_data

BUDGET_S = 480.0  # the 8 minutes, for the whole command
def peak_memory_mib(device: Any) -> dict[str, float]:
    """Peak device memory (CUDA allocator) and peak resident host memory of this process, in MiB."""
    import torch

    out = {"host_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.device(device).type == "cuda":
        out["cuda_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["cuda_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


def train_config(args: argparse.Namespace, epochs: int, seed: int) -> Any:
    from core.config import TrainConfig

    # The earlier study's baseline (UNet 32, lr 1.09e-3, batch 16, dropout 0.02) unless told otherwise.
    return TrainConfig(arch=args.arch, filters=args.filters, batch_size=args.batch_size, lr=1.09e-3,
                       dropout=0.02, epochs=epochs, patience=0, seed=seed, device=args.device, amp=True,
                       image_size=args.image_size, postprocess="none", tta="none")


def capped(split: Any, n: int) -> Any:
    """The first ``n`` slices of a split (all when n is 0): a bounded epoch for timing runs."""
    import numpy as np

    return split if not n or n >= len(split) else split.select(np.arange(n))


# ---- 2. train ------------------------------------------------------------------------------------------
def train(args: argparse.Namespace, prepared: Path, out: Path) -> tuple[dict[str, Any], Path]:
    """Real-data epochs with core's Trainer; returns figures and the best epoch's bundle."""
    import torch

    from core.data.arrays import load_split, load_split_info
    from core.inference.resize import normalise
    from core.runtime import autocast
    from core.training.trainer import Trainer

    cfg = train_config(args, args.epochs, args.seed)
    trainer = Trainer(cfg, capped(load_split(prepared, "train"), args.train_slices), load_split(prepared, "val"),
                      load_split_info(prepared))
    x, _, stats = trainer.train_data.batch(torch.arange(min(2, len(trainer.train_data)), device=trainer.device))
    with torch.no_grad(), autocast(trainer.device, cfg.amp):
        dtype = trainer.model.eval()(normalise(x, stats)).dtype  # bfloat16 proves autocast is on (float32 on a CPU)
    t0 = time.perf_counter()
    trainer.fit()
    sync(trainer.device)
    seconds = time.perf_counter() - t0
    epochs = [{k: h[k] for k in ("epoch", "train_loss", "dsc_volume", "dice_tumour", "epoch_seconds")}
              for h in trainer.history]
    dsc = [e["dsc_volume"] for e in epochs]
    figures = {
        "epochs": epochs, "seconds": seconds, "train_slices": len(trainer.train_data),
        "val_slices": len(trainer.val_data), "image_size": list(trainer.image_size),
        "data_device": str(trainer.train_data.images.device), "autocast_dtype": str(dtype).replace("torch.", ""),
        "loss_finite": all(math.isfinite(e["train_loss"]) for e in epochs),
        # Rising: a later epoch beats the first (one epoch cannot show it).
        "dsc_rising": (max(dsc[1:]) > dsc[0]) if len(dsc) > 1 else None,
        "peak_memory": peak_memory_mib(trainer.device),
    }
    bundle = trainer.export_bundle(out / "bundle", name="gpu-check")
    return figures, bundle


# ---- 3. sharing ----------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    """One trial process: build, one warm-up epoch, wait at the barrier, time --trial-epochs epochs."""
    import torch

    from core.data.arrays import load_split, load_split_info

    if args.threads:
        torch.set_num_threads(args.threads)
    from core.training.trainer import Trainer

    prepared = Path(args.prepared)
    trainer = Trainer(train_config(args, args.trial_epochs + 1, args.seed),
                      capped(load_split(prepared, "train"), args.trial_slices), load_split(prepared, "val"),
                      load_split_info(prepared))
    trainer.train_epoch()
    trainer.validate()
    Path(args.result + ".ready").touch()
    while not Path(args.barrier).exists():
        time.sleep(0.02)
    stamps, losses = [], []
    for _ in range(args.trial_epochs):
        t0 = time.time()
        losses.append(trainer.train_epoch()["train_loss"])
        trainer.validate()
        sync(trainer.device)
        stamps.append((t0, time.time()))
    Path(args.result).write_text(json.dumps({"stamps": stamps, "losses": losses,
                                             "peak_memory": peak_memory_mib(trainer.device)}))


def launch(args: argparse.Namespace, prepared: Path, k: int, tmp: Path) -> list[subprocess.Popen]:
    """K trial processes; each builds, warms up and waits for ``tmp/go-K`` (see ``worker``)."""
    threads = args.threads or (0 if args.device.startswith("cuda") else 1)
    sizes = ("device", "arch", "filters", "batch_size", "image_size", "trial_epochs", "trial_slices")
    flags = [a for n in sizes for a in (f"--{n.replace('_', '-')}", str(getattr(args, n)))]
    return [subprocess.Popen(
        [sys.executable, __file__, "--worker", "--prepared", str(prepared), "--result", str(tmp / f"k{k}-{i}.json"),
         "--barrier", str(tmp / f"go-{k}"), "--threads", str(threads), "--seed", str(args.seed + i), *flags],
        env={**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}) for i in range(k)]


def measure(k: int, procs: list[subprocess.Popen], tmp: Path, deadline: float) -> dict[str, Any]:
    """Release one group's K trials at once; trial-epochs per hour from the barrier to the last end."""
    start = time.time()
    (tmp / f"go-{k}").touch()
    for p in procs:
        if p.wait(timeout=max(1.0, deadline - time.monotonic())):
            raise RuntimeError(f"K={k}: a trial process exited with {p.returncode}")
    trials = [json.loads((tmp / f"k{k}-{i}.json").read_text()) for i in range(k)]
    stamps = [s for t in trials for s in t["stamps"]]
    span = max(e for _, e in stamps) - start
    return {"k": k, "trial_epochs": len(stamps), "span_s": span, "trial_epochs_per_hour": 3600 * len(stamps) / span,
            "mean_epoch_s": sum(e - s for s, e in stamps) / len(stamps),
            "loss_finite": all(math.isfinite(v) for t in trials for v in t["losses"]),
            "peak_memory_per_trial": [t["peak_memory"] for t in trials]}


def sharing(args: argparse.Namespace, prepared: Path, work: Path, load: LoadSampler) -> dict[str, Any]:
    """Every group launched at once (process start, data copy and warm-up overlap, which saves minutes of
    the budget), then released one group at a time; the others sit idle at their barriers meanwhile."""
    import shutil

    tmp = work / "sharing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    groups = {int(k): launch(args, prepared, int(k), tmp) for k in args.ks.split(",")}
    procs = [p for group in groups.values() for p in group]
    deadline = time.monotonic() + args.timeout
    by_k: dict[str, dict[str, Any]] = {}
    try:
        while not all((tmp / f"k{k}-{i}.json.ready").exists() for k in groups for i in range(k)):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("a trial process failed or timed out before its barrier")
            time.sleep(0.05)
        load.mark("trials ready")
        for k, group in groups.items():
            by_k[str(k)] = measure(k, group, tmp, deadline)
            load.mark(f"K={k}")
            print(f"K={k}: {by_k[str(k)]['trial_epochs_per_hour']:.0f} trial-epochs/h", flush=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    base = by_k["1"]["trial_epochs_per_hour"]
    for r in by_k.values():
        r["ratio_vs_k1"] = r["trial_epochs_per_hour"] / base
    best = max(by_k.values(), key=lambda r: r["ratio_vs_k1"])
    threads = args.threads or (0 if args.device.startswith("cuda") else 1)  # 0: torch's default
    return {"by_k": by_k, "best_k": best["k"], "best_ratio": best["ratio_vs_k1"], "threads_per_trial": threads}


# ---- 4. predictor --------------------------------------------------------------------------------------
def predictor(args: argparse.Namespace, bundle: Path, prepared: Path) -> dict[str, Any]:
    """Slices/s of the Predictor (host uint8 slices in, masks out) by batch size."""
    import numpy as np

    from core.data.arrays import load_split
    from core.inference.predictor import Predictor

    val = load_split(prepared, "val")
    images = np.ascontiguousarray(val.images[: args.predict_slices].transpose(0, 2, 3, 1))
    by_batch = {}
    for b in (int(v) for v in args.batch_sizes.split(",")):
        model = Predictor.from_bundle(bundle, device=args.device, batch_size=b)
        model.predict(images[:b])  # warm-up: kernels, allocator
        times = timed_repeats(lambda m=model: m.predict(images), 1, 5, args.min_seconds, args.device)
        best = min(times)
        by_batch[str(b)] = {"slices_per_s": len(images) / best, "seconds": times, "device": str(model.device)}
    top = max(by_batch, key=lambda b: by_batch[b]["slices_per_s"])
    return {"slices": len(images), "by_batch": by_batch, "best_batch": int(top),
            "best_slices_per_s": by_batch[top]["slices_per_s"]}


# ---- 5. pipeline ---------------------------------------------------------------------------------------
def pipeline(args: argparse.Namespace, tiffs: Path, prepared: Path) -> dict[str, Any]:
    import train_pipeline

    settings = argparse.Namespace(
        device=args.device, arch=args.arch, filters=args.filters, size=256, crop=0, batch=args.batch_size,
        patients=0, slices=0, workers=args.workers, rounds=args.rounds, steps=args.steps, warmup=1,
        no_amp=False, seed=args.seed, threads=0 if args.device.startswith("cuda") else 1)
    made = train_pipeline.synthetic_prepared
    # run() makes its own synthetic set through this; hand it the real TIFFs and arrays instead.
    train_pipeline.synthetic_prepared = lambda *a, **k: (tiffs, prepared)
    try:
        result = train_pipeline.run(settings)
    finally:
        train_pipeline.synthetic_prepared = made
    return {k: result[k] for k in ("settings", "setup", "figures", "speedup_gliomaseg_over_study")}


# ---- the run -------------------------------------------------------------------------------------------
def check(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here (use --device cpu --smoke for the path check)")
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads or 1)  # as a 1-CPU trial; a shared CPU stalls more threads
    load, t0, timings = LoadSampler(), time.perf_counter(), {}
    work = Path(args.work)
    tiffs, prepared, data_times = real_data(args)
    timings.update(data_times)
    load.mark("data")

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        t1 = time.perf_counter()
        yield
        timings[f"{name}_s"] = time.perf_counter() - t1
        load.mark(name)
        print(f"{name} done in {timings[f'{name}_s']:.0f} s", flush=True)

    results: dict[str, Any] = {}
    with phase("train"):
        results["train"], bundle = train(args, prepared, work / "run")
    with phase("sharing"):
        results["sharing"] = sharing(args, prepared, work, load)
    with phase("predictor"):
        results["predictor"] = predictor(args, bundle, prepared)
    with phase("pipeline"):
        results["pipeline"] = pipeline(args, tiffs, prepared)
    timings["total_s"] = time.perf_counter() - t0
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k not in ("worker", "prepared", "result", "barrier")}
    return {"settings": settings,
            "smoke": args.smoke, "timings": timings, **results, "load": load.summary(),
            **verdict(results, timings, args.device.startswith("cuda"))}


def verdict(r: dict[str, Any], timings: dict[str, float], on_gpu: bool) -> dict[str, Any]:
    """The met flags and the summary rows of bench/README.md's table (GPU targets: n/a on a CPU)."""
    tr, sh, pr, pl = r["train"], r["sharing"], r["predictor"], r["pipeline"]
    e = tr["epochs"]
    dsc = " -> ".join(f"{x['dsc_volume']:.3f}" for x in e)
    trained = tr["loss_finite"] and bool(tr["dsc_rising"]) and tr["autocast_dtype"] == "bfloat16"
    speedup = pl["speedup_gliomaseg_over_study"]
    met = {"train": trained if on_gpu else None, "sharing": sh["best_ratio"] >= 3.0 if on_gpu else None,
           "pipeline": speedup >= 10.0 if on_gpu else None, "budget": timings["total_s"] <= BUDGET_S}
    k_text = ", ".join(f"K={k}: {fmt(v['ratio_vs_k1'])}x" for k, v in sh["by_k"].items())
    mem = {k: max(m.get("cuda_reserved_mib", m["host_rss_mib"]) for m in v["peak_memory_per_trial"])
           for k, v in sh["by_k"].items()}
    limits = "see figures" if on_gpu else "CPU path check (--smoke): tiny data, not a performance figure"
    summary = [
        row(f"real-data training, {tr['image_size'][0]} px, {tr['autocast_dtype']}",
            "finite loss, val dsc_volume rising, bf16 (GPU)",
            f"loss {fmt(e[0]['train_loss'])} -> {fmt(e[-1]['train_loss'])}; dsc_volume "
            f"{dsc}; {fmt(tr['seconds'] / len(e))} s/epoch",
            met["train"], limits),
        row("trial-epochs/hour, K trials sharing the device vs K=1", ">= 3x at best K (GPU)",
            f"{fmt(sh['best_ratio'])}x at K={sh['best_k']} ({k_text}); peak memory per trial (MiB) "
            + ", ".join(f"K={k}: {fmt(v, 4)}" for k, v in mem.items()), met["sharing"], limits),
        row("Predictor slices/s by batch size", "report (no target)",
            ", ".join(f"b={b}: {fmt(v['slices_per_s'])}" for b, v in pr["by_batch"].items()), None, limits),
        row("train samples/s, gliomaseg vs earlier study, real TIFFs", ">= 10x (GPU)",
            f"{fmt(speedup)}x ({fmt(pl['figures']['gliomaseg']['samples_per_s'])} vs "
            f"{fmt(pl['figures']['study']['samples_per_s'])} samples/s)", met["pipeline"], limits),
        row("wall time of the whole check", f"<= {BUDGET_S / 60:.0f} min", f"{timings['total_s'] / 60:.1f} min",
            met["budget"], "restore + prepare: " + f"{timings['restore_s'] + timings['prepare_s']:.0f} s"),
    ]
    return {"met": met, "summary": summary}


# name: (full run, --smoke, help); an option left out takes its column's value.
SIZES: dict[str, tuple[Any, Any, str]] = {
    "pack": ("gpu", "lossless", "gpu, lossless or synth (smoke: synth where the real data is absent)"),
    "patients": (0, 2, "restore the first N patients; 0 = all"),
    "arch": ("unet", "lite", "network"),
    "filters": (32, 8, "first-level filters"),
    "batch_size": (16, 4, "training batch"),
    "image_size": (0, 64, "training resolution; 0 = the data's 256 px"),
    "epochs": (5, 2, "epochs of the training proof"),
    "train_slices": (0, 32, "cap on its training slices; 0 = all"),
    "ks": ("1,2,4", "1,2", "trial processes sharing the device (must include 1, the baseline)"),
    "trial_epochs": (2, 1, "timed epochs per trial"),
    "trial_slices": (1024, 16, "training slices per trial"),
    "batch_sizes": ("1,8,32,64,128", "1,8", "Predictor batch sizes"),
    "predict_slices": (256, 16, "val slices per Predictor timing"),
    "min_seconds": (2.0, 0.0, "seconds per Predictor point"),
    "workers": (8, 1, "DataLoader workers of the earlier study's pipeline"),
    "rounds": (3, 1, "train-pipeline rounds"),
    "steps": (10, 2, "train-pipeline steps per pipeline and round"),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny run of the same paths (the second defaults)")
    p.add_argument("--out", type=Path, default=None, help="where the JSON goes (default bench/results)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu-check", help="data, bundle, scratch")
    p.add_argument("--lgg", type=Path, default=LGG, help="folder with restore.py and the packs")
    for name, (full, smoke, text) in SIZES.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(full), help=f"{text} (default {full}; smoke {smoke})")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: 1 on CPU)")
    p.add_argument("--timeout", type=float, default=420.0, help="limit on the K-sharing part")
    p.add_argument("--seed", type=int, default=0)
    for hidden in ("--prepared", "--result", "--barrier"):  # a trial process of the sharing part
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, values in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, values[1] if args.smoke else values[0])
    if args.smoke and args.pack == "lossless" and not (args.lgg / "restore.py").is_file():
        args.pack = "synth"
    if args.pack not in ("gpu", "lossless", "synth") or "1" not in args.ks.split(","):
        p.error("--pack must be gpu, lossless or synth, and --ks must include 1")
    return args


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    from bench.machine import write_result

    result = check(args)
    path = write_result("gpu-check-smoke" if args.smoke else "gpu-check", result, args.out)
    for line in result["summary"]:
        print(f"{line['metric']}: {line['measured']} (met: {line['met']})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
