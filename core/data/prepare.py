"""Validate a Kaggle-layout folder, split it by patient, and write prepared/ arrays.

Every problem is a DataError naming the file (missing mask, orphan mask, wrong shape or dtype,
non-binary mask, unreadable TIFF, empty folder); nothing half-written is left behind.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from tqdm import tqdm

from core.config import meta
from core.data.arrays import SPLITS, SplitArrays, save_split, split_hash
from core.io import atomic_dir, read_json, write_json

SLICE_RE = re.compile(r"^(?P<stem>.+)_(?P<k>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file and the problem."""


@dataclass
class Patient:
    id: str
    images: np.ndarray  # (n,H,W,3) uint8
    masks: np.ndarray  # (n,H,W) uint8 labels (0/1 binary)
    slices: np.ndarray  # (n,) int, the k of <patient>_<k>.tif


def patient_id(folder_name: str) -> str:
    """`TCGA_CS_4941_19960909` -> `TCGA_CS_4941` (the data.csv key); other names stay as they are."""
    parts = folder_name.split("_")
    return "_".join(parts[:3]) if len(parts) == 4 and parts[3].isdigit() else folder_name


def scan(src: str | Path) -> dict[Path, list[tuple[int, Path, Path]]]:
    """Pair images with masks per patient folder, slices in numeric order of k."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: not a directory")
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{src}: no patient folders (expected kaggle_3m/<patient>/<patient>_<k>.tif)")
    layout: dict[Path, list[tuple[int, Path, Path]]] = {}
    for folder in folders:
        images: dict[int, Path] = {}
        masks: dict[int, Path] = {}
        for f in sorted(folder.iterdir()):
            if f.name.startswith("."):
                continue
            m = SLICE_RE.match(f.name)
            if not m:
                raise DataError(f"{f}: unexpected file (expected <patient>_<k>.tif or <patient>_<k>_mask.tif)")
            (masks if m["mask"] else images)[int(m["k"])] = f
        if not images and not masks:
            raise DataError(f"{folder}: empty patient folder")
        for k in sorted(set(masks) - set(images)):
            raise DataError(f"{masks[k]}: mask without an image")
        for k in sorted(set(images) - set(masks)):
            raise DataError(f"{images[k]}: missing mask (expected {images[k].stem}_mask{images[k].suffix})")
        layout[folder] = [(k, images[k], masks[k]) for k in sorted(images)]
    return layout


def _read(path: Path) -> np.ndarray:
    try:
        array = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise DataError(f"{path}: unreadable TIFF ({type(exc).__name__}: {exc})") from exc
    if array.size == 0:  # a corrupt header can decode to nothing instead of raising
        raise DataError(f"{path}: unreadable TIFF (no image data)")
    return array


def _check_pair(image_path: Path, mask_path: Path, classes: int) -> tuple[np.ndarray, np.ndarray]:
    image, mask = _read(image_path), _read(mask_path)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(f"{image_path}: wrong shape {image.shape}, expected HxWx3")
    if image.dtype != np.uint8:
        raise DataError(f"{image_path}: wrong dtype {image.dtype}, expected uint8")
    if mask.ndim == 3 and mask.shape[-1] in (3, 4) and (mask == mask[..., :1]).all():
        mask = mask[..., 0]  # a few exporters write grey masks as RGB
    if mask.shape != image.shape[:2]:
        raise DataError(f"{mask_path}: wrong shape {mask.shape}, expected {image.shape[:2]} like its image")
    if mask.dtype != np.uint8:
        raise DataError(f"{mask_path}: wrong dtype {mask.dtype}, expected uint8")
    values = np.unique(mask)
    if classes == 1:
        if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
            raise DataError(f"{mask_path}: non-binary mask (values {values[:8].tolist()}), expected 0/255")
        mask = (mask > 0).astype(np.uint8)
    elif values.max() > classes:
        raise DataError(f"{mask_path}: label {values.max()} outside 0..{classes}")
    return image, mask


def read_patients(src: str | Path, classes: int = 1, progress: bool = False) -> Iterator[Patient]:
    """Decode and validate every patient of a Kaggle-layout folder, one patient at a time."""
    layout = scan(src)
    total = sum(len(v) for v in layout.values())
    bar = tqdm(total=total, desc="reading slices", unit="slice", disable=not progress)
    size: tuple[int, ...] | None = None
    with ThreadPoolExecutor(max_workers=4) as pool:
        for folder, items in layout.items():
            pairs = list(pool.map(lambda it: _check_pair(it[1], it[2], classes), items))
            for (_, image_path, _), (image, _) in zip(items, pairs, strict=True):
                size = size or image.shape
                if image.shape != size:
                    raise DataError(f"{image_path}: size {image.shape} differs from the data set's {size}")
            bar.update(len(items))
            yield Patient(
                id=patient_id(folder.name),
                images=np.stack([p[0] for p in pairs]),
                masks=np.stack([p[1] for p in pairs]),
                slices=np.array([k for k, _, _ in items], dtype=np.int32),
            )
    bar.close()


def _count(value: float, n: int) -> int:
    """A fraction of n patients (at least one when asked for any), or an absolute count when >= 1."""
    if value >= 1:
        return int(value)
    return 0 if value <= 0 else max(1, round(value * n))


def split_patients(
    tumour_fraction: dict[str, float], val: float, test: float, seed: int, tries: int = 4000
) -> dict[str, list[str]]:
    """Patient-level split whose tumour-slice fractions are as close to each other as seeded search finds."""
    ids = sorted(tumour_fraction)
    n_val, n_test = _count(val, len(ids)), _count(test, len(ids))
    if n_val + n_test >= len(ids):
        raise DataError(f"{len(ids)} patients cannot give {n_val} val + {n_test} test and any training patients")
    rng = np.random.default_rng(seed)
    frac = np.array([tumour_fraction[i] for i in ids])
    best, best_cost = None, np.inf
    for _ in range(tries):
        order = rng.permutation(len(ids))
        parts = [order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]]
        means = [frac[p].mean() for p in parts if len(p)]
        cost = max(means) - min(means)
        if cost < best_cost:
            best, best_cost = parts, cost
    assert best is not None
    return {name: sorted(ids[i] for i in part) for name, part in zip(SPLITS, best, strict=True)}


def fold_patients(tumour_fraction: dict[str, float], folds: int, seed: int, tries: int = 4000) -> list[list[str]]:
    """K patient-disjoint folds of near-equal size covering every patient once, their tumour-slice
    fractions as close to each other as seeded search finds (as ``split_patients`` balances splits)."""
    ids = sorted(tumour_fraction)
    if not 2 <= folds <= len(ids):
        raise DataError(f"{len(ids)} patients cannot give {folds} folds (need 2 <= folds <= patients)")
    rng = np.random.default_rng(seed)
    frac = np.array([tumour_fraction[i] for i in ids])
    best, best_cost = None, np.inf
    for _ in range(tries):
        parts = np.array_split(rng.permutation(len(ids)), folds)
        means = [frac[p].mean() for p in parts]
        cost = max(means) - min(means)
        if cost < best_cost:
            best, best_cost = parts, cost
    assert best is not None
    return sorted((sorted(ids[i] for i in part) for part in best), key=lambda f: f[0])


@dataclass
class SplitOptions:
    """A seeded split of patients into train, val and test, balanced by tumour fraction (``split_patients``)."""

    val: float = field(default=0.1, metadata=meta("fraction of patients, or a count when >= 1"))
    test: float = field(default=0.1, metadata=meta("fraction of patients, or a count when >= 1"))
    seed: int = field(default=0, metadata=meta("seeds the split"))


def prepare(src: str | Path, out: str | Path, split: SplitOptions | None = None,
            split_file: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Read, validate, split (``split_file``'s patients, else ``split``, by default SplitOptions()) and write;
    ``out`` is replaced atomically only when everything succeeded."""
    src = Path(src)
    class_names = source_class_names(src)
    patients = {p.id: p for p in read_patients(src, len(class_names) - 1, progress)}
    return write_prepared(src, patients, out, class_names, split, split_file)


def source_class_names(src: Path) -> list[str]:
    """A Kaggle-layout folder's classes: its ``classes.json`` (multi-class masks), else background and tumour."""
    if (src / "classes.json").is_file():
        return list(read_json(src / "classes.json")["class_names"])
    return ["background", "tumour"]


def write_prepared(
    src: str | Path,
    patients: dict[str, Patient],
    out: str | Path,
    class_names: list[str],
    split: SplitOptions | None = None,
    split_file: str | Path | None = None,
    assignment: dict[str, list[str]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Split (``assignment`` as given, a split file's, or balanced by seed) and write; any source's patients
    (the Kaggle layout here, nnU-Net datasets in core.data.nnunet) of one in-plane size."""
    src, split = Path(src), split or SplitOptions()
    classes = len(class_names) - 1
    if not patients:
        raise DataError(f"{src}: no patients")
    if assignment is not None:
        unknown = sorted({p for ids in assignment.values() for p in ids} - set(patients))
        if unknown:
            raise DataError(f"{src}: split names patients it does not have: {', '.join(unknown[:5])}")
        assignment = {s: sorted(assignment.get(s, [])) for s in SPLITS}
    elif split_file:
        wanted = read_json(split_file)["patients"]
        unknown = sorted({p for ids in wanted.values() for p in ids} - set(patients))
        if unknown:
            raise DataError(f"{split_file}: patients not in {src}: {', '.join(unknown[:5])}")
        assignment = {s: sorted(wanted.get(s, [])) for s in SPLITS}
    else:
        fractions = {pid: float((p.masks.reshape(len(p.masks), -1).max(1) > 0).mean()) for pid, p in patients.items()}
        assignment = split_patients(fractions, split.val, split.test, split.seed)
    first = next(iter(patients.values()))
    info: dict[str, Any] = {
        "src": str(src.resolve()),
        "seed": split.seed,
        "image_size": list(first.images.shape[1:3]),
        "channels": 3,
        "classes": classes,
        "class_names": class_names,
        "patients": assignment,
        "counts": {},
        **(extra or {}),
    }
    with atomic_dir(out) as tmp:
        for name in SPLITS:
            chosen = [patients[pid] for pid in assignment[name]]
            arrays = stack_patients(chosen, tuple(info["image_size"]))
            save_split(tmp / name, arrays)
            tumour = int(arrays.tumour.sum()) if len(arrays) else 0
            info["counts"][name] = {
                "patients": len(chosen),
                "slices": len(arrays),
                "tumour_slices": tumour,
                "tumour_fraction": round(tumour / max(len(arrays), 1), 4),
            }
        info["split_hash"] = split_hash(info)
        write_json(tmp / "split.json", info)
    return info


def stack_patients(patients: list[Patient], size: tuple[int, int] = (0, 0)) -> SplitArrays:
    """Concatenate patients into one SplitArrays (channel-first images); ``size`` shapes an empty one."""
    if not patients:
        h, w = size
        return SplitArrays(
            np.zeros((0, 3, h, w), np.uint8), np.zeros((0, h, w), np.uint8), np.zeros(0, "<U1"), np.zeros(0, np.int32)
        )
    return SplitArrays(
        images=np.concatenate([p.images.transpose(0, 3, 1, 2) for p in patients]),
        masks=np.concatenate([p.masks for p in patients]),
        patients=np.concatenate([np.full(len(p.slices), p.id) for p in patients]),
        slices=np.concatenate([p.slices for p in patients]),
    )
