"""`python -m core predict --bundle B INPUT... --out DIR`: masks for slices, patients and scans.

INPUT is a TIFF/PNG slice, a patient folder (its slices form one volume, so 3D post-processing
applies), a folder of patient folders, a NIfTI scan (``.nii``/``.nii.gz``, 4D or nnU-Net channel files
``<case>_0000.nii.gz`` ...) or a DICOM study (a folder or a ``.zip``). A scan gives ``<name>_mask.nii.gz``
on its own grid (its header, or the DICOM series' geometry), for DICOM also ``<name>_seg.dcm`` (a DICOM
SEG referencing the series), and its tumour volume in mL in predictions.csv. Output names come from
input names with every path part and unusual character removed, so nothing is written outside ``--out``.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.config import add_predictor_arguments
from core.formats.codecs import encode_mask_png, encode_overlay_png, mask_scale, read_file
from core.io import atomic_write_bytes, write_csv, write_json

if TYPE_CHECKING:
    from core.formats.volume import Limits, Volume
    from core.inference.slices import SlicePredictor

SUFFIXES = (".tif", ".tiff", ".png")
SCAN_SUFFIXES = (".nii", ".nii.gz", ".zip", ".dcm")
COLUMNS = ["input", "mask", "tumour_pixels", "volume_ml", "quality", "review", "dicom_seg", "notes"]
_NUMBER = re.compile(r"(\d+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
LOCAL_MAX_SIZE, LOCAL_MAX_PAGES = 4096, 4096


@dataclass
class Job:
    name: str  # safe output name (file stem, or folder name for a volume)
    paths: list[Path]
    volume: bool
    kind: str = "slices"  # "slices" (TIFF/PNG), "nifti" or "dicom"


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


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _scan_kind(path: Path) -> str | None:
    """'nifti', 'dicom' or None; nibabel and pydicom are imported only where a scan may be."""
    if path.is_file() and not path.name.lower().endswith(SCAN_SUFFIXES):
        return None
    from core.formats.load import volume_kind

    return volume_kind(path)


def _nifti_jobs(files: list[Path]) -> list[Job]:
    """One job per case: nnU-Net channel files of one case (<case>_0000 ...) belong together."""
    from core.formats.nifti import case_name, channel_files

    jobs: dict[tuple[Path, str], Job] = {}
    for f in files:
        key = (f.parent, case_name(f))
        if key not in jobs:
            jobs[key] = Job(safe_name(case_name(f)), channel_files(f), volume=True, kind="nifti")
    return list(jobs.values())


def collect_jobs(inputs: list[Path]) -> list[Job]:
    """Files become single-slice jobs; folders become volumes (a folder of folders: one per subfolder);
    NIfTI files and DICOM studies (a folder, with its series in subfolders or not, or a zip) become scans."""
    jobs: list[Job] = []
    for item in inputs:
        if item.is_file():
            kind = _scan_kind(item)
            if kind == "nifti":
                jobs += _nifti_jobs([item])
            elif kind == "dicom":
                jobs.append(Job(safe_name(item.stem), [item], volume=True, kind="dicom"))
            elif item.suffix.lower() not in SUFFIXES:
                raise ValueError(f"{item}: not a TIFF, PNG, NIfTI or DICOM file")
            else:
                jobs.append(Job(safe_name(item.stem), [item], volume=False))
        elif item.is_dir():
            slices = _images_in(item)
            if slices:
                jobs.append(Job(safe_name(item.resolve().name), slices, volume=True))
                continue
            if _scan_kind(item) == "dicom":
                jobs.append(Job(safe_name(item.resolve().name), [item], volume=True, kind="dicom"))
                continue
            found = _nifti_jobs(sorted(p for p in item.iterdir() if p.is_file() and _is_nifti(p)))
            for d in sorted(p for p in item.iterdir() if p.is_dir()):
                if _images_in(d):
                    found.append(Job(safe_name(d.name), _images_in(d), volume=True))
                elif _scan_kind(d) == "dicom":
                    found.append(Job(safe_name(d.name), [d], volume=True, kind="dicom"))
            if not found:
                raise ValueError(f"{item}: no TIFF/PNG slices, NIfTI scans or DICOM studies in it or its subfolders")
            jobs += found
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    seen: dict[str, int] = {}
    for job in jobs:  # two inputs with the same name must not overwrite each other
        count = seen.get(job.name, 0)
        seen[job.name] = count + 1
        if count:
            job.name = f"{job.name}_{count + 1}"
    return jobs


@dataclass
class ScanOptions:
    """How scans are read (core.formats): channel names, series mapping, intensity rescale, limits."""

    sequences: list[str] | None = None
    series: dict[str, str] | None = None
    rescale: str = "auto"
    limits: Limits | None = None  # None: core.formats.volume.Limits()


@dataclass
class VolumeResult:
    """A scan's masks: canonical (N,H,W) labels beside the Volume that maps them back to the source."""

    volume: Volume
    masks: np.ndarray
    class_names: list[str]
    quality: float | None = None  # 0-1, higher = more trustworthy (core.inference.quality)
    review: bool | None = None  # quality below the bundle's review threshold

    @property
    def volume_ml(self) -> float:
        return self.volume.volume_ml(self.masks)

    def class_ml(self) -> dict[str, float]:
        return {name: self.volume.volume_ml(self.masks, k) for k, name in enumerate(self.class_names) if k}

    def nifti_bytes(self) -> bytes:
        from core.formats.nifti import nifti_mask_bytes

        return nifti_mask_bytes(self.volume, self.masks, labels=len(self.class_names) - 1)

    def seg_bytes(self, model: str, version: str) -> bytes:
        from core.formats.dicom_seg import dicom_seg_bytes

        return dicom_seg_bytes(self.volume, self.masks, self.class_names, model=model, version=version)

    def summary(self) -> dict[str, object]:
        pixels = np.count_nonzero(self.masks.reshape(len(self.masks), -1), axis=1)
        return {**self.volume.summary(), "tumour_voxels": int(pixels.sum()), "volume_ml": self.volume_ml,
                "class_ml": self.class_ml(), "slice_tumour_pixels": [int(p) for p in pixels],
                "quality": self.quality, "review": self.review}


def review_label(review: bool | None) -> str:
    """A CSV cell for a review flag: "review", "ok", or empty where the bundle chose no threshold."""
    return "" if review is None else ("review" if review else "ok")


def segment_volume(predictor: SlicePredictor, volume: Volume) -> VolumeResult:
    """Predict a scan's canonical slices as one patient's volume (the bundle's 3D post-processing applies)."""
    answer = predictor.segment(volume.images, spacing=volume.spacing)
    return VolumeResult(volume, np.asarray(answer.masks, np.uint8),
                        list(predictor.config.get("class_names", ["background", "tumour"])),
                        answer.quality, answer.review)


def _run_scan(predictor: SlicePredictor, job: Job, out: Path, options: ScanOptions) -> dict[str, object]:
    from core.formats.dicom import read_dicom
    from core.formats.nifti import read_nifti
    from core.formats.volume import Limits

    limits = options.limits or Limits()
    if job.kind == "nifti":
        volume = read_nifti(job.paths, sequences=options.sequences, name=job.name, limits=limits,
                            rescale=options.rescale)
    else:
        volume = read_dicom(job.paths[0], series=options.series, name=job.name, limits=limits,
                            rescale=options.rescale)
    result = segment_volume(predictor, volume)
    # Every output is encoded before any is written, so a failure leaves nothing half-written.
    outputs = {f"{job.name}_mask.nii.gz": result.nifti_bytes()}
    if volume.kind == "dicom":
        outputs[f"{job.name}_seg.dcm"] = result.seg_bytes(str(predictor.config.get("name") or "gliomaseg"),
                                                          predictor.version)
    for name, data in outputs.items():
        atomic_write_bytes(out / name, data)
    write_json(out / f"{job.name}_volume.json", result.summary())
    source = job.paths[0] if len(job.paths) == 1 else job.paths[0].parent / f"{job.name} ({len(job.paths)} files)"
    return {"input": str(source), "mask": f"{job.name}_mask.nii.gz",
            "tumour_pixels": int(np.count_nonzero(result.masks)), "volume_ml": round(result.volume_ml, 4),
            "quality": result.quality, "review": review_label(result.review),
            "dicom_seg": f"{job.name}_seg.dcm" if volume.kind == "dicom" else "", "notes": "; ".join(volume.notes)}


def run(predictor: SlicePredictor, inputs: list[Path], out: Path, options: ScanOptions | None = None
        ) -> list[dict[str, object]]:
    """Predict every job; write <name>_mask.png and <name>_overlay.png per slice (a NIfTI mask, and a DICOM
    SEG for DICOM, per scan); return one row per slice or scan."""
    options = options or ScanOptions()
    scale = mask_scale(predictor.config.get("class_names", ["background", "tumour"]))
    rows: list[dict[str, object]] = []
    for job in collect_jobs(inputs):
        if job.kind != "slices":
            rows.append(_run_scan(predictor, job, out, options))
            continue
        # (input file, output stem, slice): a multi-page TIFF gives several slices of one file
        entries: list[tuple[Path, str, np.ndarray]] = []
        for path in job.paths:
            slices = read_image(path)
            stem = safe_name(path.stem) if job.volume else job.name
            entries += [(path, stem if len(slices) == 1 else f"{stem}_{i + 1}", s) for i, s in enumerate(slices)]
        volume = job.volume or len(entries) > 1
        quality: object = ""
        review = ""
        if volume:
            answer = predictor.segment([e[2] for e in entries])
            masks, quality = answer.masks, answer.quality
            review = review_label(answer.review)
        else:
            masks = predictor.predict([e[2] for e in entries])
        target = out / job.name if volume else out
        for (path, stem, image), mask in zip(entries, masks, strict=True):
            atomic_write_bytes(target / f"{stem}_mask.png", encode_mask_png(mask, scale))
            atomic_write_bytes(target / f"{stem}_overlay.png", encode_overlay_png(image, mask))
            rows.append({"input": str(path), "mask": (target / f"{stem}_mask.png").relative_to(out).as_posix(),
                         "tumour_pixels": int(np.count_nonzero(mask)), "volume_ml": "", "quality": quality,
                         "review": review, "dicom_seg": "", "notes": ""})
    write_csv(out / "predictions.csv", rows, COLUMNS)
    return rows


def parse_series(values: list[str] | None) -> dict[str, str] | None:
    """``--series flair=3 --series pre=1.2.840...`` -> {"flair": "3", "pre": "1.2.840..."}."""
    if not values:
        return None
    out = {}
    for value in values:
        key, sep, selector = value.partition("=")
        if not sep or not key.strip() or not selector.strip():
            raise ValueError(f"--series {value!r}: expected SEQUENCE=SERIES (a number, description or UID)")
        out[key.strip()] = selector.strip()
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="masks for TIFF/PNG slices, patient folders, NIfTI scans and DICOM studies",
        description="Writes <name>_mask.png (0/255; labels as-is for multi-class) and <name>_overlay.png per "
        "slice, and predictions.csv. A patient folder or a multi-page TIFF is predicted as one volume. A NIfTI "
        "scan or DICOM study (folder or zip) gives <name>_mask.nii.gz on its own grid, <name>_seg.dcm (DICOM "
        "SEG) for DICOM, <name>_volume.json, and its tumour volume in mL in predictions.csv.",
    )
    add_predictor_arguments(p)
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                   help="slice files, patient folders, .nii/.nii.gz files, DICOM folders or zips")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--sequences", help="NIfTI: the sequence of each channel in order, e.g. flair,t1,t1gd,t2 "
                   "('-' skips one; default: 1 channel is FLAIR, 3 are pre-contrast,FLAIR,post-contrast)")
    p.add_argument("--series", action="append", metavar="SEQ=SERIES", help="DICOM: which series is which "
                   "sequence (pre, flair, post) by SeriesNumber, description or UID; repeatable. Default: "
                   "from SeriesDescription")
    p.add_argument("--rescale", default="auto", choices=("auto", "percentile", "none"),
                   help="scan intensities to uint8: percentiles 0.5..99.5 of the nonzero voxels; auto keeps "
                   "8-bit scans as they are")
    p.set_defaults(func=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    from core.inference.predictor import Predictor  # here: `python -m core` starts without torch

    options = ScanOptions(sequences=args.sequences.split(",") if args.sequences else None,
                          series=parse_series(args.series), rescale=args.rescale)
    predictor = Predictor.from_args(args)
    rows = run(predictor, list(args.inputs), Path(args.out), options)
    scans = [r for r in rows if r["volume_ml"] != ""]
    tumour = sum(1 for r in rows if int(r["tumour_pixels"]) > 0)  # type: ignore[call-overload]
    for r in scans:
        print(f"{r['input']}: {r['volume_ml']} mL{' (' + str(r['notes']) + ')' if r['notes'] else ''}")
    print(f"{len(rows) - len(scans)} slices and {len(scans)} scans, {tumour} with tumour; outputs in {args.out}")
    return 0
