"""The real LGG data for benchmarks: restored from ../shared/data/lgg (in parallel) and prepared, once per
folder. restore.py decodes serially; the JPEG-XL pack takes about 2 CPU-minutes for 99 patients.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import time
import types
import zipfile
from pathlib import Path

from common import ROOT

LGG = next((p for p in (ROOT.parent / "shared" / "data" / "lgg", ROOT / "shared" / "data" / "lgg")
            if (p / "restore.py").is_file()), ROOT.parent / "shared" / "data" / "lgg")


# ---- 1. data -------------------------------------------------------------------------------------------
def real_data(args: argparse.Namespace) -> tuple[Path, Path, dict[str, float]]:
    """(kaggle_3m folder, prepared folder, seconds per step): restored and prepared once per --work."""
    from core.data.prepare import SplitOptions, prepare

    work = Path(args.work) / f"{args.pack}-p{args.patients or 'all'}"
    tiffs, prepared = work / "kaggle_3m", work / "prepared"
    times = {"restore_s": 0.0, "prepare_s": 0.0}
    t0 = time.perf_counter()
    if not (tiffs / "data.csv").is_file():
        if args.pack == "synth":
            from core.data.synth import synthesize

            synthesize(work, patients=args.patients or 4, slices=12, size=256, seed=args.seed)
        else:
            restore(Path(args.lgg), work, args.pack, args.patients)
    times["restore_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not (prepared / "split.json").is_file():
        patients = sum(1 for d in tiffs.iterdir() if d.is_dir())
        # The earlier study's 88/11 split of 99 patients; 1 val patient when there are only a few.
        prepare(tiffs, prepared, SplitOptions(val=11 if patients > 20 else 1, test=0, seed=args.seed), progress=False)
    times["prepare_s"] = time.perf_counter() - t0
    return tiffs, prepared, times


def _restore_part(lgg: str, out: str, pack: str, patients: list[str]) -> int:
    """restore.py's own ``restore()`` over a subset of the pack's patients (one process of a pool)."""
    spec = importlib.util.spec_from_file_location("lgg_restore", Path(lgg) / "restore.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    keep = set(patients)

    class Subset(zipfile.ZipFile):
        def namelist(self) -> list[str]:  # restore() takes the pack's patients from this list
            return [n for n in super().namelist() if n.split("/")[0] in keep]

    module.zipfile = types.SimpleNamespace(ZipFile=Subset)
    return int(module.restore(Path(out), pack))


def restore(lgg: Path, work: Path, pack: str, patients: int) -> None:
    """restore.py in parallel (it decodes serially: ~2 CPU-minutes of JPEG-XL for the 99-patient pack),
    each process writing whole patient folders that are then moved into one kaggle_3m/."""
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    if not (lgg / "restore.py").is_file():
        raise FileNotFoundError(f"{lgg}/restore.py: the real LGG data is not here (see --lgg, or --pack synth)")
    pack_file = {"gpu": "gpu-pack.zip", "lossless": "lossless.zip"}[pack]
    with zipfile.ZipFile(lgg / pack_file) as zf:
        names = sorted({n.split("/")[0] for n in zf.namelist()})[: patients or None]
    for leftover in (work / "kaggle_3m", work / "parts"):  # an interrupted restore (data.csv comes last)
        shutil.rmtree(leftover, ignore_errors=True)
    jobs = max(1, min(len(names), os.cpu_count() or 1, 16))
    parts = [work / "parts" / str(i) for i in range(jobs)]
    # spawn, not fork: the parent may hold a CUDA context by now.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = list(pool.map(_restore_part, [str(lgg)] * jobs, map(str, parts), [pack] * jobs,
                             [names[i::jobs] for i in range(jobs)]))
    if sum(done) != len(names):
        raise RuntimeError(f"restored {sum(done)} of {len(names)} patients from {pack_file}")
    root = work / "kaggle_3m"
    root.mkdir(parents=True, exist_ok=True)
    csv: list[str] = []
    for part in parts:
        for folder in sorted((part / "kaggle_3m").iterdir()):
            if folder.is_dir():
                folder.rename(root / folder.name)
        lines = (part / "kaggle_3m" / "data.csv").read_text().splitlines()
        csv += lines[:1] * (not csv) + lines[1:]
    order = {line.split(",")[0]: i for i, line in enumerate((lgg / "data.csv").read_text().splitlines())}
    csv[1:] = sorted(csv[1:], key=lambda line: order.get(line.split(",")[0], len(order)))  # restore.py's order
    (root / "data.csv").write_text("\n".join(csv) + "\n")  # last: it marks the restore complete
    shutil.rmtree(work / "parts")
