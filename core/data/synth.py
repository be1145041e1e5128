"""A synthetic LGG-like data set written in the Kaggle `kaggle_3m` layout (the embedded default).

Each patient is a 3D volume: a skull-stripped-looking head ellipsoid with grey/white matter texture,
ventricles, FLAIR-bright periventricular caps (a distractor), and an irregular lesion that is bright in
FLAIR, dark in the pre-contrast channel and sometimes enhancing, coherent across neighbouring slices.
Per-patient gain, gamma, bias field and noise vary; a few patients have a missing channel replaced by
FLAIR, as in the real data. Deterministic per seed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from core.io import atomic_dir

# Label order for --classes K: label k is CLASS_NAMES[k]; binary data uses labels 0/1 only.
CLASS_NAMES = ("background", "tumour_core", "oedema", "csf", "white_matter", "grey_matter")
MAX_CLASSES = len(CLASS_NAMES) - 1

#                pre-contrast, FLAIR, post-contrast (0-1 intensities before gain/noise)
TISSUE = {
    "csf": (0.12, 0.10, 0.14),
    "grey": (0.45, 0.55, 0.48),
    "white": (0.62, 0.44, 0.60),
    "caps": (0.50, 0.66, 0.52),
    "oedema": (0.38, 0.86, 0.45),
    "core": (0.30, 0.80, 0.85),
}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _patient_volume(
    rng: np.random.Generator, slices: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (images (S,H,W,3) uint8, labels (S,H,W) uint8 in CLASS_NAMES order)."""
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, slices), np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij"
    )
    z, y, x = (a.astype(np.float32) for a in (z, y, x))
    cy, cx = rng.uniform(-0.05, 0.05, 2)
    ry, rx, rz = rng.uniform(0.8, 0.92), rng.uniform(0.64, 0.76), rng.uniform(1.15, 1.35)
    yy, xx = y - cy, x - cx
    head = (yy / ry) ** 2 + (xx / rx) ** 2 + (z / rz) ** 2
    coarse = max(2.0, size / 32)
    brain = head + 0.04 * _smooth_noise(rng, head.shape, coarse) < 1.0
    cortex = brain & (head > 0.72)
    texture = _smooth_noise(rng, head.shape, max(1.0, size / 96))
    white = brain & ~cortex & (texture > -0.35)
    vent = ((yy + 0.05) / 0.16) ** 2 + (np.abs(xx) - 0.11) ** 2 / 0.07**2 + (z / 0.45) ** 2 < 1.0
    caps = (((yy + 0.05) / 0.24) ** 2 + (np.abs(xx) - 0.11) ** 2 / 0.12**2 + (z / 0.5) ** 2 < 1.0) & ~vent
    caps &= rng.uniform() < 0.6

    labels = np.zeros(head.shape, np.uint8)
    labels[brain] = 5
    labels[white] = 4
    labels[vent & brain] = 3

    # Lesion: 1-2 irregular ellipsoids spanning ~20-50% of the slices (~35% tumour slices on average).
    lesion_extent = rng.uniform(0.2, 0.5)
    zc = rng.uniform(-0.5, 0.5) * (1 - lesion_extent)
    lesion = np.zeros(head.shape, bool)
    wobble = _smooth_noise(rng, head.shape, coarse * 1.5)
    for k in range(1 + int(rng.uniform() < 0.3)):
        ly, lx = rng.uniform(-0.4, 0.4) * ry, rng.uniform(-0.45, 0.45) * rx
        sy, sx = rng.uniform(0.12, 0.3, 2) * (0.6 if k else 1.0)
        sz = 1.05 * lesion_extent * (0.6 if k else 1.0)
        d = ((yy - ly) / sy) ** 2 + ((xx - lx) / sx) ** 2 + ((z - zc) / sz) ** 2
        lesion |= d * (1 + 0.3 * np.clip(wobble, -1.5, 1.5)) < 1.0
    lesion &= brain
    core = lesion & (ndimage.distance_transform_edt(lesion, sampling=(3, 1, 1)) > rng.uniform(2, 6) * size / 128)
    labels[lesion] = 2
    labels[core] = 1

    image = np.zeros((*head.shape, 3), np.float32)
    for name, region in (("grey", labels == 5), ("white", labels == 4), ("csf", labels == 3), ("caps", caps & brain)):
        image[region] = TISSUE[name]
    enhancing = rng.uniform() < 0.5
    image[labels == 2] = TISSUE["oedema"]
    image[labels == 1] = TISSUE["core"] if enhancing else TISSUE["oedema"]
    image += 0.05 * texture[..., None] * brain[..., None]

    # Per-patient acquisition: bias field, gain, gamma, blur and noise; some channels missing.
    bias = 1 + 0.12 * _smooth_noise(rng, head.shape, size / 6)
    image *= bias[..., None] * rng.uniform(0.75, 1.1, 3)
    image = np.clip(image, 0, 1) ** rng.uniform(0.8, 1.25)
    image = ndimage.gaussian_filter(image, (0, 0.7, 0.7, 0))
    image += rng.uniform(0.01, 0.04) * rng.standard_normal(image.shape).astype(np.float32) * brain[..., None]
    if rng.uniform() < 0.15:
        image[..., rng.choice([0, 2])] = image[..., 1]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), labels


def synthesize(
    out: str | Path,
    patients: int = 12,
    slices: int = 24,
    size: int = 256,
    seed: int = 0,
    classes: int = 1,
) -> Path:
    """Write ``out/kaggle_3m`` (replacing it atomically); returns that folder."""
    if patients < 1 or slices < 1 or size < 32:
        raise ValueError("need --patients >= 1, --slices >= 1 and --size >= 32")
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"--classes must be 1..{MAX_CLASSES}, got {classes}")
    target = Path(out) / "kaggle_3m"
    with atomic_dir(target) as tmp:
        rows = []
        for p in range(patients):
            rng = np.random.default_rng([seed, p])
            patient = f"TCGA_SY_{1000 + p}"
            folder = tmp / f"{patient}_{20260101 + p}"
            folder.mkdir()
            images, labels = _patient_volume(rng, slices, size)
            masks = _labels_to_masks(labels, classes)
            for k in range(slices):
                stem = folder / f"{folder.name}_{k + 1}"
                tifffile.imwrite(f"{stem}.tif", images[k], photometric="rgb")
                tifffile.imwrite(f"{stem}_mask.tif", masks[k], photometric="minisblack")
            rows.append({"Patient": patient, "synthetic": 1, "tumour_slices": int((masks.max((1, 2)) > 0).sum())})
        with open(tmp / "data.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        if classes > 1:
            (tmp / "classes.json").write_text(json.dumps({"class_names": list(CLASS_NAMES[: classes + 1])}))
    return target


def _labels_to_masks(labels: np.ndarray, classes: int) -> np.ndarray:
    """Binary: lesion (core + oedema) as 0/255, the Kaggle convention. K classes: labels 0..K."""
    if classes == 1:
        return np.where((labels == 1) | (labels == 2), 255, 0).astype(np.uint8)
    return np.where(labels <= classes, labels, 0).astype(np.uint8)
