"""`python -m core data {synth,prepare,export-nnunet,eda,download}`: each subcommand's options a dataclass."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from core.config import add_arguments, from_args, meta
from core.data.prepare import SplitOptions

SPLIT = "patient split"  # the title of the --val/--test/--seed group in --help


@dataclass
class SynthOptions:
    """The `core data synth` options."""

    out: str = field(metadata=meta("writes OUT/kaggle_3m/"))
    patients: int = field(default=12, metadata=meta("synthetic patients"))
    slices: int = field(default=24, metadata=meta("slices per patient"))
    size: int = field(default=256, metadata=meta("slice height and width in pixels"))
    seed: int = field(default=0, metadata=meta("seeds the synthetic scans"))
    classes: int = field(default=1, metadata=meta("K > 1 writes label masks 0..K (multi-class)"))


@dataclass
class PrepareOptions:
    """The `core data prepare` options (the split's are SplitOptions)."""

    src: str = field(metadata=meta("a kaggle_3m folder, or an nnU-Net v2 raw dataset (DatasetNNN_Name)"))
    out: str = field(metadata=meta("the prepared directory to write (replaced once everything succeeded)"))
    split_file: str | None = field(default=None, metadata=meta(
        "reuse the patient assignment of an existing split.json"))
    progress: bool = field(default=True, metadata=meta("a progress bar while reading the source"))
    size: int | None = field(default=None, metadata=meta(
        "nnU-Net source: in-plane size to resize every case to (default: the most common one)"))
    fold: int = field(default=0, metadata=meta("nnU-Net source: the fold of splits_final.json to use"))


@dataclass
class ExportNnunetOptions:
    """The `core data export-nnunet` options (the split's are SplitOptions, for a kaggle_3m source)."""

    src: str = field(metadata=meta("a prepared directory (its split) or a kaggle_3m folder"))
    out: str = field(metadata=meta("DatasetNNN_Name folder to write (replaced)"))
    spacing: str = field(default="1,1,1", metadata=meta(
        "voxel size SLICE,ROW,COL in mm (the Kaggle set has none)"))


@dataclass
class EdaOptions:
    """The `core data eda` options."""

    prepared: str = field(metadata=meta("a prepared directory", positional=True))


@dataclass
class DownloadOptions:
    """The `core data download` options."""

    out: str = field(metadata=meta("links the data to OUT/kaggle_3m"))


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="synthesise, prepare, explore or download data")
    cmds = data.add_subparsers(dest="data_command", required=True)

    p = cmds.add_parser("synth", help="write a synthetic data set in the Kaggle kaggle_3m layout")
    add_arguments(p, SynthOptions)
    p.set_defaults(func=_synth)

    p = cmds.add_parser("prepare", help="validate, split by patient, write prepared arrays")
    add_arguments(p, PrepareOptions)
    add_arguments(p.add_argument_group(SPLIT, "without --split-file (nnU-Net source: without splits_final.json)"),
                  SplitOptions)
    p.set_defaults(func=_prepare)

    p = cmds.add_parser("export-nnunet", help="write a prepared directory or kaggle_3m folder as an nnU-Net v2 "
                        "raw dataset (the split as splits_final.json)")
    add_arguments(p, ExportNnunetOptions)
    add_arguments(p.add_argument_group(SPLIT, "kaggle_3m source: as for prepare"), SplitOptions)
    p.set_defaults(func=_export_nnunet)

    p = cmds.add_parser("eda", help="plots and stats.json in PREPARED/eda/")
    add_arguments(p, EdaOptions)
    p.set_defaults(func=_eda)

    p = cmds.add_parser("download", help="fetch the Kaggle data with kagglehub (needs credentials)")
    add_arguments(p, DownloadOptions)
    p.set_defaults(func=_download)


def _synth(args: argparse.Namespace) -> int:
    from core.data.synth import synthesize

    opts = from_args(args, SynthOptions)
    out = synthesize(opts.out, opts.patients, opts.slices, opts.size, opts.seed, opts.classes)
    print(f"wrote {opts.patients} synthetic patients to {out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from core.data.nnunet import is_nnunet_dataset, prepare_nnunet
    from core.data.prepare import prepare

    opts, split = from_args(args, PrepareOptions), from_args(args, SplitOptions)
    if is_nnunet_dataset(opts.src):
        info = prepare_nnunet(opts.src, opts.out, split, opts.split_file, opts.size, opts.fold)
    else:
        info = prepare(opts.src, opts.out, split, opts.split_file, progress=opts.progress)
    for name, c in info["counts"].items():
        print(f"{name:5s} {c['patients']:3d} patients {c['slices']:5d} slices {c['tumour_fraction']:.1%} tumour")
    print(f"wrote {opts.out} (split {info['split_hash']})")
    return 0


def _export_nnunet(args: argparse.Namespace) -> int:
    from core.data.nnunet import export_nnunet

    opts, split = from_args(args, ExportNnunetOptions), from_args(args, SplitOptions)
    try:
        spacing = tuple(float(v) for v in opts.spacing.split(","))
    except ValueError:
        spacing = ()
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"--spacing {opts.spacing!r}: expected three positive numbers SLICE,ROW,COL")
    meta = export_nnunet(opts.src, opts.out, split, spacing)  # type: ignore[arg-type]
    print(f"wrote {opts.out}: {meta['numTraining']} training cases, splits_final.json (copy it to "
          "nnUNet_preprocessed/<dataset>/ after nnUNetv2_plan_and_preprocess)")
    return 0


def _eda(args: argparse.Namespace) -> int:
    from core.data.eda import run_eda

    opts = from_args(args, EdaOptions)
    stats = run_eda(opts.prepared)
    print(f"wrote {opts.prepared}/eda/ ({len(stats['splits'])} splits)")
    return 0


def _download(args: argparse.Namespace) -> int:
    from core.data.download import DownloadError, download

    try:
        target = download(from_args(args, DownloadOptions).out)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"data at {target}")
    return 0
