"""Predictor: bundle -> probabilities and masks for HxWx3 uint8 slices of any size.

Slices are resized to the model's input size on the device and the probabilities resized back, so
callers (the CLI, Ray Serve, SageMaker, evaluation) all get masks at their own resolution.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
import torch

from core.bundle import Bundle, load_bundle
from core.config import BATCH_SIZE
from core.inference.resize import crop_resize, normalise, uncrop_resize
from core.inference.slices import Images, SlicePredictor, as_slices
from core.runtime import autocast, resolve_device

__all__ = ["Images", "Predictor", "as_slices"]


class Predictor(SlicePredictor):
    """Batched PyTorch inference for one bundle. Thread-compatible, not thread-safe: one per replica."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "auto", batch_size: int = BATCH_SIZE) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = bundle.model.to(self.device).eval()
        self._configure(bundle.config, bundle.metrics, batch_size)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, device: str = "auto", batch_size: int = BATCH_SIZE) -> Predictor:
        """From a bundle directory or ``s3://bucket/prefix`` (see core.bundle.files)."""
        dev = resolve_device(device)
        return cls(load_bundle(path, dev), dev, batch_size)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Predictor:
        """From the PredictorOptions flags on a command line (core.config; core evaluate and core predict)."""
        return cls.from_bundle(args.bundle, args.device, args.batch_size)

    def info(self) -> dict[str, Any]:
        return {"config": self.config, "metrics": self.metrics, "device": str(self.device)}

    @torch.inference_mode()
    def _forward(self, batch: np.ndarray, stats: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
        shape = batch.shape[1:3]
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2).float()
        # Resized pixels are rounded to uint8 values, as the trainer's resized split is stored.
        x = crop_resize(x, boxes, self.size).round_().clamp_(0, 255)
        x = normalise(x, torch.from_numpy(stats).to(self.device))
        with autocast(self.device):
            logits = self.model(x)
        logits = logits.float()
        probs = uncrop_resize(logits.softmax(1) if self.multiclass else logits.sigmoid(), boxes, shape)
        probs = probs.cpu().numpy()
        return probs if self.multiclass else probs[:, 0]
