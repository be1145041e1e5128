"""Which files make one case and in what order, by their names alone (a local folder and an S3 prefix
group alike): NIfTI channel files, and a patient's slice files (``slice_order``).

nnU-Net names one file per sequence: ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... Those are one
case; any other NIfTI file is a case by itself (``TCGA_SY_1000.nii.gz`` alone is case TCGA_SY_1000, not
channel 1000 of TCGA_SY, because no ``TCGA_SY_0000.nii.gz`` is beside it). ``<case>_mask.nii.gz`` is the
ground truth `core evaluate --src` reads beside a scan, not a case.

A folder of TIFF/PNG slices is one volume whose order is its file names' only record of position, so every
path that stacks one (`core predict`, `serve predict`, `serve batch`) orders it by ``slice_order``. Stdlib only.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable
from pathlib import PurePath, PurePosixPath
from typing import TypeVar

NIFTI_NAME = re.compile(r"^(?P<case>.+?)(?:_(?P<channel>\d{4}))?(?P<suffix>\.nii(?:\.gz)?)$", re.IGNORECASE)
TRUTH_SUFFIXES = ("_mask.nii", "_mask.nii.gz")
LAST_NUMBER = re.compile(r"(\d+)\D*$")
SliceFile = TypeVar("SliceFile", bound="str | PurePath")


def is_nifti_name(name: object) -> bool:
    """A ``.nii`` or ``.nii.gz`` name (any case)."""
    return str(name).lower().endswith((".nii", ".nii.gz"))


def is_truth_name(name: object) -> bool:
    """A ground-truth mask beside a scan (``<case>_mask.nii.gz``)."""
    return str(name).lower().endswith(TRUTH_SUFFIXES)


def split_name(name: str, present: Container[str]) -> tuple[str, int | None, str] | None:
    """(case, channel, suffix) of a NIfTI file name, None for another name. ``channel`` is set only for
    ``<case>_XXXX`` with ``<case>_0000<suffix>`` among ``present`` (the names beside it)."""
    m = NIFTI_NAME.match(name)
    if not m:
        return None
    if m["channel"] is not None and f"{m['case']}_0000{m['suffix']}" in present:
        return m["case"], int(m["channel"]), m["suffix"]
    return name[: -len(m["suffix"])], None, m["suffix"]


def nifti_cases(names: Iterable[str]) -> dict[str, list[str]]:
    """NIfTI file names of one folder (bare, or POSIX paths) -> {case: its files in channel order}."""
    names = list(names)
    present = {PurePosixPath(n).name for n in names}
    grouped: dict[str, dict[int, str]] = {}
    for name in names:
        split = split_name(PurePosixPath(name).name, present)
        if split is not None:
            case, channel, _ = split
            grouped.setdefault(case, {})[channel or 0] = name
    return {case: [files[k] for k in sorted(files)] for case, files in grouped.items()}


def channel_gap(files: list[str]) -> str:
    """'' when a case's channel files run _0000, _0001, ... without a gap, else what is missing."""
    numbers = [int(m["channel"]) for f in files if (m := NIFTI_NAME.match(PurePosixPath(f).name)) and m["channel"]]
    if len(files) < 2 or numbers == list(range(len(numbers))):
        return ""
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    return f"channel file(s) {missing[:8]} missing (found {numbers[:8]}; expected _0000, _0001 ... without gaps)"


def slice_number(name: str | PurePath) -> int | None:
    """A slice file's position from its name: the last number in its stem (``<patient>_<k>.tif``, the Kaggle
    layout, is k; ``s10_flair.tif`` is 10), None when the stem holds no number."""
    stem = (name if isinstance(name, PurePath) else PurePosixPath(name)).stem
    m = LAST_NUMBER.search(stem)
    return int(m.group(1)) if m else None


def _listed(files: list[SliceFile], at_most: int = 5) -> str:
    names = sorted(str(f) for f in files)
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def slice_order(files: Iterable[SliceFile]) -> list[SliceFile]:
    """One volume's slice files (masks already left out) in slice order, by ``slice_number``.

    A position is never guessed: a file without a number, or two files with the same one, is a ValueError
    naming them. A lone file needs no number.
    """
    files = list(files)
    if len(files) < 2:
        return files
    numbers = [slice_number(f) for f in files]
    unnumbered = [f for n, f in zip(numbers, files, strict=True) if n is None]
    if unnumbered:
        raise ValueError(f"cannot order {len(files)} slice files: no slice number in the name of "
                         f"{_listed(unnumbered)}; name them <patient>_<k>.tif, k the slice's position")
    by_number: dict[int, list[SliceFile]] = {}
    for n, f in zip(numbers, files, strict=True):
        if n is not None:
            by_number.setdefault(n, []).append(f)
    shared = {n: fs for n, fs in by_number.items() if len(fs) > 1}
    if shared:
        n, fs = min(shared.items())
        raise ValueError(f"cannot order {len(files)} slice files: {_listed(fs)} have the same slice number {n}"
                         + (f" ({len(shared) - 1} more numbers are shared)" if len(shared) > 1 else ""))
    return [by_number[n][0] for n in sorted(by_number)]
