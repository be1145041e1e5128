"""What `core predict` (and `serve batch`) make of their inputs: one job per slice file, patient folder or
scan, with safe output names, and how scans are read (ScanOptions).

A file is a single-slice job (a multi-page TIFF or an (N,H,W[,3]) .npy: a volume); a folder of TIFF/PNG/NPY
slices is one patient's volume (in the order of core.formats.cases.slice_order, as every path stacks them); a
folder of such folders one volume each; NIfTI files are grouped into cases by core.formats.cases (nnU-Net
channel files together); a DICOM study is a folder or a ``.zip``. Output names have every path part and
unusual character removed, so nothing is written outside the output folder.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import from_args, meta
from core.formats.cases import is_nifti_name, slice_order
from core.formats.media import DecodeError

if TYPE_CHECKING:
    from core.formats.volume import Limits

SUFFIXES = (".tif", ".tiff", ".png", ".npy")  # slice files: decoded as a request body is
SCAN_SUFFIXES = (".nii", ".nii.gz", ".zip", ".dcm")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Job:
    """One unit of `core predict`: a slice file, one patient's slices, or one scan's files."""

    name: str  # safe output name (file stem, or folder name for a volume)
    paths: list[Path]
    volume: bool
    kind: str = "slices"  # "slices" (TIFF/PNG), "nifti" or "dicom"


def safe_name(name: str) -> str:
    """A file name that cannot escape a directory: last path part, safe characters, no leading dots."""
    base = re.split(r"[\\/]", name)[-1]
    cleaned = _UNSAFE.sub("_", base).lstrip(".")
    return cleaned[:120] or "input"


def _images_in(folder: Path) -> list[Path]:
    """A folder's TIFF/PNG/NPY slices (masks and hidden files left out) in slice order; ValueError if unorderable."""
    return slice_order(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                       and not p.stem.endswith("_mask") and not p.name.startswith("."))


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
                raise ValueError(f"{item}: not a TIFF, PNG, .npy, NIfTI or DICOM file")
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
            found = _nifti_jobs(sorted(p for p in item.iterdir() if p.is_file() and is_nifti_name(p.name)))
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


SERIES_ID = re.compile(r"^\d+(\.\d+)*$")  # a SeriesNumber (3) or SeriesInstanceUID (1.2.840...)


def parse_series(values: str | list[str] | None) -> dict[str, str] | None:
    """Which DICOM series is which sequence: ``--series flair=3 --series pre=1.2.840...`` (a list: one item
    each) or ``series=flair=3,pre=1`` (a string, comma-separated) -> {"flair": "3", "pre": "1.2.840..."}. A bare
    SeriesNumber or SeriesInstanceUID (``--series 3``, ``series=3``) picks the FLAIR series; the others are
    then found by their descriptions. A malformed item is a 400 ``bad_series`` naming it."""
    if not values:
        return None
    items = [v for v in values.split(",") if v.strip()] if isinstance(values, str) else list(values)
    out: dict[str, str] = {}
    for value in items:
        key, sep, selector = value.partition("=")
        if not sep and SERIES_ID.match(value.strip()):
            key, selector = "flair", value
        elif not sep or not key.strip() or not selector.strip():
            raise DecodeError(400, "bad_series", f"series {value!r}: expected SEQUENCE=SERIES (a number, description "
                              "or UID), or a SeriesNumber or SeriesInstanceUID alone for the FLAIR series")
        out[key.strip()] = selector.strip()
    return out or None


def _channels(text: str | None) -> list[str] | None:
    return text.split(",") if text else None


def _spacing(text: str | None) -> tuple[float, float, float] | None:
    from core.inference.spacing import parse_spacing

    return parse_spacing(text)


def sequences_field(text: str) -> Any:
    """A ``--sequences a,b,c`` option as a ``list[str] | None`` field."""
    return field(default=None, metadata=meta(text, from_arg=_channels))


def series_field(text: str) -> Any:
    """The repeatable ``--series SEQ=SERIES`` option as a ``dict[str, str] | None`` field (``parse_series``)."""
    return field(default=None, metadata=meta(text, argument={"action": "append", "metavar": "SEQ=SERIES"},
                                             from_arg=parse_series))


def spacing_field() -> Any:
    """``--spacing Z,Y,X``: a slice stack's voxel size (core.inference.spacing), for its mm rules and its mL."""
    return field(default=None, metadata=meta(
        "slice stacks (TIFF/PNG/NPY): slice, row and column spacing in mm, for the post-processing's mm3/mm2 "
        "rules and the volume in mL (default: the Kaggle grid's 5,0.9375,0.9375 is assumed, no mL given, and the "
        "answer says so); a scan's comes from its header", argument={"metavar": "Z,Y,X"}, from_arg=_spacing))


@dataclass
class ScanFlags:
    """How scans are read, as the command lines spell it (core predict, serve batch): each field a flag."""

    sequences: list[str] | None = sequences_field(
        "NIfTI: the sequence of each channel in order, e.g. flair,t1,t1gd,t2 ('-' skips one; default: the "
        "dataset.json beside the files, else 1 channel is FLAIR, 3 are pre-contrast,FLAIR,post-contrast)")
    series: dict[str, str] | None = series_field(
        "DICOM: which series is which sequence (pre, flair, post) by SeriesNumber, description or UID; "
        "repeatable; a number or UID alone is the FLAIR series. Default: from SeriesDescription")
    rescale: str = field(default="auto", metadata=meta(
        "scan intensities to uint8: percentiles 0.5..99.5 of the nonzero voxels; auto keeps 8-bit scans as they "
        "are", choices=("auto", "percentile", "none")))
    spacing: tuple[float, float, float] | None = spacing_field()


@dataclass
class ScanOptions(ScanFlags):
    """How scans are read (core.formats): channel names, series mapping, intensity rescale, spacing, limits."""

    limits: Limits | None = None  # None: core.formats.volume.Limits()


def scan_options(args: argparse.Namespace) -> ScanOptions:
    """The ScanOptions of the ScanFlags options on a command line (core predict)."""
    flags = from_args(args, ScanFlags)
    return ScanOptions(**{f.name: getattr(flags, f.name) for f in fields(ScanFlags)})
