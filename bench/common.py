"""Helpers shared by the benchmark scripts: load sampling, timing, synthetic data, result summaries.

Imports no Ray, so the training and model benchmarks run on GPU machines without it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` from the repo root imports core/serve/tune
    sys.path.insert(0, str(ROOT))
CACHE = ROOT / "runs" / "bench"  # synthetic data and bundles (runs/ is git-ignored)


class LoadSampler:
    """Records ``os.getloadavg()`` at marks, so every figure carries the load it was measured under."""

    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = []
        self.mark("start")

    def mark(self, label: str) -> tuple[float, float, float]:
        load = os.getloadavg()
        self.samples.append({"at": label, "t": round(time.time(), 1), "loadavg": [round(v, 2) for v in load]})
        return load

    def summary(self) -> dict[str, Any]:
        one = [s["loadavg"][0] for s in self.samples]
        return {"cpu_count": os.cpu_count(), "loadavg_1m_min": min(one), "loadavg_1m_max": max(one),
                "loadavg_1m_mean": round(statistics.fmean(one), 2), "samples": self.samples}


def sync(device: Any) -> None:
    """Wait for queued GPU work (timers around CUDA work are otherwise meaningless)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def timed_repeats(fn: Callable[[], Any], min_reps: int, max_reps: int, min_seconds: float,
                  device: Any = "cpu") -> list[float]:
    """Seconds per call of ``fn``: at least ``min_reps`` calls, more until ``min_seconds`` or ``max_reps``."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def synthetic_prepared(patients: int, slices: int, size: int, seed: int = 0,
                       cache: Path = CACHE) -> tuple[Path, Path]:
    """(kaggle_3m TIFF folder, prepared folder) of a synthetic data set, made once and cached."""
    from core.data.prepare import SplitOptions, prepare
    from core.data.synth import synthesize

    base = cache / f"synth-p{patients}-s{slices}-{size}px-seed{seed}"
    tiffs, prepared = base / "kaggle_3m", base / "prepared"
    if not (tiffs / "data.csv").is_file():
        synthesize(base, patients=patients, slices=slices, size=size, seed=seed)
    if not (prepared / "split.json").is_file():
        prepare(tiffs, prepared, SplitOptions(val=0.2, test=0.1, seed=seed), progress=False)
    return tiffs, prepared


def random_bundle(prefix: str, arch: str, filters: int, size: int) -> Path:
    """A random-weight bundle under the cache (``<prefix>-<arch>-f<filters>-<size>px``), made once."""
    from tests.bundle_factory import make_random_bundle

    path = CACHE / f"{prefix}-{arch}-f{filters}-{size}px"
    if not (path / "config.json").is_file():
        make_random_bundle(path, arch=arch, filters=filters, size=(size, size))
    return path


def bundle_identity(path: str | Path) -> dict[str, Any]:
    """What a benchmark ran, as loaded: the bundle's version, architecture (members for an ensemble), input
    size and the sha256 of its config.json (which holds every other file's digest: one hash for the whole)."""
    import hashlib

    raw = (Path(path) / "config.json").read_bytes()
    config = json.loads(raw)
    members = config.get("members") or []
    return {"path": str(path), "version": config.get("version", "unknown"), "arch": config.get("arch"),
            "filters": config.get("model_args", {}).get("filters"),
            "members": [f"{m['arch']}-f{m['model_args'].get('filters')}-{m['image_size'][0]}px" for m in members],
            "image_size": config.get("image_size"), "config_sha256": hashlib.sha256(raw).hexdigest()}


def add_model_options(parser: argparse.ArgumentParser, arch: str, filters: int, size: int) -> None:
    """``--device``, ``--arch``, ``--filters`` and ``--size``: what every model benchmark runs on."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default=arch)
    parser.add_argument("--filters", type=int, default=filters)
    parser.add_argument("--size", type=int, default=size, help="slice size (height = width)")


def add_threads_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--threads``: ``help`` says what it sets; resolve it after parsing with ``resolve_threads``."""
    parser.add_argument("--threads", type=int, default=-1,
                        help=f"{help}; 0 = torch's default; default 1 on CPU, torch's default on CUDA")


def resolve_threads(args: argparse.Namespace) -> int:
    """The default -1 becomes 1 on CPU (a shared machine stalls multi-thread OpenMP steps whenever another
    job preempts a thread; it is also what Ray gives a 1-CPU trial or replica) and 0 on CUDA."""
    if args.threads < 0:
        args.threads = 0 if args.device.startswith("cuda") else 1
    return args.threads


def row(metric: str, target: str, measured: str, met: bool | None, limits: str) -> dict[str, Any]:
    """One line of bench/README.md's table (``met`` None: no target applies on this device)."""
    return {"metric": metric, "target": target, "measured": measured, "met": met, "limits": limits}


def fmt(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}") if value == value else value


def publish(name: str, result: dict[str, Any]) -> Path:
    """Write bench/results/<name>-<device>.json and print its summary lines."""
    from bench.machine import write_result

    path = write_result(name, result)
    for line in result["summary"]:
        print(f"{line['metric']}: {line['measured']}")
    print(f"load {result['load']['loadavg_1m_mean']} (1 min mean); wrote {path}")
    return path
