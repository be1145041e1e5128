"""Forward latency and throughput by batch size for every architecture: eager PyTorch vs ONNX Runtime
fp32 vs ONNX Runtime INT8 on CPU, fp32 vs bf16 autocast on GPU (the AWS sample's U-Net vs ENet latency
study, redone; `lite` is this project's ENet-like small network).

Each network is a random-weight bundle, exported with serve/onnx_export.py (what edge users get) and
quantized to static INT8 with serve/quantize.py, calibrated on --val's validation slices (a small
synthetic set without it); all backends run the same graph (normalisation + network + sigmoid) on the
same input, alternating repeat by repeat, and each is reported as a ratio against eager PyTorch in
the same run. On CPU a batch size whose projected cost exceeds --point-budget-s is skipped and
recorded as such, so the default run stays a few minutes on a loaded 2-core machine.

INT8's accuracy cost (issue 14: dsc_volume at most 0.01 below fp32) needs a trained model: with
``--bundle B --val PREPARED`` the fp32 and INT8 exports of B segment every patient of PREPARED's val
split through OnnxPredictor and both dsc_volume figures are reported, with their mask agreement.

    python bench/model_latency.py                                   # CPU: all archs, filters 16, 256 px
    python bench/model_latency.py --archs unet,lite --sizes 1       # the INT8 target: batch 1
    python bench/model_latency.py --archs unet,lite --sizes 1 --val runs/lgg-prepared --bundle runs/lgg/best
    python bench/model_latency.py --device cuda --filters 32 --point-budget-s 600
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    CACHE,
    LoadSampler,
    add_threads_option,
    bundle_identity,
    fmt,
    publish,
    random_bundle,
    resolve_threads,
    row,
    sync,
    synthetic_prepared,
)

INT8_TARGET = 1.5  # issue 14: INT8 ONNX at least 1.5x eager PyTorch at batch 1 on CPU (lite, unet)
DSC_DROP_TARGET = 0.01  # ... with dsc_volume at most 0.01 below fp32 on the real validation split
TARGET_ARCHS = ("lite", "unet")


def backends(args: argparse.Namespace, path: Path) -> tuple[dict[str, Callable[[np.ndarray], Any]], dict[str, Any]]:
    """name -> callable(batch float32 N,C,H,W of standardised input) for the bundle at ``path``; plus export
    facts (its identity, parameters, input shape)."""
    import torch

    from core.bundle import load_bundle
    from core.networks.models import count_parameters
    from core.runtime import autocast
    from serve.onnx_export import ProbabilityModel, export_onnx
    from serve.quantize import calibration_images, model_inputs, quantize_int8
    device = torch.device(args.device)
    loaded = load_bundle(path, device)
    module = ProbabilityModel(loaded.model.eval(), int(loaded.config["model_args"]["out_channels"]) > 1).eval()
    shape = [int(loaded.config["model_args"]["in_channels"]), *(int(v) for v in loaded.config["image_size"])]
    facts: dict[str, Any] = {"model": bundle_identity(path), "parameters": count_parameters(loaded.model),
                             "input_shape": shape}

    def eager(x: np.ndarray, amp: bool = False) -> Any:
        with torch.inference_mode(), autocast(device, amp):
            return module(torch.from_numpy(x).to(device)).float().cpu()

    if device.type == "cuda":
        return {"eager_fp32": eager, "eager_bf16": lambda x: eager(x, True)}, facts
    onnx_path = path.with_name(path.name + ".onnx")
    t0 = time.perf_counter()
    try:  # exported afresh each run: the figures are for what export-onnx writes now
        facts.update(export_onnx(path, onnx_path, verify=False))
        facts["export_s"] = time.perf_counter() - t0
    except Exception as exc:  # report and go on with eager only
        facts["export_error"] = f"{type(exc).__name__}: {exc}"[:300]
        return {"eager": eager}, facts
    fns: dict[str, Callable[[np.ndarray], Any]] = {"eager": eager, "onnx_fp32": _session(onnx_path)}
    quantized = {"onnx_int8": "static"} if args.int8 else {}
    if args.int8_dynamic:
        quantized["onnx_int8_dynamic"] = "dynamic"
    for backend, kind in quantized.items():
        out = path.with_name(f"{path.name}-{kind}-int8.onnx")
        t0 = time.perf_counter()
        try:
            calib = None
            if kind == "static":
                calib = model_inputs(calibration_images(args.calibration, args.calibration_slices), loaded.config)
            q = quantize_int8(onnx_path, out, calib)
            facts[backend] = {**q, "quantize_s": time.perf_counter() - t0, "bytes": out.stat().st_size}
            fns[backend] = _session(out)
        except Exception as exc:  # report and go on without it
            facts[backend] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return fns, facts


def _session(path: Path) -> Callable[[np.ndarray], Any]:
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the same thread count as eager
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def measure(args: argparse.Namespace, label: str, path: Path, sizes: list[int], load: LoadSampler) -> dict[str, Any]:
    """Every backend of the bundle at ``path`` at each batch size, alternated per repeat."""
    fns, facts = backends(args, path)
    rng = np.random.default_rng(0)
    points: dict[str, dict[str, Any]] = {}
    per_image: float | None = None
    for b in sizes:
        x = np.round(rng.random((b, *facts["input_shape"]), dtype=np.float32) * 255).astype(np.float32)
        reps = max(args.reps, args.reps_b1) if b == 1 else args.reps if b <= 8 else max(1, args.reps - 1)
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
        per_image = max(p["latency_ms_median"] for p in point.values()) / 1000 / b
        # ratios against the first backend (eager): median, and best repeat (less noisy on a shared machine)
        others = {k: v for k, v in point.items() if k != first}
        point[f"speedup_vs_{first}"] = {k: point[first]["latency_ms_median"] / v["latency_ms_median"]
                                        for k, v in others.items()}
        point[f"speedup_vs_{first}_min"] = {k: point[first]["latency_ms_min"] / v["latency_ms_min"]
                                            for k, v in others.items()}
        points[str(b)] = point
        load.mark(f"{label} b={b}")
        print(f"{label} b={b}: " + ", ".join(f"{k} {v['latency_ms_median']:.1f} ms" for k, v in point.items()
                                            if "latency_ms_median" in v), flush=True)
    return {**facts, "batches": points, "backends": list(fns)}


def int8_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """fp32 vs INT8 export of --bundle, each segmenting every patient of --val's val split (3D post-processing
    on), scored with core.evaluation.metrics; plus how far the two sets of masks agree."""
    from core.data.arrays import load_split
    from core.evaluation.metrics import segmentation_metrics
    from serve.edge import OnnxPredictor
    from serve.onnx_export import export_onnx

    val = load_split(args.val, "val")
    truth = np.asarray(val.masks)
    bundle = Path(args.bundle)
    out: dict[str, Any] = {"bundle": bundle_identity(bundle), "split": str(Path(args.val) / "val"), "slices": len(val),
                           "patients": len(val.patient_rows())}
    masks = {}
    for kind, quantize in (("fp32", "none"), ("int8", "int8")):
        path = Path(args.work) / f"{bundle.name}-{kind}.onnx"
        t0 = time.perf_counter()
        info = export_onnx(bundle, path, verify=False, quantize=quantize,
                           calibration=args.val if quantize == "int8" else None,
                           calibration_slices=args.calibration_slices)
        predictor = OnnxPredictor(path, batch_size=16, threads=args.threads or None)
        pred = np.zeros(truth.shape, np.uint8)
        for rows in val.patient_rows():
            pred[rows] = predictor.predict(np.asarray(val.images[rows]).transpose(0, 2, 3, 1), volume=True)
        masks[kind] = pred
        out[kind] = {"metrics": segmentation_metrics(pred, truth, val.patients, predictor.config["class_names"]),
                     "seconds": time.perf_counter() - t0, "bytes": info["bytes"],
                     **({"quantization": info["quantization"]} if "quantization" in info else {})}
    a, b = masks["fp32"] > 0, masks["int8"] > 0
    out["dsc_volume_drop"] = out["fp32"]["metrics"]["dsc_volume"] - out["int8"]["metrics"]["dsc_volume"]
    out["pixel_agreement"] = float((masks["fp32"] == masks["int8"]).mean())
    out["foreground_dice_fp32_vs_int8"] = float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))
    print(f"int8 accuracy: dsc_volume fp32 {out['fp32']['metrics']['dsc_volume']:.4f}, int8 "
          f"{out['int8']['metrics']['dsc_volume']:.4f}; tumour masks agree (Dice) "
          f"{out['foreground_dice_fp32_vs_int8']:.4f}", flush=True)
    return out


def summary_rows(args: argparse.Namespace, archs: dict[str, Any], accuracy: dict[str, Any] | None
                 ) -> list[dict[str, Any]]:
    on_gpu = args.device.startswith("cuda")
    limits = "CPU: 2 cores shared with other jobs; conv throughput bound" if not on_gpu else "GPU"
    rows = []
    first = next(iter(archs.values()))["backends"][0]
    for arch, res in archs.items():
        one = res["batches"].get("1", {})
        done = [b for b, p in res["batches"].items() if first in p]
        best_b = max(done, key=lambda b: res["batches"][b][first]["images_per_s"]) if done else None
        if not one or best_b is None:
            continue
        best = res["batches"][best_b]
        backends = res["backends"]
        text = ("b=1 " + ", ".join(f"{fmt(one[k]['latency_ms_median'])} ms {k}" for k in backends if k in one)
                + f"; best {fmt(best[first]['images_per_s'])} img/s {first} at b={best_b}"
                + "".join(f", {fmt(best[k]['images_per_s'])} img/s {k}" for k in backends[1:] if k in best))
        name = res["model"]["version"] if arch == "bundle" else arch
        rows.append(row(f"forward latency/throughput, {name} ({res['parameters'] / 1e6:.2f} M params)",
                        "report (no target)", text, None, limits))
        ratios = one.get(f"speedup_vs_{first}", {})
        if arch in TARGET_ARCHS and "onnx_int8" in ratios:
            best_rep = one[f"speedup_vs_{first}_min"]
            text = (f"INT8 {fmt(ratios['onnx_int8'])}x, fp32 ONNX {fmt(ratios['onnx_fp32'])}x eager (medians; best "
                    f"repeats {fmt(best_rep['onnx_int8'])}x, {fmt(best_rep['onnx_fp32'])}x); "
                    f"{fmt(one['onnx_int8']['latency_ms_median'])} ms INT8, "
                    f"{fmt(one[first]['latency_ms_median'])} ms eager")
            rows.append(row(f"INT8 ONNX vs eager PyTorch at batch 1, {arch} ({args.size} px)",
                            f">= {INT8_TARGET}x (issue 14)", text, ratios["onnx_int8"] >= INT8_TARGET, limits))
    if "unet" in archs and "lite" in archs and "1" in archs["unet"]["batches"] and "1" in archs["lite"]["batches"]:
        ratio = (archs["unet"]["batches"]["1"][first]["latency_ms_median"]
                 / archs["lite"]["batches"]["1"][first]["latency_ms_median"])
        rows.append(row("U-Net vs lite (ENet's role) latency at batch 1", "report (no target)",
                        f"lite {fmt(ratio)}x faster ({first})", None, limits))
    if accuracy:
        fp, q = accuracy["fp32"]["metrics"], accuracy["int8"]["metrics"]
        text = (f"dsc_volume fp32 {fp['dsc_volume']:.4f}, INT8 {q['dsc_volume']:.4f} "
                f"(drop {accuracy['dsc_volume_drop']:+.4f}); tumour masks fp32 vs INT8 Dice "
                f"{accuracy['foreground_dice_fp32_vs_int8']:.4f}; {accuracy['patients']} patients")
        rows.append(row(f"INT8 accuracy cost, {accuracy['bundle']['version']} on {accuracy['split']}",
                        f"dsc_volume drop <= {DSC_DROP_TARGET} (issue 14)", text,
                        accuracy["dsc_volume_drop"] <= DSC_DROP_TARGET, "one bundle; calibrated on this split"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--archs", default="unet,attention_unet,segresnet,swin_unetr,lite")
    p.add_argument("--sizes", default="1,8,16,32,64", help="batch sizes")
    p.add_argument("--size", type=int, default=256, help="input height and width")
    p.add_argument("--filters", type=int, default=16, help="first-block filters (lite caps at 16)")
    p.add_argument("--reps", type=int, default=3, help="timed repeats at b<=8 (one fewer above)")
    p.add_argument("--reps-b1", type=int, default=15, help="timed repeats at batch 1 (cheap, and the INT8 target)")
    p.add_argument("--point-budget-s", type=float, default=30.0,
                   help="skip a batch size projected to take longer than this (all backends, all repeats)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: also time the static INT8 ONNX model (default on)")
    p.add_argument("--int8-dynamic", action="store_true", help="CPU: also time dynamic INT8 (no calibration)")
    p.add_argument("--val", default=None, metavar="PREPARED",
                   help="prepared directory: its val slices calibrate INT8 (else a small synthetic set), and "
                        "with --bundle its val split measures INT8's dsc_volume cost")
    p.add_argument("--bundle", default=None, help="a trained bundle (e.g. pretrained/lgg) timed beside the archs, "
                   "at its own input size; with --val, also its fp32 vs INT8 accuracy")
    p.add_argument("--calibration-slices", type=int, default=64)
    add_threads_option(p, "torch and ORT threads (one thread measures the compute on a shared CPU)")
    args = p.parse_args()
    import torch

    if resolve_threads(args):
        torch.set_num_threads(args.threads)
    args.work = str(CACHE)
    CACHE.mkdir(parents=True, exist_ok=True)
    cpu = not args.device.startswith("cuda")
    if cpu and args.int8:  # calibration slices at the benchmark's input size
        args.calibration = args.val or str(synthetic_prepared(5, 16, args.size)[1])
    load = LoadSampler()
    sizes = [int(s) for s in args.sizes.split(",")]
    archs = {a: measure(args, a, random_bundle("latency", a, args.filters, args.size), sizes, load)
             for a in args.archs.split(",") if a}
    if args.bundle:  # the bundle itself (e.g. the shipped ensemble), at its own input size and channels
        archs["bundle"] = measure(args, "bundle", Path(args.bundle), sizes, load)
    accuracy = int8_accuracy(args) if args.bundle and args.val else None
    if accuracy:
        load.mark("int8 accuracy")
    rows = summary_rows(args, archs, accuracy)
    targets = [r["met"] for r in rows if r["met"] is not None]
    result = {
        "settings": {**vars(args), "threads_used": torch.get_num_threads()},
        "archs": archs,
        "int8_accuracy": accuracy,
        "load": load.summary(),
        "target": (f"issue 14: INT8 ONNX >= {INT8_TARGET}x eager PyTorch at batch 1 on CPU for "
                   f"{' and '.join(TARGET_ARCHS)}; dsc_volume drop <= {DSC_DROP_TARGET} on the real validation "
                   "split (--bundle/--val); other figures are for choosing a serving architecture"),
        "met": all(targets) if targets else None,
        "summary": rows,
    }
    publish("model-latency", result)


if __name__ == "__main__":
    main()
