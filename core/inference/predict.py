"""`python -m core predict --bundle B INPUT... --out DIR`: masks and overlays for slices or patients.

INPUT is a TIFF/PNG slice, a patient folder (its slices form one volume, so 3D post-processing
applies), or a folder of patient folders. Output names come from input names with every path part
and unusual character removed, so nothing is written outside ``--out``.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.cli import add_predictor_arguments
from core.formats.codecs import encode_mask_png, encode_overlay_png, mask_scale, read_file
from core.io import atomic_write_bytes, write_csv

if TYPE_CHECKING:
    from core.inference.predictor import Predictor

SUFFIXES = (".tif", ".tiff", ".png")
_NUMBER = re.compile(r"(\d+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
LOCAL_MAX_SIZE, LOCAL_MAX_PAGES = 4096, 4096


@dataclass
class Job:
    name: str  # safe output name (file stem, or folder name for a volume)
    paths: list[Path]
    volume: bool


def safe_name(name: str) -> str:
    """A file name that cannot escape a directory: last path part, safe characters, no leading dots."""
    base = re.split(r"[\\/]", name)[-1]
    cleaned = _UNSAFE.sub("_", base).lstrip(".")
    return cleaned[:120] or "input"


def read_image(path: Path) -> np.ndarray:
    """(N,H,W,3) uint8 slices of one TIFF/PNG file (a multi-page TIFF is a volume), via core.formats.codecs.

    Same decoding rules as the HTTP API (uint16 rescaled, grey replicated to 3 channels), with limits
    wide enough for local files.
    """
    return read_file(str(path), volume=True, max_size=LOCAL_MAX_SIZE, max_pages=LOCAL_MAX_PAGES,
                     max_pixels=LOCAL_MAX_SIZE * LOCAL_MAX_SIZE * 64)


def _slice_key(path: Path) -> tuple[int, str]:
    m = _NUMBER.search(path.stem)
    return (int(m.group(1)) if m else -1, path.name)


def _images_in(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
             and not p.stem.endswith("_mask") and not p.name.startswith(".")]
    return sorted(files, key=_slice_key)


def collect_jobs(inputs: list[Path]) -> list[Job]:
    """Files become single-slice jobs; folders become volumes (a folder of folders: one per subfolder)."""
    jobs: list[Job] = []
    for item in inputs:
        if item.is_file():
            if item.suffix.lower() not in SUFFIXES:
                raise ValueError(f"{item}: not a TIFF or PNG file")
            jobs.append(Job(safe_name(item.stem), [item], volume=False))
        elif item.is_dir():
            slices = _images_in(item)
            if slices:
                jobs.append(Job(safe_name(item.resolve().name), slices, volume=True))
                continue
            subs = [d for d in sorted(item.iterdir()) if d.is_dir() and _images_in(d)]
            if not subs:
                raise ValueError(f"{item}: no TIFF or PNG slices in it or its subfolders")
            jobs += [Job(safe_name(d.name), _images_in(d), volume=True) for d in subs]
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    seen: dict[str, int] = {}
    for job in jobs:  # two inputs with the same name must not overwrite each other
        count = seen.get(job.name, 0)
        seen[job.name] = count + 1
        if count:
            job.name = f"{job.name}_{count + 1}"
    return jobs


def run(predictor: Predictor, inputs: list[Path], out: Path) -> list[dict[str, object]]:
    """Predict every job; write <name>_mask.png and <name>_overlay.png; return one row per slice."""
    out.mkdir(parents=True, exist_ok=True)
    scale = mask_scale(predictor.config.get("class_names", ["background", "tumour"]))
    rows: list[dict[str, object]] = []
    for job in collect_jobs(inputs):
        # (input file, output stem, slice): a multi-page TIFF gives several slices of one file
        entries: list[tuple[Path, str, np.ndarray]] = []
        for path in job.paths:
            slices = read_image(path)
            stem = safe_name(path.stem) if job.volume else job.name
            entries += [(path, stem if len(slices) == 1 else f"{stem}_{i + 1}", s) for i, s in enumerate(slices)]
        volume = job.volume or len(entries) > 1
        masks = predictor.predict([e[2] for e in entries], volume=volume)
        target = out / job.name if volume else out
        for (path, stem, image), mask in zip(entries, masks, strict=True):
            atomic_write_bytes(target / f"{stem}_mask.png", encode_mask_png(mask, scale))
            atomic_write_bytes(target / f"{stem}_overlay.png", encode_overlay_png(image, mask))
            rows.append({"input": str(path), "mask": (target / f"{stem}_mask.png").relative_to(out).as_posix(),
                         "tumour_pixels": int(np.count_nonzero(mask))})
    write_csv(out / "predictions.csv", rows, ["input", "mask", "tumour_pixels"])
    return rows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="masks and overlays for TIFF/PNG slices or patient folders",
        description="Writes <name>_mask.png (0/255; labels as-is for multi-class) and <name>_overlay.png per "
        "slice, and predictions.csv. A patient folder or a multi-page TIFF is predicted as one volume.",
    )
    add_predictor_arguments(p)
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="slice files or patient folders")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.set_defaults(func=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    from core.inference.predictor import Predictor  # here: `python -m core` starts without torch

    predictor = Predictor.from_args(args)
    rows = run(predictor, list(args.inputs), Path(args.out))
    tumour = sum(1 for r in rows if int(r["tumour_pixels"]) > 0)  # type: ignore[call-overload]
    print(f"{len(rows)} slices, {tumour} with tumour; masks and overlays in {args.out}")
    return 0
