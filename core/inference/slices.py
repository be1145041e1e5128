"""What every predictor shares, whatever runs the network (PyTorch in core, ONNX Runtime on the edge).

Input rules (HxWx3 or HxW uint8 slices of any size), grouping same-size slices into batches,
thresholding or arg-max, and post-processing live here once; a subclass supplies ``_forward``.
Imports numpy and core.inference.postprocess only, so torch-free runtimes can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from core.inference.postprocess import apply_postprocess

Images = np.ndarray | Sequence[np.ndarray]
TTA_MODES = ("none", "flip")  # test-time augmentation: none, or left-right flip with probabilities averaged


@lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float32 resampling matrix for one axis: area-averaging when shrinking (what the network
    saw in training), bilinear with half-pixel centres when enlarging (probabilities back to a slice).

    Every inference path (PyTorch, ONNX Runtime) and the trainer apply these same matrices, so a slice
    is resized identically wherever it is segmented.
    """
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


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N,C,H,W) float32 -> (N,C,*size) with ``resize_matrix`` on each axis (numpy twin of core.inference.resize)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    wh, ww = resize_matrix(x.shape[2], size[0]), resize_matrix(x.shape[3], size[1])
    return np.einsum("oh,nchw,pw->ncop", wh, x, ww, optimize=True).astype(np.float32)


def as_slices(images: Images) -> list[np.ndarray]:
    """Validate and unify inputs to a list of HxWx3 uint8 arrays; ValueError names the problem."""
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


class SlicePredictor:
    """Bundle config -> masks at each input's own resolution; subclasses implement ``_forward``."""

    config: dict[str, Any]
    metrics: dict[str, Any]
    batch_size: int

    def _configure(self, config: dict[str, Any], metrics: dict[str, Any], batch_size: int) -> None:
        self.config, self.metrics, self.batch_size = config, metrics, batch_size
        self.size = (int(config["image_size"][0]), int(config["image_size"][1]))
        self.threshold = float(config.get("threshold", 0.5))
        self.postprocess = config.get("postprocess", {})
        self.multiclass = int(config["model_args"]["out_channels"]) > 1
        self.tta = str(config.get("tta", "none"))
        if self.tta not in TTA_MODES:
            raise ValueError(f"bundle config: tta {self.tta!r} is not one of {', '.join(TTA_MODES)}")

    @property
    def version(self) -> str:
        return str(self.config.get("version", "unknown"))

    def _forward(self, batch: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(n,H,W,3) uint8 of one size -> (n,H,W) probabilities, or (n,C,H,W) for multi-class."""
        raise NotImplementedError

    def _forward_tta(self, batch: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """``_forward``, averaged with the left-right mirrored pass where the bundle chose flip TTA."""
        probs = self._forward(batch, shape)
        if self.tta == "flip":
            mirrored = self._forward(np.ascontiguousarray(batch[:, :, ::-1]), shape)
            probs = 0.5 * (probs + mirrored[..., ::-1])
        return probs

    def predict_proba(self, images: Images) -> list[np.ndarray]:
        """Per slice: (H,W) tumour probability (binary) or (C,H,W) class probabilities (multi-class)."""
        slices = as_slices(images)
        out: list[np.ndarray | None] = [None] * len(slices)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(slices):
            by_shape.setdefault(s.shape[:2], []).append(i)
        for shape, idx in by_shape.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                probs = self._forward_tta(np.stack([slices[i] for i in chunk]), shape)
                for i, p in zip(chunk, probs, strict=True):
                    out[i] = p
        return out  # type: ignore[return-value]

    def predict(self, images: Images, volume: bool = False) -> np.ndarray | list[np.ndarray]:
        """Masks (uint8; 0/1 binary or 0..K labels). ``volume=True``: the slices are one patient in order,
        so 3D post-processing (largest connected component) applies. Same-size input gives an array."""
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
