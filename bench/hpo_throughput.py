"""HPO throughput: trial-epochs per hour for K trials sharing one device, and ASHA vs no early stopping.

Part 1 (core only, no Ray): K processes each run a core Trainer (train epoch + validation per epoch)
on the same device at once, as fractional-GPU Ray trials share a GPU; K=1 with every CPU thread is the
earlier study's one-trial-at-a-time baseline, measured first and last in the same run (load drifts).
Workers build, run one warm-up epoch, then wait at a barrier so imports and setup are not timed.

Part 2 (Ray Tune): `python -m tune run` twice with the same seed and TPE search, --scheduler asha and
none (patience off): total epochs spent, and the best validation dsc_volume each reached.

    python bench/hpo_throughput.py                                   # CPU defaults (a few minutes)
    python bench/hpo_throughput.py --device cuda --size 256 --filters 32 --patients 20 --total-epochs 96
    python bench/hpo_throughput.py --device cuda --skip-asha         # a GPU machine without Ray
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, LoadSampler, add_model_options, fmt, publish, row, synthetic_prepared

SPACE = """\
arch: unet
filters: {filters}
batch_size: 16
dropout: {{uniform: [0.0, 0.3]}}
lr: {{loguniform: [1.0e-4, 3.0e-2]}}
lambda_focal: {{loguniform: [0.1, 10.0]}}
patience: 0
"""


def worker(args: argparse.Namespace) -> None:
    """One trial: build a Trainer, warm up one epoch, wait for the barrier, time ``--epochs`` epochs."""
    import torch

    torch.set_num_threads(args.threads)
    from core.config import TrainConfig
    from core.training.trainer import Trainer

    prepared = Path(args.prepared)
    cfg = TrainConfig(arch=args.arch, filters=args.filters, batch_size=16, epochs=args.epochs + 1, patience=0,
                      seed=args.seed, device=args.device, postprocess="none")
    trainer = Trainer.from_prepared(cfg, prepared)
    trainer.train_epoch()
    trainer.validate()
    Path(args.out + ".ready").touch()
    go = Path(args.barrier)
    while not go.exists():
        time.sleep(0.02)
    stamps = []
    for _ in range(args.epochs):
        t0 = time.time()
        trainer.train_epoch()
        trainer.validate()
        stamps.append((t0, time.time()))
    Path(args.out).write_text(json.dumps({"stamps": stamps, "threads": args.threads}))


def run_k(args: argparse.Namespace, prepared: Path, k: int, tmp: Path, threads: int = 0) -> dict[str, Any]:
    """K concurrent trials (each ``threads`` or cores/K torch threads); trial-epochs/hour from barrier to end."""
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // k)
    barrier = tmp / f"go-{k}-{time.monotonic_ns()}"
    outs = [tmp / f"k{k}-{i}-{time.monotonic_ns()}.json" for i in range(k)]
    epochs = max(1, args.total_epochs // k)
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker", "--prepared", str(prepared), "--out", str(o),
                          "--barrier", str(barrier), "--threads", str(threads), "--epochs", str(epochs),
                          "--arch", args.arch, "--filters", str(args.filters), "--device", args.device,
                          "--seed", str(args.seed + i)],
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        for i, o in enumerate(outs)
    ]
    deadline = time.monotonic() + args.timeout
    while not all(Path(str(o) + ".ready").exists() for o in outs):
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise RuntimeError(f"K={k}: a worker failed or timed out before the barrier")
        time.sleep(0.05)
    start = time.time()
    barrier.touch()
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
        if p.returncode:
            raise RuntimeError(f"K={k}: worker exited with {p.returncode}")
    stamps = [s for o in outs for s in json.loads(o.read_text())["stamps"]]
    span = max(e for _, e in stamps) - start
    epoch_s = [e - s for s, e in stamps]
    return {"k": k, "threads_per_trial": threads, "trial_epochs": len(stamps), "span_s": span,
            "trial_epochs_per_hour": 3600 * len(stamps) / span, "mean_epoch_s": sum(epoch_s) / len(epoch_s)}


def sharing(args: argparse.Namespace, prepared: Path, load: LoadSampler) -> dict[str, Any]:
    ks = [int(k) for k in args.ks.split(",") if int(k) != 1]
    cores = os.cpu_count() or 1
    # Baselines first and last (the load moves under us): one trial with every core (the earlier
    # study's way) and, on a multi-core CPU, one single-thread trial (the per-trial share of Ray's
    # 1-CPU trials, and immune to OpenMP stalls when other jobs preempt a thread).
    base_keys = ["1"] + (["1t"] if cores > 1 and not args.device.startswith("cuda") else [])
    # Each K --repeats times between baselines: one run of a K is one noisy draw, so the ratio is the median.
    order = base_keys + ([str(k) for k in ks] + base_keys[::-1]) * args.repeats
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="hpo-bench-") as tmp:
        for key in order:
            r = run_k(args, prepared, int(key.rstrip("t")), Path(tmp), threads=1 if key == "1t" else 0)
            runs.setdefault(key, []).append(r)
            load.mark(f"K={key}")
            print(f"K={key}: {r['trial_epochs_per_hour']:.0f} trial-epochs/h", flush=True)
    rate = {key: statistics.median(r["trial_epochs_per_hour"] for r in rs) for key, rs in runs.items()}
    by_k = {}
    for key, rs in runs.items():
        ratios = [r["trial_epochs_per_hour"] / rate["1"] for r in rs]
        by_k[key] = {**rs[0], "trial_epochs_per_hour": rate[key], "runs": [r["trial_epochs_per_hour"] for r in rs],
                     "ratio_vs_one_at_a_time": statistics.median(ratios), "ratio_spread": [min(ratios), max(ratios)],
                     **({"ratio_vs_one_single_thread_trial": rate[key] / rate["1t"]} if "1t" in rate else {})}
    best = max((by_k[str(k)] for k in ks), key=lambda r: r["ratio_vs_one_at_a_time"])
    return {"baseline_trial_epochs_per_hour": rate["1"], "by_k": by_k, "best_k": best["k"],
            "best_ratio": best["ratio_vs_one_at_a_time"], "best_ratio_spread": best["ratio_spread"],
            "statistic": f"median over {args.repeats} run(s) of each K against the median baseline",
            "best_ratio_vs_single_thread_trial": best.get("ratio_vs_one_single_thread_trial")}


def tune_run(args: argparse.Namespace, prepared: Path, scheduler: str, storage: Path) -> dict[str, Any]:
    """One `python -m tune run`; returns total epochs, best objective and per-trial epochs."""
    space = storage / "space.yaml"
    space.write_text(SPACE.format(filters=args.filters))
    name = f"bench-{scheduler}"
    cmd = [sys.executable, "-m", "tune", "run", "--data", str(prepared), "--name", name, "--storage", str(storage),
           "--config", str(space), "--num-samples", str(args.samples), "--max-epochs", str(args.max_epochs),
           "--scheduler", scheduler, "--grace-period", str(args.grace), "--reduction-factor", "3",
           "--seed", str(args.seed), "--cpus-per-trial", str(args.cpus_per_trial), "--quiet",
           "--max-failures", "0"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"tune run --scheduler {scheduler} failed:\n{proc.stderr[-3000:]}")
    history = json.loads((storage / name / "history.json").read_text())
    trials = sorted(history, key=lambda t: t["trial_id"])  # ids end in a creation counter
    epochs = [int(t["epochs_run"]) for t in trials]
    objective = [float(t["objective"] or 0.0) for t in trials]
    return {"wall_s": wall, "trials": len(trials), "total_epochs": sum(epochs), "epochs_per_trial": epochs,
            "best_dsc_volume": max(objective), "objective_per_trial": objective,
            "stop_reasons": [t["stop_reason"] for t in trials]}


def epochs_to_reach(run: dict[str, Any], target: float) -> int | None:
    """Epochs spent (in trial creation order) until the first trial whose best reaches ``target``."""
    spent = 0
    for epochs, best in zip(run["epochs_per_trial"], run["objective_per_trial"], strict=True):
        spent += epochs
        if best >= target:
            return spent
    return None


def asha_vs_none(args: argparse.Namespace, prepared: Path, load: LoadSampler) -> dict[str, Any]:
    storage = Path(tempfile.mkdtemp(prefix="hpo-bench-tune-", dir=ROOT / "runs"))
    try:
        runs = {}
        for scheduler in ("none", "asha"):
            runs[scheduler] = tune_run(args, prepared, scheduler, storage)
            load.mark(f"tune {scheduler}")
            print(f"{scheduler}: {runs[scheduler]['total_epochs']} epochs, best "
                  f"{runs[scheduler]['best_dsc_volume']:.3f}", flush=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    none, asha = runs["none"], runs["asha"]
    target = none["best_dsc_volume"] - 0.01
    return {"runs": runs, "epoch_ratio": asha["total_epochs"] / max(1, none["total_epochs"]),
            "asha_within_0.01": asha["best_dsc_volume"] >= target, "target_dsc_volume": target,
            "epochs_to_target": {k: epochs_to_reach(v, target) for k, v in runs.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p, arch="unet", filters=8, size=64)
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--slices", type=int, default=16)
    p.add_argument("--ks", default="1,2,4,8", help="concurrent trials to compare with one at a time")
    p.add_argument("--repeats", type=int, default=2, help="runs of each K (interleaved with the baselines)")
    p.add_argument("--total-epochs", type=int, default=48,
                   help="timed trial-epochs per K run, split over its K trials (same work for every K)")
    p.add_argument("--samples", type=int, default=16, help="tune trials per scheduler")
    p.add_argument("--max-epochs", type=int, default=27)
    p.add_argument("--grace", type=int, default=1, help="ASHA grace period")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--skip-sharing", action="store_true")
    p.add_argument("--skip-asha", action="store_true", help="no Ray Tune part (machines without Ray)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per K run or tune run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)  # a worker's timed epochs
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    load = LoadSampler()
    _, prepared = synthetic_prepared(args.patients, args.slices, args.size, args.seed)
    on_gpu = args.device.startswith("cuda")
    result: dict[str, Any] = {"settings": vars(args), "summary": []}
    if not args.skip_sharing:
        share = result["sharing"] = sharing(args, prepared, load)
        result["summary"].append(row(
            "trial-epochs/hour, K trials sharing one device vs one at a time", ">= 3x at best K (GPU)",
            f"{fmt(share['best_ratio'])}x (median; runs {fmt(share['best_ratio_spread'][0])}-"
            f"{fmt(share['best_ratio_spread'][1])}x) at K={share['best_k']} vs one trial on all cores ("
            + ", ".join(f"K={k}: {fmt(v['ratio_vs_one_at_a_time'])}x" for k, v in share["by_k"].items()) + ")"
            + (f"; {fmt(share['best_ratio_vs_single_thread_trial'])}x vs one single-thread trial"
               if share.get("best_ratio_vs_single_thread_trial") else ""),
            share["best_ratio"] >= 3.0 if on_gpu else None,
            "CPU: K trials split the cores one trial could use (~1x expected on an idle machine); here other "
            "jobs preempt one of a 2-thread trial's OpenMP threads and stall it, which single-thread trials "
            "escape, so the ratio vs the all-core baseline overstates sharing" if not on_gpu else "GPU"))
    if not args.skip_asha:
        asha = result["asha"] = asha_vs_none(args, prepared, load)
        r = asha["runs"]
        met = asha["epoch_ratio"] <= 1 / 3 and asha["asha_within_0.01"]
        result["summary"].append(row(
            "epochs spent, ASHA vs no early stopping (same best dsc_volume within 0.01)", "<= 1/3",
            f"{fmt(asha['epoch_ratio'])} ({r['asha']['total_epochs']} vs {r['none']['total_epochs']} epochs; "
            f"best {r['asha']['best_dsc_volume']:.3f} vs {r['none']['best_dsc_volume']:.3f})", met,
            f"{args.samples} trials x {args.max_epochs} epochs, grace {args.grace}, reduction 3: few trials "
            "and an easy synthetic task (many configurations reach the same best) limit what ASHA can prune"))
    result["load"] = load.summary()
    result["target"] = {"sharing_ratio_min": 3.0, "asha_epoch_ratio_max": 1 / 3}
    result["met"] = {line["metric"]: line["met"] for line in result["summary"]}
    publish("hpo-throughput", result)


if __name__ == "__main__":
    main()
