"""`python -m core data {synth,prepare,export-nnunet,eda,download}`."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="synthesise, prepare, explore or download data")
    cmds = data.add_subparsers(dest="data_command", required=True)

    p = cmds.add_parser("synth", help="write a synthetic data set in the Kaggle kaggle_3m layout")
    p.add_argument("--out", required=True, help="writes OUT/kaggle_3m/")
    p.add_argument("--patients", type=int, default=12)
    p.add_argument("--slices", type=int, default=24)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=1, help="K > 1 writes label masks 0..K (multi-class)")
    p.set_defaults(func=_synth)

    p = cmds.add_parser("prepare", help="validate, split by patient, write prepared arrays")
    p.add_argument("--src", required=True, help="a kaggle_3m folder, or an nnU-Net v2 raw dataset (DatasetNNN_Name)")
    p.add_argument("--out", required=True)
    p.add_argument("--val", type=float, default=0.1, help="fraction of patients, or a count when >= 1")
    p.add_argument("--test", type=float, default=0.1, help="fraction of patients, or a count when >= 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-file", help="reuse the patient assignment of an existing split.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--size", type=int, help="nnU-Net source: in-plane size to resize every case to "
                   "(default: the most common one)")
    p.add_argument("--fold", type=int, default=0, help="nnU-Net source: the fold of splits_final.json to use")
    p.set_defaults(func=_prepare)

    p = cmds.add_parser("export-nnunet", help="write a prepared directory or kaggle_3m folder as an nnU-Net v2 "
                        "raw dataset (the split as splits_final.json)")
    p.add_argument("--src", required=True, help="a prepared directory (its split) or a kaggle_3m folder")
    p.add_argument("--out", required=True, help="DatasetNNN_Name folder to write (replaced)")
    p.add_argument("--val", type=float, default=0.1, help="kaggle_3m source: as for prepare")
    p.add_argument("--test", type=float, default=0.1, help="kaggle_3m source: as for prepare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", default="1,1,1", help="voxel size SLICE,ROW,COL in mm (the Kaggle set has none)")
    p.set_defaults(func=_export_nnunet)

    p = cmds.add_parser("eda", help="plots and stats.json in PREPARED/eda/")
    p.add_argument("prepared")
    p.set_defaults(func=_eda)

    p = cmds.add_parser("download", help="fetch the Kaggle data with kagglehub (needs credentials)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_download)


def _synth(args: argparse.Namespace) -> int:
    from core.data.synth import synthesize

    out = synthesize(args.out, args.patients, args.slices, args.size, args.seed, args.classes)
    print(f"wrote {args.patients} synthetic patients to {out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from core.data.nnunet import is_nnunet_dataset, prepare_nnunet
    from core.data.prepare import prepare

    if is_nnunet_dataset(args.src):
        info = prepare_nnunet(args.src, args.out, args.val, args.test, args.seed, args.split_file, args.size,
                              args.fold)
    else:
        info = prepare(args.src, args.out, args.val, args.test, args.seed, args.split_file,
                       progress=not args.no_progress)
    for name, c in info["counts"].items():
        print(f"{name:5s} {c['patients']:3d} patients {c['slices']:5d} slices {c['tumour_fraction']:.1%} tumour")
    print(f"wrote {args.out} (split {info['split_hash']})")
    return 0


def _export_nnunet(args: argparse.Namespace) -> int:
    from core.data.nnunet import export_nnunet

    try:
        spacing = tuple(float(v) for v in args.spacing.split(","))
    except ValueError:
        spacing = ()
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"--spacing {args.spacing!r}: expected three positive numbers SLICE,ROW,COL")
    meta = export_nnunet(args.src, args.out, args.val, args.test, args.seed, spacing)  # type: ignore[arg-type]
    print(f"wrote {args.out}: {meta['numTraining']} training cases, splits_final.json (copy it to "
          "nnUNet_preprocessed/<dataset>/ after nnUNetv2_plan_and_preprocess)")
    return 0


def _eda(args: argparse.Namespace) -> int:
    from core.data.eda import run_eda

    stats = run_eda(args.prepared)
    print(f"wrote {args.prepared}/eda/ ({len(stats['splits'])} splits)")
    return 0


def _download(args: argparse.Namespace) -> int:
    from core.data.download import DownloadError, download

    try:
        target = download(args.out)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"data at {target}")
    return 0
