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

from core.postprocess import apply_postprocess

FORMAT = "gliomaseg-onnx/1"
META_FORMAT, META_CONFIG, META_METRICS = "gliomaseg.format", "gliomaseg.config", "gliomaseg.metrics"

Images = np.ndarray | Sequence[np.ndarray]


class OnnxPredictor:
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
        self.config: dict[str, Any] = json.loads(meta[META_CONFIG])
        self.metrics: dict[str, Any] = json.loads(meta.get(META_METRICS, "{}"))
        self.input_name = self.session.get_inputs()[0].name
        self.batch_size = batch_size
        self.size = (int(self.config["image_size"][0]), int(self.config["image_size"][1]))
        self.threshold = float(self.config.get("threshold", 0.5))
        self.postprocess = self.config.get("postprocess", {})
        self.multiclass = int(self.config["model_args"]["out_channels"]) > 1

    @property
    def version(self) -> str:
        return str(self.config.get("version", "unknown"))

    def info(self) -> dict[str, Any]:
        return {"config": self.config, "metrics": self.metrics, "providers": self.session.get_providers()}

    def predict_proba(self, images: Images) -> list[np.ndarray]:
        """Per slice: (H,W) tumour probability (binary) or (C,H,W) class probabilities (multi-class)."""
        slices = _as_slices(images)
        out: list[np.ndarray | None] = [None] * len(slices)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(slices):
            by_shape.setdefault(s.shape[:2], []).append(i)
        for shape, idx in by_shape.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                probs = self._forward(np.stack([slices[i] for i in chunk]), shape)
                for i, p in zip(chunk, probs, strict=True):
                    out[i] = p
        return out  # type: ignore[return-value]

    def predict(self, images: Images, volume: bool = False) -> np.ndarray | list[np.ndarray]:
        """Masks (uint8 0/1 or 0..K). ``volume=True``: one patient's slices in order (3D post-processing)."""
        masks = [self.masks_from_proba(p) for p in self.predict_proba(images)]
        if volume:
            masks = list(apply_postprocess(np.stack(masks), self.postprocess, volume=True))
        else:
            masks = [apply_postprocess(m[None], self.postprocess, volume=False)[0] for m in masks]
        if len({m.shape for m in masks}) == 1:
            return np.stack(masks) if masks else np.zeros((0, *self.size), np.uint8)
        return masks

    def masks_from_proba(self, proba: np.ndarray) -> np.ndarray:
        if self.multiclass:
            return proba.argmax(axis=0).astype(np.uint8)
        return (proba > self.threshold).astype(np.uint8)

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


def _as_slices(images: Images) -> list[np.ndarray]:
    """Validate and unify inputs to HxWx3 uint8 arrays (the rules of core.predictor, without torch)."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3 and images.shape[-1] == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"expected (N,H,W,3) or (H,W,3) images, got shape {images.shape}")
        images = list(images)
    slices = []
    for i, s in enumerate(images):
        s = np.asarray(s)
        if s.ndim == 2:
            s = np.repeat(s[..., None], 3, axis=-1)
        if s.ndim != 3 or s.shape[-1] != 3:
            raise ValueError(f"slice {i}: expected HxWx3 or HxW, got shape {s.shape}")
        if s.dtype != np.uint8:
            raise ValueError(f"slice {i}: expected uint8, got {s.dtype}")
        slices.append(s)
    return slices
