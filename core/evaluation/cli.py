"""`python -m core evaluate --bundle B (--data PREPARED | --src FOLDER) --out DIR`: core.evaluation.evaluate's
command line (CSVs, summary.json and plots for one bundle)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from core.config import PredictorOptions, add_command, from_args, meta
from core.data.arrays import load_split, load_split_info
from core.evaluation.evaluate import arrays_from_src, scans_from_src, write_report


@dataclass(kw_only=True)
class EvaluateJob:
    """The `core evaluate` options of its own (the model's are PredictorOptions)."""

    data: Path | None = field(default=None, metadata=meta("prepared directory", one_of="source"))
    src: Path | None = field(default=None, metadata=meta(
        "a kaggle_3m folder, an nnU-Net raw dataset, or a folder of NIfTI scans each with <case>_mask.nii.gz "
        "beside it", one_of="source"))
    split: str = field(default="test", metadata=meta("with --data", choices=("train", "val", "test")))
    out: Path = field(metadata=meta("report directory"))
    sequences: str | None = field(default=None, metadata=meta(
        "NIfTI scans: the sequence of each channel, e.g. flair,t1,t1gd,t2"))


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "evaluate", evaluate_command, PredictorOptions, EvaluateJob,
                help="evaluate a bundle on a prepared split or a kaggle_3m folder",
                description="Per-slice and per-patient CSVs, summary.json and plots for one bundle.")


def evaluate_command(args: argparse.Namespace) -> int:
    from core.inference.predictor import Predictor

    predictor, job = Predictor.from_args(args), from_args(args, EvaluateJob)
    classes = max(1, len(predictor.config["class_names"]) - 1)
    if job.data is not None:
        info = load_split_info(job.data)
        if int(info.get("classes", 1)) != classes:
            raise ValueError(f"{job.data} has {info.get('classes')} classes, the bundle {classes}")
        arrays = load_split(job.data, job.split)
        source = {"data": str(job.data), "split": job.split}
    voxel_ml = None
    if job.data is None:  # --src
        sequences = job.sequences.split(",") if job.sequences else None
        scans = scans_from_src(job.src, classes, sequences)
        source = {"src": str(job.src)}
        if scans is not None:
            arrays, voxel_ml, notes = scans
            source.update(notes)
        else:
            arrays = arrays_from_src(job.src, classes)
    if len(arrays) == 0:
        raise ValueError(f"no slices to evaluate in {source}")
    summary = write_report(predictor, arrays, job.out, {**source, "bundle": str(args.bundle)}, voxel_ml)
    m = summary["metrics"]
    print(f"dsc_volume={m['dsc_volume']:.4f} dice_tumour={m['dice_tumour']:.4f} dice_all={m['dice_all']:.4f} "
          f"fp_slice_rate={m['fp_slice_rate']:.4f}; report: {job.out}")
    return 0
