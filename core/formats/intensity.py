"""Scanner intensities -> the model's uint8 levels: one rule for every input that is not 8-bit already.

A channel of one volume maps its nonzero voxels' 0.5..99.5 percentiles to 0..255, zero kept zero. NIfTI and
DICOM scans (core.formats.volume) and 16-bit TIFF/PNG/NPY slices (core.formats.decoders) use it alike, with
a whole volume as its scope wherever one is read, so a slice is never scaled apart from its neighbours and a
single hot pixel cannot darken a slice. numpy only: the decoders import it without nibabel.
"""

from __future__ import annotations

import numpy as np

PERCENTILES = (0.5, 99.5)  # of the nonzero voxels, to 0..255: how uint8 slices are made from a scan
CHUNK_VOXELS = 1 << 22  # voxels converted to float32 at a time: a float copy of a volume is 4x its uint8 size


def to_uint8(x: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """One channel of one volume -> uint8: the percentiles of its nonzero voxels to 0..255, zero kept
    zero (the background of a skull-stripped scan), as the Kaggle slices were made from the scans.

    Computed a block of the first axis at a time, so the float32 copies stay small whatever the volume.
    """
    x = np.asarray(x)
    shape = x.shape
    if not x.size:
        return np.zeros(shape, np.uint8)
    if x.ndim == 0:
        x = x.reshape(1)
    step = max(1, CHUNK_VOXELS // max(1, int(np.prod(x.shape[1:], dtype=np.int64))))
    blocks = range(0, len(x), step)
    values = np.concatenate([b[b != 0] for b in (np.asarray(x[i:i + step], np.float32) for i in blocks)])
    out = np.zeros(x.shape, np.uint8)
    if not values.size:
        return out.reshape(shape)
    lo, hi = np.percentile(values, percentiles, overwrite_input=True)  # ``values`` is this function's own copy
    del values
    width = max(float(hi - lo), 1e-6)
    for i in blocks:
        block = np.asarray(x[i:i + step], np.float32)
        nonzero = block != 0
        scaled = np.clip((block - lo) / width, 0.0, 1.0) * 255.0
        out[i:i + step][nonzero] = np.round(scaled[nonzero]).astype(np.uint8)
    return out.reshape(shape)
