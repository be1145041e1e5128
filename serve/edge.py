"""ONNX Runtime inference for CPUs and edge devices without PyTorch: ``OnnxPredictor(path)``.

Same semantics as core's Predictor: HxWx3 uint8 slices of any size are resized to the model's input
size (core.inference.slices.resize_matrix: area down, bilinear up, as torch does), the probabilities
resized back, flip-averaged where the bundle chose TTA, thresholded (or arg-maxed for multi-class) and
post-processed. The model file carries its bundle config as ONNX
metadata (see serve/onnx_export.py), so nothing else is needed. Imports numpy, scipy (through
core.inference.postprocess, which is numpy + scipy only) and onnxruntime; never torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.inference.slices import SlicePredictor, resize

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
        if shape != self.size:  # rounded to uint8 values, as the trainer's resized split is stored
            x = np.clip(np.round(resize(x, self.size)), 0, 255)
        probs = self.session.run(None, {self.input_name: x})[0].astype(np.float32)
        probs = resize(probs, shape)
        return probs if self.multiclass else probs[:, 0]
