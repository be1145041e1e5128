"""Mask post-processing: minimum lesion area per slice; per patient, 3D components below a minimum size
removed (every component that passes is kept, so a large false positive never costs the tumour its
place), or the older largest-component rule (kept for bundles that chose it; selection no longer offers it).

A path that sees one slice at a time cannot apply the 3D rule, so it has its own minimum lesion area
(``min_area_slice``, chosen on val for that path; bundles without it use ``min_area``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

NO_POSTPROCESS: dict[str, Any] = {"largest_component": False, "min_area": 0, "min_volume": 0, "min_area_slice": 0}
CONNECTIVITY_3D = np.ones((3, 3, 3), dtype=bool)


def remove_small_lesions(masks: np.ndarray, min_area: int) -> np.ndarray:
    """Zero 2D connected components smaller than ``min_area`` pixels in each (H,W) slice of (N,H,W)."""
    if min_area <= 0:
        return masks
    out = masks.copy()
    for m in out:
        labels, n = ndimage.label(m > 0)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())
        small = np.flatnonzero(sizes < min_area)
        small = small[small > 0]
        if small.size:
            m[np.isin(labels, small)] = 0
    return out


def remove_small_components(masks: np.ndarray, min_volume: int) -> np.ndarray:
    """Zero the 3D connected components of one patient's (N,H,W) stack smaller than ``min_volume`` voxels."""
    if min_volume <= 0:
        return masks
    labels, n = ndimage.label(masks > 0, structure=CONNECTIVITY_3D)
    if n == 0:
        return masks
    sizes = np.bincount(labels.ravel())
    sizes[0] = min_volume  # background is never "small"
    return np.where(sizes[labels] >= min_volume, masks, 0).astype(masks.dtype)


def keep_largest_component(masks: np.ndarray) -> np.ndarray:
    """Keep the largest 3D connected component of the foreground of one patient's (N,H,W) stack."""
    labels, n = ndimage.label(masks > 0, structure=CONNECTIVITY_3D)
    if n <= 1:
        return masks
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.where(labels == int(sizes.argmax()), masks, 0).astype(masks.dtype)


def apply_postprocess(masks: np.ndarray, settings: dict[str, Any], volume: bool) -> np.ndarray:
    """Apply a bundle's post-processing to (N,H,W) masks: as one volume (``min_area``, then the 3D step), or
    slice by slice (``min_area_slice``)."""
    area = settings.get("min_area", 0) if volume else settings.get("min_area_slice", settings.get("min_area", 0))
    out = remove_small_lesions(masks, int(area))
    if volume:
        out = remove_small_components(out, int(settings.get("min_volume", 0)))
    if volume and settings.get("largest_component", False):
        out = keep_largest_component(out)
    return out
