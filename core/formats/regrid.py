"""Resampling a canonical (slice, row, column) array along its voxel axes, and a label map back.

A sagittal or coronal scan reordered to axial has in-plane pixels as long as its slice spacing; the
volume's images are resampled here to square pixels (``zoom_images``), and the masks the model draws
on that grid go back to the reordered source grid (``labels_to``). Both keep the field of view: the
grids share their outer voxel edges (scipy's ``grid_mode``), as resizing an image does.

Going back, a source voxel takes the label covering most of it: each label's indicator is averaged
over the fine voxels one source voxel spans (a box filter), sampled at the source voxel's centre
(linear), and the label with the largest share wins (ties to the lower label, background first).
That is the mask's partial volume, thresholded at one half: closer to what the model drew than the
nearest fine voxel, which sees only the source voxel's centre line.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import uniform_filter1d, zoom


def _factors(shape: Sequence[int], target: Sequence[int]) -> tuple[float, ...]:
    return tuple(int(t) / int(s) for s, t in zip(shape, target, strict=True))


def zoom_images(images: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(N,H,W,C) uint8 -> (*shape, C) uint8, linear along each axis whose size changes (edges repeated)."""
    if tuple(images.shape[:3]) == tuple(shape):
        return images
    factors = _factors(images.shape[:3], shape)
    out = np.empty((*shape, images.shape[3]), np.uint8)
    for c in range(images.shape[3]):
        channel = zoom(images[..., c].astype(np.float32), factors, order=1, mode="nearest", grid_mode=True)
        out[..., c] = np.clip(np.rint(channel), 0, 255).astype(np.uint8)
    return out


def zoom_labels(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(N,H,W[,...]) labels -> (*shape[,...]) by the nearest voxel, so they stay labels."""
    if tuple(labels.shape[:3]) == tuple(shape):
        return labels
    factors = (*_factors(labels.shape[:3], shape), *([1.0] * (labels.ndim - 3)))
    return zoom(labels, factors, order=0, mode="nearest", grid_mode=True)


def labels_to(masks: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(N,H,W) labels -> (*shape) labels: the label covering most of each target voxel (see the module)."""
    masks = np.asarray(masks)
    if tuple(masks.shape) == tuple(shape):
        return masks
    factors = _factors(masks.shape, shape)
    best = np.zeros(tuple(int(s) for s in shape), np.float32)
    out = np.zeros(best.shape, masks.dtype)
    for label in range(int(masks.max(initial=0)) + 1):
        share = (masks == label).astype(np.float32)
        for axis, f in enumerate(factors):
            if f < 1:  # a target voxel spans about 1/f source voxels: their mean (an odd, centred window)
                size = 2 * round((1 / f - 1) / 2) + 1
                share = uniform_filter1d(share, size=size, axis=axis, mode="nearest")
        share = zoom(share, factors, order=1, mode="nearest", grid_mode=True)
        wins = share > best
        out[wins], best[wins] = label, share[wins]
    return out
