"""ONNX Runtime inference for CPUs and edge devices without PyTorch: ``OnnxPredictor(path)``.

Same semantics as core's Predictor: HxWx3 uint8 slices of any size are resized to the model's input
size (bilinear with antialiasing, as torch does), the probabilities resized back, thresholded (or
arg-maxed for multi-class) and post-processed. The model file carries its bundle config as ONNX
metadata (see serve/onnx_export.py), so nothing else is needed. Imports numpy, scipy (through
core.postprocess, which is numpy + scipy only) and onnxruntime; never torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from core.slices import SlicePredictor

FORMAT = "gliomaseg-onnx/1"
META_FORMAT, META_CONFIG, META_METRICS = "gliomaseg.format", "gliomaseg.config", "gliomaseg.metrics"


class OnnxPredictor(SlicePredictor):
    """Batched ONNX Runtime inference for one exported bundle. One per thread or replica."""

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        batch_size: int = 32,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=list(providers or ort.get_available_providers())
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get(META_FORMAT) != FORMAT or META_CONFIG not in meta:
            raise ValueError(f"{path}: not a gliomaseg ONNX export (metadata {META_FORMAT!r} missing); "
                             "make it with `python -m serve export-onnx`")
        self._configure(json.loads(meta[META_CONFIG]), json.loads(meta.get(META_METRICS, "{}")), batch_size)
        self.input_name = self.session.get_inputs()[0].name

    def info(self) -> dict[str, Any]:
        return {"config": self.config, "metrics": self.metrics, "providers": self.session.get_providers()}

    def _forward(self, batch: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        # The graph applies the normalisation itself; it takes pixel values at the model's size.
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
        if shape != self.size:
            x = resize(x, self.size, antialias=True)
        probs = self.session.run(None, {self.input_name: x})[0].astype(np.float32)
        if shape != self.size:
            probs = resize(probs, shape, antialias=False)
        return probs if self.multiclass else probs[:, 0]


def resize(x: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """(N,C,H,W) float32 -> (N,C,*size), matching torch's bilinear interpolate (align_corners=False)."""
    wh = _weights(x.shape[2], size[0], antialias)
    ww = _weights(x.shape[3], size[1], antialias)
    return np.einsum("oh,nchw,pw->ncop", wh, x, ww, optimize=True).astype(np.float32)


@lru_cache(maxsize=64)
def _weights(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    """(out, in) interpolation matrix. Antialiased: torch's separable triangle filter widened by the
    downscale factor (as PIL does); otherwise plain bilinear with half-pixel centres, clamped at 0."""
    scale = in_size / out_size
    w = np.zeros((out_size, in_size), np.float64)
    if antialias:
        support = scale if scale >= 1.0 else 1.0
        invscale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            wt = np.clip(1.0 - np.abs((taps - center + 0.5) * invscale), 0.0, None)
            if wt.sum() > 0:
                w[i, lo:hi] = wt / wt.sum()
        return w.astype(np.float32)
    for i in range(out_size):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = min(int(np.floor(src)), in_size - 1)
        lam = min(max(src - i0, 0.0), 1.0)
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        w[i, i0] += 1.0 - lam
        w[i, i1] += lam
    return w.astype(np.float32)
