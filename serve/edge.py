"""ONNX Runtime inference for CPUs and edge devices without PyTorch: ``OnnxPredictor(path)``.

Same semantics as core's Predictor: HxWx3 uint8 slices of any size are cropped and resized to the
model's input size and standardised (core.data.preprocessing: the same matrices and numbers as torch
uses), the probabilities put back on each slice's grid, flip-averaged where the bundle chose TTA,
thresholded (or arg-maxed for multi-class) and post-processed. The model file carries its bundle config
as ONNX metadata (see serve/onnx_export.py), so nothing else is needed. Imports numpy, scipy (through
core.inference.postprocess, which is numpy + scipy only) and onnxruntime; never torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.config import BATCH_SIZE
from core.inference.slices import SlicePredictor

FORMAT = "gliomaseg-onnx/2"  # /2: the graph takes standardised input (/1 took pixel values 0..255)
META_FORMAT, META_CONFIG, META_METRICS = "gliomaseg.format", "gliomaseg.config", "gliomaseg.metrics"


class OnnxPredictor(SlicePredictor):
    """Batched ONNX Runtime inference for one exported bundle. One per thread or replica."""

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        batch_size: int = BATCH_SIZE,
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

    def _network(self, x: np.ndarray) -> np.ndarray:
        # The graph takes standardised input at the model's size; SlicePredictor crops, resizes and
        # standardises with core's numpy rules (per slice, or per volume where the bundle says).
        return self.session.run(None, {self.input_name: x})[0].astype(np.float32)
