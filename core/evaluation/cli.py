"""`python -m core evaluate --bundle B (--data PREPARED | --src FOLDER) --out DIR`: core.evaluation.evaluate's
command line (CSVs, summary.json and plots for one bundle)."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.config import add_predictor_arguments
from core.data.arrays import load_split, load_split_info
from core.evaluation.evaluate import arrays_from_src, scans_from_src, write_report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate a bundle on a prepared split or a kaggle_3m folder",
        description="Per-slice and per-patient CSVs, summary.json and plots for one bundle.",
    )
    add_predictor_arguments(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="prepared directory")
    source.add_argument("--src", type=Path, help="a kaggle_3m folder, an nnU-Net raw dataset, or a folder of NIfTI "
                        "scans each with <case>_mask.nii.gz beside it")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="with --data (default: test)")
    p.add_argument("--out", required=True, type=Path, help="report directory")
    p.add_argument("--sequences", help="NIfTI scans: the sequence of each channel, e.g. flair,t1,t1gd,t2")
    p.set_defaults(func=evaluate_command)


def evaluate_command(args: argparse.Namespace) -> int:
    from core.inference.predictor import Predictor

    predictor = Predictor.from_args(args)
    classes = max(1, len(predictor.config["class_names"]) - 1)
    if args.data is not None:
        info = load_split_info(args.data)
        if int(info.get("classes", 1)) != classes:
            raise ValueError(f"{args.data} has {info.get('classes')} classes, the bundle {classes}")
        arrays = load_split(args.data, args.split)
        source = {"data": str(args.data), "split": args.split}
    voxel_ml = None
    if args.data is None:  # --src
        sequences = args.sequences.split(",") if args.sequences else None
        scans = scans_from_src(args.src, classes, sequences)
        source = {"src": str(args.src)}
        if scans is not None:
            arrays, voxel_ml, notes = scans
            source.update(notes)
        else:
            arrays = arrays_from_src(args.src, classes)
    if len(arrays) == 0:
        raise ValueError(f"no slices to evaluate in {source}")
    summary = write_report(predictor, arrays, args.out, {**source, "bundle": str(args.bundle)}, voxel_ml)
    m = summary["metrics"]
    print(f"dsc_volume={m['dsc_volume']:.4f} dice_tumour={m['dice_tumour']:.4f} dice_all={m['dice_all']:.4f} "
          f"fp_slice_rate={m['fp_slice_rate']:.4f}; report: {args.out}")
    return 0
