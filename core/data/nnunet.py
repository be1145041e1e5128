"""nnU-Net v2 raw datasets in and out: ``DatasetNNN_Name/`` with ``dataset.json`` (``channel_names``,
``labels``, ``file_ending``), ``imagesTr/<case>_XXXX<ending>``, ``labelsTr/<case><ending>`` and
``imagesTs/`` (with ``labelsTs/`` where the test cases have labels, as many datasets add).

``prepare_nnunet`` reads one into the prepared/ arrays (core.data.arrays): each case through
core.formats.nifti (canonical axial slices, channels mapped from ``channel_names`` to pre-contrast,
FLAIR, post-contrast, a missing one filled with FLAIR), its labels put on the same slices. The in-plane
size is made common (the most frequent one, or ``size``) and every case resized is recorded. The split
is fold ``fold`` of ``splits_final.json`` beside dataset.json (train/val) plus the labelled imagesTs
cases (test) when there is one; else balanced by seed as for the Kaggle layout.

``export_nnunet`` writes a prepared directory or a Kaggle-layout folder as such a dataset, the split as
nnU-Net's ``splits_final.json`` (one fold: our train/val; the test patients in imagesTs/labelsTs), so
nnU-Net trains and is compared on exactly our patients.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from core.data.arrays import SPLITS, load_split, load_split_info
from core.data.prepare import (
    DataError,
    Patient,
    SplitOptions,
    read_patients,
    source_class_names,
    split_patients,
    write_prepared,
)
from core.formats.nifti import load_nifti, mm_affine, read_array, read_nifti
from core.formats.volume import SEQUENCE_TITLES, SEQUENCES, VolumeError, parse_sequences, slices_grid
from core.io import atomic_dir, read_json, write_json

DATASET_NAME = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_-]+$")
ENDINGS = (".nii.gz", ".nii")  # read with nibabel; nnU-Net's other readers (PNG, TIFF, NRRD) are not
EXPORT_CHANNELS = {"0": "pre-contrast", "1": "FLAIR", "2": "post-contrast"}


def is_nnunet_dataset(path: str | Path) -> bool:
    return (Path(path) / "dataset.json").is_file() and (Path(path) / "imagesTr").is_dir()


def read_dataset_json(src: Path) -> dict[str, Any]:
    """dataset.json, checked: channel names, consecutive integer labels, a NIfTI file ending."""
    try:
        meta = read_json(src / "dataset.json")
    except ValueError as exc:
        raise DataError(f"{src / 'dataset.json'}: not valid JSON ({exc})") from exc
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise DataError(f"{src / 'dataset.json'}: no {key!r} (an nnU-Net v2 dataset.json has channel_names, "
                            "labels and file_ending)")
    if meta["file_ending"] not in ENDINGS:
        raise DataError(f"{src / 'dataset.json'}: file_ending {meta['file_ending']!r}; only NIfTI "
                        f"({', '.join(ENDINGS)}) is read")
    return meta


def class_names_from_labels(labels: dict[str, Any], where: Path) -> list[str]:
    """``{"background": 0, "tumour": 1}`` -> ['background', 'tumour'] (labels 0..K, in order)."""
    if any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        raise DataError(f"{where}: region-based labels ({labels}) are not supported; give one integer per class")
    if "ignore" in labels:
        raise DataError(f"{where}: an 'ignore' label is not supported (prepared masks have no ignore value)")
    by_value = {v: k for k, v in labels.items()}
    if sorted(by_value) != list(range(len(labels))) or by_value.get(0) is None:
        raise DataError(f"{where}: labels {labels} must be consecutive integers from 0 (background)")
    return [by_value[i] for i in range(len(labels))]


def channel_sequences(channel_names: dict[str, str]) -> tuple[list[str | None], dict[str, str]]:
    """Which channel feeds which model input, from the dataset's names (FLAIR, T1w, t1gd, T2w ...); names
    that say nothing (or no FLAIR among them): the first three channels in order, one channel as FLAIR."""
    names = [str(channel_names[k]) for k in sorted(channel_names, key=int)]
    mapped = parse_sequences(names)
    if "flair" not in mapped or len({m for m in mapped if m}) != sum(1 for m in mapped if m):
        mapped = ["flair"] if len(names) == 1 else [*SEQUENCES[: len(names)], *([None] * (len(names) - 3))]
    return mapped, {seq: name for seq, name in zip(mapped, names, strict=True) if seq}


def _cases(folder: Path, ending: str, channels: int) -> dict[str, list[Path]]:
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    found: dict[str, dict[int, Path]] = {}
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        if f.name.startswith("."):
            continue
        m = pattern.match(f.name)
        if not m:
            raise DataError(f"{f}: unexpected file (expected <case>_XXXX{ending})")
        found.setdefault(m["case"], {})[int(m["channel"])] = f
    for case, files in found.items():
        missing = [i for i in range(channels) if i not in files]
        if missing or len(files) != channels:
            raise DataError(f"{folder}/{case}: channel files {sorted(files)}, expected 0..{channels - 1} "
                            f"(dataset.json names {channels} channels)")
    return {case: [files[i] for i in range(channels)] for case, files in found.items()}


def read_case(case: str, files: list[Path], label: Path, sequences: list[str | None] | None, classes: int
              ) -> tuple[Patient, float]:
    """One case as a Patient (canonical slices, its labels on them: the same grid demanded) and its
    voxel volume in mL."""
    try:
        volume = read_nifti(files, sequences=None if sequences is None else [s or "-" for s in sequences], name=case)
        image = load_nifti(label)
        values = read_array(image, str(label))
    except VolumeError as exc:
        raise DataError(f"{case}: {exc}") from exc
    values = values.reshape(values.shape[:3] + (1,) * (3 - values.ndim)) if values.ndim < 3 else values
    if values.shape != volume.source_shape or not np.allclose(mm_affine(image), volume.affine, atol=1e-3):
        raise DataError(f"{label}: labels of shape {values.shape} on another grid than the images "
                        f"{volume.source_shape}")
    if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
        raise DataError(f"{label}: labels must be whole numbers")
    if values.min() < 0 or values.max() > classes:
        raise DataError(f"{label}: labels {int(values.min())}..{int(values.max())} outside 0..{classes}")
    masks = volume.to_canonical(values.astype(np.uint8))
    n = len(volume.images)
    patient = Patient(id=case, images=volume.images, masks=masks, slices=np.arange(1, n + 1, dtype=np.int32))
    return patient, volume.voxel_ml


def resize_patient(p: Patient, size: tuple[int, int]) -> Patient:
    """Slices to another in-plane size: images linearly, labels by nearest neighbour (they stay labels)."""
    h, w = p.images.shape[1:3]
    zoom = (1, size[0] / h, size[1] / w)
    images = ndimage.zoom(p.images, (*zoom, 1), order=1, grid_mode=True, mode="nearest")
    masks = ndimage.zoom(p.masks, zoom, order=0, grid_mode=True, mode="nearest")
    return Patient(p.id, images.astype(np.uint8), masks.astype(np.uint8), p.slices)


def common_size(patients: dict[str, Patient], size: int | None = None
                ) -> tuple[dict[str, Patient], dict[str, list[int]]]:
    """Every patient at one in-plane size (``size``, else the most common); returns who was resized from what."""
    sizes = Counter(p.images.shape[1:3] for p in patients.values())
    target = (size, size) if size else sizes.most_common(1)[0][0]
    resized = {pid: list(p.images.shape[1:3]) for pid, p in patients.items() if p.images.shape[1:3] != target}
    return {pid: (resize_patient(p, target) if pid in resized else p) for pid, p in patients.items()}, resized


@dataclass
class Cases:
    """The labelled cases of an nnU-Net dataset, as read (own in-plane sizes)."""

    patients: dict[str, Patient]
    voxel_ml: dict[str, float]
    test_ids: list[str]  # labelled imagesTs cases
    class_names: list[str]
    channels: dict[str, str]  # sequence -> the dataset's channel name


def read_nnunet(src: str | Path) -> Cases:
    """Every labelled case of imagesTr (each must have labels) and imagesTs (those with labelsTs)."""
    src = Path(src)
    meta = read_dataset_json(src)
    class_names = class_names_from_labels(meta["labels"], src / "dataset.json")
    sequences, channels = channel_sequences(meta["channel_names"])
    ending = meta["file_ending"]
    out = Cases({}, {}, [], class_names, channels)
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for case, files in _cases(src / images_dir, ending, len(sequences)).items():
            label = src / labels_dir / f"{case}{ending}"
            if not label.is_file():
                if images_dir == "imagesTr":
                    raise DataError(f"{label}: missing labels for {files[0]}")
                continue  # an unlabelled test case: nothing to train or evaluate on
            if case in out.patients:
                raise DataError(f"{src}: case {case} is in both imagesTr and imagesTs")
            out.patients[case], out.voxel_ml[case] = read_case(case, files, label, sequences, len(class_names) - 1)
            if images_dir == "imagesTs":
                out.test_ids.append(case)
    if not out.patients:
        raise DataError(f"{src}/imagesTr: no cases")
    return out


def prepare_nnunet(src: str | Path, out: str | Path, split: SplitOptions | None = None,
                   split_file: str | Path | None = None, size: int | None = None, fold: int = 0) -> dict[str, Any]:
    """An nnU-Net v2 raw dataset -> prepared/ (split.json records channels, size, resized cases, fold); split
    by its splits_final.json's ``fold`` unless ``split_file`` is given, else by ``split`` (``prepare``'s)."""
    src = Path(src)
    cases = read_nnunet(src)
    patients, resized = common_size(cases.patients, size)
    assignment = None
    splits = src / "splits_final.json"
    if not split_file and splits.is_file():
        folds = read_json(splits)
        if not isinstance(folds, list) or not 0 <= fold < len(folds):
            raise DataError(f"{splits}: no fold {fold} (it has {len(folds) if isinstance(folds, list) else 0})")
        assignment = {"train": list(folds[fold]["train"]), "val": list(folds[fold]["val"]), "test": cases.test_ids}
    extra = {"format": "nnunet", "channel_names": {k: cases.channels.get(k) for k in SEQUENCES},
             "resized": resized, "fold": fold if assignment else None,
             "filled_with_flair": [SEQUENCE_TITLES[s] for s in SEQUENCES if s not in cases.channels]}
    return write_prepared(src, patients, out, cases.class_names, split, split_file, assignment, extra)


def _source_patients(src: Path, split: SplitOptions) -> tuple[dict[str, list[Patient]], list[str]]:
    """Patients per split of a prepared directory, or of a Kaggle folder split by seed."""
    if (src / "split.json").is_file():
        info = load_split_info(src)
        out: dict[str, list[Patient]] = {}
        for name in SPLITS:
            arrays = load_split(src, name)
            out[name] = [Patient(str(arrays.patients[r[0]]), np.asarray(arrays.images[r]).transpose(0, 2, 3, 1),
                                  np.asarray(arrays.masks[r]), np.asarray(arrays.slices[r]))
                          for r in arrays.patient_rows()]
        return out, list(info.get("class_names", ["background", "tumour"]))
    class_names = source_class_names(src)
    patients = {p.id: p for p in read_patients(src, len(class_names) - 1)}
    fractions = {pid: float((p.masks.reshape(len(p.masks), -1).max(1) > 0).mean()) for pid, p in patients.items()}
    assignment = split_patients(fractions, split.val, split.test, split.seed)
    return {name: [patients[pid] for pid in assignment[name]] for name in SPLITS}, class_names


def _write_nifti(path: Path, canonical: np.ndarray, spacing: tuple[float, float, float]) -> None:
    data, affine = slices_grid(canonical, spacing)
    image = nib.Nifti1Image(data.astype(np.uint8), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))


def export_nnunet(src: str | Path, out: str | Path, split: SplitOptions | None = None,
                  spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, Any]:
    """Write ``out`` (named DatasetNNN_Name) as an nnU-Net v2 raw dataset; returns its dataset.json. A kaggle_3m
    source is split by ``split`` (default SplitOptions()), a prepared directory keeps its own."""
    src, out = Path(src), Path(out)
    if not DATASET_NAME.match(out.name):
        raise DataError(f"{out}: nnU-Net datasets are named DatasetNNN_Name (e.g. Dataset501_LGG)")
    by_split, class_names = _source_patients(src, split or SplitOptions())
    if not by_split["train"]:
        raise DataError(f"{src}: no training patients to export")
    with atomic_dir(out) as tmp:
        for name, patients in by_split.items():
            images, labels = ("imagesTs", "labelsTs") if name == "test" else ("imagesTr", "labelsTr")
            (tmp / images).mkdir(exist_ok=True)
            (tmp / labels).mkdir(exist_ok=True)
            for p in patients:
                for c in range(3):
                    _write_nifti(tmp / images / f"{p.id}_{c:04d}.nii.gz", p.images[..., c], spacing)
                _write_nifti(tmp / labels / f"{p.id}.nii.gz", p.masks, spacing)
        meta = {
            "name": out.name.split("_", 1)[1], "description": f"exported by gliomaseg from {src.name}",
            "channel_names": dict(EXPORT_CHANNELS), "labels": {name: i for i, name in enumerate(class_names)},
            "numTraining": len(by_split["train"]) + len(by_split["val"]), "file_ending": ".nii.gz",
            "spacing_note": f"voxel spacing (slice, row, column) {list(spacing)} mm as exported",
        }
        write_json(tmp / "dataset.json", meta)
        # nnU-Net reads splits_final.json from nnUNet_preprocessed/<dataset>/; copy it there after planning
        write_json(tmp / "splits_final.json", [{"train": sorted(p.id for p in by_split["train"]),
                                                "val": sorted(p.id for p in by_split["val"])}])
    return meta
