"""Resampling matrices for one image axis (numpy only): what every path that resizes a slice applies.

Area-averaging when shrinking (what the network saw in training), bilinear with half-pixel centres when
enlarging (probabilities back to a slice). The ensemble network, the predictors (PyTorch and ONNX
Runtime) and the trainer all use these, so a slice is resized identically wherever it is segmented.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float32 resampling matrix for one axis: area down, bilinear (half-pixel centres) up."""
    w = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    if out_size <= in_size:  # area: output i averages the input span [i*scale, (i+1)*scale)
        for i in range(out_size):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), in_size)):
                w[i, j] = min(hi, j + 1) - max(lo, j)
        return (w / w.sum(1, keepdims=True)).astype(np.float32)
    for i in range(out_size):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = min(int(np.floor(src)), in_size - 1)
        lam = min(max(src - i0, 0.0), 1.0)
        w[i, i0] += 1.0 - lam
        w[i, min(i0 + 1, in_size - 1)] += lam
    return w.astype(np.float32)
