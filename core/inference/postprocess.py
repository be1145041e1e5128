"""Mask post-processing in physical units, so a scan at any spacing gets the same rule.

Per slice, lesions below a minimum area (mm2) are removed; per patient, 3D components below a minimum
volume (mm3) or whose mean tumour probability is below a minimum are removed (every component that
passes is kept, so a large false positive never costs the tumour its place). The probability rule is
what separates the confident tumours from the fainter false regions that no size rule can
(heldout-findings: a 7,114-voxel false region beside a 2,493-voxel tumour). The largest-component rule
is applied where a bundle's config names it, but selection does not offer it: beside a larger false
positive it would remove the tumour itself.

A rule never turns a volume in which the network found tumour into an empty mask
(``postprocess_volume``): the answer is then the network's own mask, flagged for review. A rule that
empties a whole scan has overruled the network everywhere, which is a call for a reader, not a rule.

A path that sees one slice at a time cannot apply the 3D rules, so it has its own minimum lesion area
and probability (``min_area_slice_mm2``, ``min_probability_slice``), applied to each slice's 2D lesions.

Bundles written before the physical units carry voxel counts (``min_volume``, ``min_area``,
``min_area_slice``); they are read as counts on the Kaggle grid (``KAGGLE_SPACING_MM``), which is also
the spacing of any input that has none (Kaggle TIFF slices, NPY), so those bundles keep their masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

# The Kaggle slices carry no header. TCGA-LGG's axial FLAIR is mostly a 240 mm field on 256 px with
# slices about 5 mm apart (nominal; individual series range 2.5-7.5 mm): the grid every voxel-count
# rule was chosen on, and the spacing assumed for input without one.
KAGGLE_SPACING_MM: tuple[float, float, float] = (5.0, 0.9375, 0.9375)
NO_POSTPROCESS: dict[str, Any] = {"largest_component": False, "min_area_mm2": 0.0, "min_volume_mm3": 0.0,
                                  "min_probability": 0.0, "min_area_slice_mm2": 0.0, "min_probability_slice": 0.0}
CONNECTIVITY_3D = np.ones((3, 3, 3), dtype=bool)
_EPS = 1e-6  # a count converted to mm and back must compare equal to itself


def physical(settings: dict[str, Any]) -> dict[str, Any]:
    """A bundle's post-processing in mm (NO_POSTPROCESS's keys); voxel counts of older bundles converted
    on the Kaggle grid. The one-slice rule falls back to the volume's area rule, as it always has."""
    area_mm2 = KAGGLE_SPACING_MM[1] * KAGGLE_SPACING_MM[2]
    out = dict(NO_POSTPROCESS)
    out["largest_component"] = bool(settings.get("largest_component", False))
    out["min_area_mm2"] = float(settings.get("min_area_mm2", settings.get("min_area", 0) * area_mm2))
    out["min_volume_mm3"] = float(settings.get("min_volume_mm3",
                                               settings.get("min_volume", 0) * area_mm2 * KAGGLE_SPACING_MM[0]))
    out["min_probability"] = float(settings.get("min_probability", 0.0))
    if "min_area_slice_mm2" in settings:
        out["min_area_slice_mm2"] = float(settings["min_area_slice_mm2"])
    elif "min_area_slice" in settings:
        out["min_area_slice_mm2"] = float(settings["min_area_slice"]) * area_mm2
    else:
        out["min_area_slice_mm2"] = out["min_area_mm2"]
    out["min_probability_slice"] = float(settings.get("min_probability_slice", 0.0))
    return out


def _drop_components(masks: np.ndarray, labels: np.ndarray, n: int, min_size: float, voxel: float,
                     probs: np.ndarray | None, min_probability: float) -> np.ndarray:
    """Zero the labelled components smaller than ``min_size`` (in voxel units of ``voxel``) or with a mean
    probability below ``min_probability``."""
    if n == 0:
        return masks
    keep = np.bincount(labels.ravel(), minlength=n + 1) * voxel >= min_size - _EPS
    if probs is not None and min_probability > 0:
        sums = np.bincount(labels.ravel(), weights=probs.ravel().astype(np.float64), minlength=n + 1)
        counts = np.maximum(np.bincount(labels.ravel(), minlength=n + 1), 1)
        keep &= sums / counts >= min_probability
    keep[0] = True  # background is never removed
    if keep.all():
        return masks
    return np.where(keep[labels], masks, 0).astype(masks.dtype)


def remove_small_lesions(masks: np.ndarray, min_area_mm2: float, pixel_mm2: float = 1.0,
                         probs: np.ndarray | None = None, min_probability: float = 0.0) -> np.ndarray:
    """Zero the 2D connected components of each (H,W) slice of (N,H,W) smaller than ``min_area_mm2``
    (pixels of ``pixel_mm2``) or, given ``probs``, with a mean probability below ``min_probability``."""
    if min_area_mm2 <= 0 and (probs is None or min_probability <= 0):
        return masks
    out = masks.copy()
    for i, m in enumerate(out):
        labels, n = ndimage.label(m > 0)
        out[i] = _drop_components(m, labels, n, min_area_mm2, pixel_mm2, None if probs is None else probs[i],
                                  min_probability)
    return out


def remove_small_components(masks: np.ndarray, min_volume_mm3: float, voxel_mm3: float = 1.0,
                            probs: np.ndarray | None = None, min_probability: float = 0.0) -> np.ndarray:
    """Zero the 3D components of one patient's (N,H,W) stack smaller than ``min_volume_mm3`` (voxels of
    ``voxel_mm3``) or, given ``probs``, with a mean probability below ``min_probability``."""
    if min_volume_mm3 <= 0 and (probs is None or min_probability <= 0):
        return masks
    labels, n = ndimage.label(masks > 0, structure=CONNECTIVITY_3D)
    return _drop_components(masks, labels, n, min_volume_mm3, voxel_mm3, probs, min_probability)


def keep_largest_component(masks: np.ndarray) -> np.ndarray:
    """Keep the largest 3D connected component of the foreground of one patient's (N,H,W) stack."""
    labels, n = ndimage.label(masks > 0, structure=CONNECTIVITY_3D)
    if n <= 1:
        return masks
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.where(labels == int(sizes.argmax()), masks, 0).astype(masks.dtype)


def apply_postprocess(masks: np.ndarray, settings: dict[str, Any], volume: bool,
                      probs: np.ndarray | None = None, spacing: Sequence[float] | None = None) -> np.ndarray:
    """A bundle's post-processing of (N,H,W) masks: as one volume (the area rule, then the 3D rules), or
    slice by slice (the one-slice rules). ``probs`` (N,H,W) tumour probabilities feed the probability
    rules (skipped without them); ``spacing`` (slice, row, column) mm, default the Kaggle grid's."""
    rules = physical(settings)
    sz, sy, sx = (float(s) for s in (spacing or KAGGLE_SPACING_MM))
    if volume:
        out = remove_small_lesions(masks, rules["min_area_mm2"], sy * sx)
        out = remove_small_components(out, rules["min_volume_mm3"], sz * sy * sx, probs, rules["min_probability"])
        return keep_largest_component(out) if rules["largest_component"] else out
    return remove_small_lesions(masks, rules["min_area_slice_mm2"], sy * sx, probs, rules["min_probability_slice"])


def postprocess_volume(masks: np.ndarray, settings: dict[str, Any], probs: np.ndarray | None = None,
                       spacing: Sequence[float] | None = None) -> tuple[np.ndarray, bool]:
    """``apply_postprocess`` of one patient's volume that never empties a volume the network found tumour
    in. Returns (masks, kept): ``kept`` is True where the rules would have removed every component, so the
    network's mask is returned instead (the answer must then say "review")."""
    out = apply_postprocess(masks, settings, volume=True, probs=probs, spacing=spacing)
    if out.any() or not np.asarray(masks).any():
        return out, False
    return masks, True
