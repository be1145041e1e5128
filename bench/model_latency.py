"""Forward latency and throughput by batch size for every architecture: eager PyTorch vs ONNX Runtime
on CPU, fp32 vs bf16 autocast on GPU (the AWS sample's U-Net vs ENet latency study, redone; `lite`
is this project's ENet-like small network).

Each network is a random-weight bundle, exported with serve/onnx_export.py (what edge users get); both
backends run the same graph (normalisation + network + sigmoid) on the same input, alternating
repeat by repeat. On CPU a batch size whose projected cost exceeds --point-budget-s is skipped and
recorded as such, so the default run stays a few minutes on a loaded 2-core machine.

    python bench/model_latency.py                                   # CPU: all archs, filters 16, 256 px
    python bench/model_latency.py --archs unet,lite --sizes 1,8
    python bench/model_latency.py --device cuda --filters 32 --point-budget-s 600
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from common import LoadSampler, add_threads_option, fmt, publish, random_bundle, resolve_threads, row, sync


def backends(args: argparse.Namespace, arch: str) -> tuple[dict[str, Callable[[np.ndarray], Any]], dict[str, Any]]:
    """name -> callable(batch float32 N,3,H,W of 0..255); plus export facts."""
    import torch

    from core.bundle import load_bundle
    from core.models import count_parameters
    from core.runtime import autocast
    from serve.onnx_export import ProbabilityModel, export_onnx
    path = random_bundle("latency", arch, args.filters, args.size)
    device = torch.device(args.device)
    loaded = load_bundle(path, device)
    module = ProbabilityModel(loaded.model.eval(), float(loaded.config["normalisation"]["scale"]), False).eval()
    facts: dict[str, Any] = {"parameters": count_parameters(loaded.model)}

    def eager(x: np.ndarray, amp: bool = False) -> Any:
        with torch.inference_mode(), autocast(device, amp):
            return module(torch.from_numpy(x).to(device)).float().cpu()

    if device.type == "cuda":
        return {"eager_fp32": eager, "eager_bf16": lambda x: eager(x, True)}, facts
    import onnxruntime as ort

    onnx_path = path.with_name(path.name + ".onnx")
    t0 = time.perf_counter()
    try:
        if not onnx_path.is_file():
            facts.update(export_onnx(path, onnx_path, verify=False))
        facts["export_s"] = time.perf_counter() - t0
    except Exception as exc:  # report and go on with eager only
        facts["export_error"] = f"{type(exc).__name__}: {exc}"[:300]
        return {"eager": eager}, facts
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the same thread count as eager
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return {"eager": eager, "onnxruntime": lambda x: session.run(None, {name: x})[0]}, facts


def measure_arch(args: argparse.Namespace, arch: str, sizes: list[int], load: LoadSampler) -> dict[str, Any]:
    fns, facts = backends(args, arch)
    rng = np.random.default_rng(0)
    points: dict[str, dict[str, Any]] = {}
    per_image: float | None = None
    for b in sizes:
        x = (rng.random((b, 3, args.size, args.size), dtype=np.float32) * 255).astype(np.float32)
        reps = args.reps if b <= 8 else max(1, args.reps - 1)
        if per_image is not None and per_image * b * reps * len(fns) > args.point_budget_s:
            points[str(b)] = {"skipped": f"projected {per_image * b * reps * len(fns):.0f} s > --point-budget-s"}
            continue
        times: dict[str, list[float]] = {k: [] for k in fns}
        if b <= 8:  # cheap warm-up of each backend at this shape
            for fn in fns.values():
                fn(x)
        for _ in range(reps):  # alternate backends, so load changes hit both
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
        point = {}
        for name, ts in times.items():
            med = float(np.median(ts))
            point[name] = {"latency_ms_median": 1000 * med, "latency_ms_min": 1000 * min(ts),
                           "images_per_s": b / med, "reps": len(ts)}
        first = next(iter(point))
        per_image = point[first]["latency_ms_median"] / 1000 / b
        if len(point) == 2:
            a, o = list(point)
            point["speedup_second_over_first"] = point[a]["latency_ms_median"] / point[o]["latency_ms_median"]
        points[str(b)] = point
        load.mark(f"{arch} b={b}")
        print(f"{arch} b={b}: " + ", ".join(f"{k} {v['latency_ms_median']:.0f} ms" for k, v in point.items()
                                            if isinstance(v, dict)), flush=True)
    return {**facts, "batches": points, "backends": list(fns)}


def summary_rows(args: argparse.Namespace, archs: dict[str, Any]) -> list[dict[str, Any]]:
    on_gpu = args.device.startswith("cuda")
    limits = "CPU: 2 cores shared with other jobs; conv throughput bound" if not on_gpu else "GPU"
    rows = []
    first = next(iter(archs.values()))["backends"][0]
    second = next(iter(archs.values()))["backends"][-1]
    for arch, res in archs.items():
        one = res["batches"].get("1", {})
        done = [b for b, p in res["batches"].items() if first in p]
        best_b = max(done, key=lambda b: res["batches"][b][first]["images_per_s"]) if done else None
        if not one or best_b is None:
            continue
        best = res["batches"][best_b]
        text = (f"b=1 {fmt(one[first]['latency_ms_median'])} ms {first}"
                + (f", {fmt(one[second]['latency_ms_median'])} ms {second}" if second != first else "")
                + f"; best {fmt(best[first]['images_per_s'])} img/s {first} at b={best_b}"
                + (f", {fmt(best[second]['images_per_s'])} img/s {second}" if second in best else ""))
        rows.append(row(f"forward latency/throughput, {arch} ({res['parameters'] / 1e6:.2f} M params)",
                        "report (no target)", text, None, limits))
    if "unet" in archs and "lite" in archs and "1" in archs["unet"]["batches"] and "1" in archs["lite"]["batches"]:
        ratio = (archs["unet"]["batches"]["1"][first]["latency_ms_median"]
                 / archs["lite"]["batches"]["1"][first]["latency_ms_median"])
        rows.append(row("U-Net vs lite (ENet's role) latency at batch 1", "report (no target)",
                        f"lite {fmt(ratio)}x faster ({first})", None, limits))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--archs", default="unet,attention_unet,segresnet,swin_unetr,lite")
    p.add_argument("--sizes", default="1,8,16,32,64", help="batch sizes")
    p.add_argument("--size", type=int, default=256, help="input height and width")
    p.add_argument("--filters", type=int, default=16, help="first-block filters (lite caps at 16)")
    p.add_argument("--reps", type=int, default=3, help="timed repeats at b<=8 (one fewer above)")
    p.add_argument("--point-budget-s", type=float, default=30.0,
                   help="skip a batch size projected to take longer than this (all backends, all repeats)")
    add_threads_option(p, "torch and ORT threads (one thread measures the compute on a shared CPU)")
    args = p.parse_args()
    import torch

    if resolve_threads(args):
        torch.set_num_threads(args.threads)
    load = LoadSampler()
    sizes = [int(s) for s in args.sizes.split(",")]
    archs = {a: measure_arch(args, a, sizes, load) for a in args.archs.split(",")}
    result = {
        "settings": {**vars(args), "threads_used": torch.get_num_threads()},
        "archs": archs,
        "load": load.summary(),
        "target": "none set by the issue: figures for choosing a serving architecture",
        "met": None,
        "summary": summary_rows(args, archs),
    }
    publish("model-latency", result)


if __name__ == "__main__":
    main()
