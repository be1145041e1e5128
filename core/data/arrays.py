"""The prepared/ layout: split.json plus per-split uint8 arrays, memory-mapped on load."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.io import read_json

SPLITS = ("train", "val", "test")
ARRAYS = ("images", "masks", "patients", "slices")


@dataclass
class SplitArrays:
    """One split: images (N,3,H,W) uint8, masks (N,H,W) uint8 labels, patient id and slice index per row."""

    images: np.ndarray
    masks: np.ndarray
    patients: np.ndarray
    slices: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def tumour(self) -> np.ndarray:
        """Boolean per slice: does the ground truth have any foreground pixel."""
        return self.masks.reshape(len(self), -1).max(axis=1) > 0

    def select(self, rows: np.ndarray) -> SplitArrays:
        return SplitArrays(self.images[rows], self.masks[rows], self.patients[rows], self.slices[rows])

    def patient_rows(self) -> list[np.ndarray]:
        return patient_rows(self.patients, self.slices)

    def fold(self, folds: list[list[str]], k: int, info: dict[str, Any],
             ) -> tuple[SplitArrays, SplitArrays, dict[str, Any]]:
        """(train, val, split info) of fold ``k`` of this pool: validated on its patients, trained on the others."""
        in_fold = np.isin(np.asarray(self.patients).astype(str), folds[k])
        train_ids = sorted(p for i, f in enumerate(folds) if i != k for p in f)
        fold_info = {**info, "patients": {"train": train_ids, "val": list(folds[k]), "test": []}, "fold": k}
        return self.select(np.flatnonzero(~in_fold)), self.select(np.flatnonzero(in_fold)), fold_info


def patient_rows(patients: np.ndarray, slices: np.ndarray) -> list[np.ndarray]:
    """Row indices of each patient (patients sorted by id), each patient's slices in order: its volume."""
    patients = np.asarray(patients).astype(str)
    order = np.lexsort((np.asarray(slices), patients))
    ids = patients[order]
    return np.split(order, np.flatnonzero(ids[1:] != ids[:-1]) + 1) if len(order) else []


def load_split(prepared: str | os.PathLike, split: str, mmap: bool = True) -> SplitArrays:
    """Load one split of a prepared directory (memory-mapped unless ``mmap=False``)."""
    folder = Path(prepared) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such split; run `python -m core data prepare` first")
    mode = "r" if mmap else None
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode=mode, allow_pickle=False) for name in ARRAYS}
    return SplitArrays(**arrays)


def load_split_info(prepared: str | os.PathLike) -> dict[str, Any]:
    """split.json: patients per split, seed, slice and tumour-slice counts, classes, image size."""
    path = Path(prepared) / "split.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {prepared} a prepared directory?")
    return read_json(path)


def save_split(folder: Path, arrays: SplitArrays) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        np.save(folder / f"{name}.npy", np.ascontiguousarray(getattr(arrays, name)), allow_pickle=False)


def split_hash(split: dict[str, Any]) -> str:
    """A stable hash of which patients are in which split, recorded in the bundle."""
    patients = {k: sorted(v) for k, v in split.get("patients", {}).items()}
    return hashlib.sha256(json.dumps(patients, sort_keys=True).encode()).hexdigest()[:16]
