"""Predictor: bundle -> probabilities and masks for HxWx3 uint8 slices of any size.

Slices are resized to the model's input size on the device and the probabilities resized back, so
callers (the CLI, Ray Serve, SageMaker, evaluation) all get masks at their own resolution.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.bundle import Bundle, load_bundle
from core.postprocess import apply_postprocess
from core.runtime import autocast, resolve_device

Images = np.ndarray | Sequence[np.ndarray]


class Predictor:
    """Batched inference for one bundle. Thread-compatible, not thread-safe: one per replica."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "auto", batch_size: int = 32) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = bundle.model.to(self.device).eval()
        self.config = bundle.config
        self.metrics = bundle.metrics
        self.batch_size = batch_size
        self.size = tuple(self.config["image_size"])
        self.scale = float(self.config["normalisation"]["scale"])
        self.threshold = float(self.config.get("threshold", 0.5))
        self.postprocess = self.config.get("postprocess", {})
        self.multiclass = self.config["model_args"]["out_channels"] > 1

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, device: str = "auto", batch_size: int = 32) -> Predictor:
        dev = resolve_device(device)
        return cls(load_bundle(path, dev), dev, batch_size)

    @property
    def version(self) -> str:
        return str(self.config.get("version", "unknown"))

    def info(self) -> dict[str, Any]:
        return {"config": self.config, "metrics": self.metrics, "device": str(self.device)}

    @torch.inference_mode()
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
        """Masks (uint8; 0/1 binary or 0..K labels). ``volume=True``: the slices are one patient in order,
        so 3D post-processing (largest connected component) applies. Same-size input gives an array."""
        probs = self.predict_proba(images)
        masks = [self.masks_from_proba(p) for p in probs]
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
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().mul_(self.scale)
        if shape != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        with autocast(self.device):
            logits = self.model(x)
        logits = logits.float()
        probs = logits.softmax(1) if self.multiclass else logits.sigmoid()
        if shape != self.size:
            probs = F.interpolate(probs, size=shape, mode="bilinear", align_corners=False)
        probs = probs.cpu().numpy()
        return probs if self.multiclass else probs[:, 0]


def _as_slices(images: Images) -> list[np.ndarray]:
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
