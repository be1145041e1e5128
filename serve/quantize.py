"""INT8 quantization of an exported gliomaseg ONNX model (``export-onnx --quantize int8``) with ONNX Runtime.

Static quantization (where calibration slices are given): activation ranges come from running the fp32
graph on validation slices resized and rounded exactly as OnnxPredictor feeds them, each range the
central 99.99% of its values (min-max ranges, stretched by rare outliers, disagreed with fp32 on nearly
twice as many tumour pixels on real LGG checkpoints); QDQ format, uint8 activations, int8 per-channel weights
with a 7-bit range (``reduce_range``: x86 CPUs without VNNI saturate 8-bit products otherwise). Without
calibration data it falls back to dynamic quantization (int8 weights, activations quantized at run
time), which needs no data but turns every Conv into ConvInteger, usually slower than fp32 on CPU.

The quantized file keeps the fp32 export's metadata (config, metrics) and adds
``gliomaseg.quantization`` ("int8-static" or "int8-dynamic"), so OnnxPredictor runs it unchanged.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from core.data.preprocessing import Preprocessing
from core.inference.slices import model_input

log = logging.getLogger(__name__)
logging.getLogger("onnxruntime.quantization.shape_inference").setLevel(logging.WARNING)
META_QUANT, META_CALIBRATION = "gliomaseg.quantization", "gliomaseg.calibration"
MODES = ("none", "int8")
DEFAULT_CALIBRATION_SLICES = 64
CALIBRATION_BATCH = 4  # slices per calibration run; histograms are merged after each run
PERCENTILE = 99.99  # activation range: the central PERCENTILE % of the calibration values


def calibration_images(source: str | os.PathLike | np.ndarray, n: int, split: str = "val") -> np.ndarray:
    """(n,3,H,W) uint8 calibration slices: a prepared directory's ``split`` (default val), or an array.

    Tumour and tumour-free slices are drawn evenly across the split in equal shares (so patients and
    lesion contrast are both covered); fewer if the split is smaller. FileNotFoundError names the path.
    """
    if n < 1:
        raise ValueError(f"--calibration-slices must be at least 1, got {n}")
    masks = None
    if isinstance(source, np.ndarray):
        images = source
    else:
        path = Path(source) / split / "images.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: calibration data not found; --calibration takes a prepared "
                                    "directory (`python -m core data prepare`) with a val split")
        images = np.load(path, mmap_mode="r", allow_pickle=False)
        if (Path(source) / split / "masks.npy").is_file():
            masks = np.load(Path(source) / split / "masks.npy", mmap_mode="r", allow_pickle=False)
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8 or not len(images):
        raise ValueError(f"calibration images must be (N,3,H,W) uint8 with N >= 1, got {images.shape} {images.dtype}")
    if masks is not None and len(masks) == len(images):
        tumour = masks.reshape(len(masks), -1).max(axis=1) > 0
        with_t, without = np.flatnonzero(tumour), np.flatnonzero(~tumour)
        k = min(len(with_t), max(n // 2, n - len(without)))  # half each, the rest from whichever has more
        rows = np.concatenate([with_t[_even(len(with_t), k)], without[_even(len(without), n - k)]])
    else:
        rows = _even(len(images), n)
    return np.asarray(images[np.sort(rows)])


def _even(total: int, n: int) -> np.ndarray:
    """Up to ``n`` distinct indices spread evenly over ``range(total)``."""
    return np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(int)) if total and n > 0 else \
        np.zeros(0, int)


def model_inputs(images: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """uint8 (N,3,H,W) -> float32 graph input as OnnxPredictor feeds it: the bundle config's channels, crop,
    resize and standardisation (over each slice alone, a 2.5D bundle's neighbours being the slice itself:
    calibration needs the inputs' range, not one patient's)."""
    preprocessing = Preprocessing.from_config(config)
    size = (int(config["image_size"][0]), int(config["image_size"][1]))
    parts = []
    for image in images:
        image = preprocessing.with_context(preprocessing.inputs(image[None]))
        stats, boxes = preprocessing.plan(image)
        parts.append(model_input(image.transpose(0, 2, 3, 1), stats, boxes, size))
    channels = len(preprocessing.channel_names)
    return np.concatenate(parts) if parts else np.zeros((0, channels, *size), np.float32)


class SliceReader:
    """onnxruntime.quantization CalibrationDataReader (duck-typed: ``get_next``) over graph inputs, in batches.

    ``len`` and ``set_range`` (in batches) let quantize_static calibrate a few batches at a time
    (``CalibStridedMinMax``), so the histograms' memory does not grow with the number of slices.
    """

    def __init__(self, name: str, x: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self.name, self.x, self.batch = name, x, batch
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.i, self.end = start_index, min(end_index, len(self))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= self.end:
            return None
        self.i += 1
        return {self.name: self.x[(self.i - 1) * self.batch : self.i * self.batch]}

    def rewind(self) -> None:
        self.set_range(0, len(self))


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration: np.ndarray | None,
                  input_name: str = "image") -> dict[str, Any]:
    """fp32 gliomaseg ONNX ``src`` -> int8 ``dst``; ``calibration`` float32 graph inputs (static) or None (dynamic).

    The metadata of ``src`` is carried over; returns facts for the export summary.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    mode = "int8-static" if calibration is not None else "int8-dynamic"
    if calibration is None:
        log.warning("no --calibration data: dynamic int8 quantization (weights only, activations at run time);"
                    " Conv becomes ConvInteger, usually slower than fp32 on CPU. Give --calibration PREPARED"
                    " for static quantization")
    else:
        log.info("static int8 quantization calibrated on %d slices", len(calibration))
    with tempfile.TemporaryDirectory(prefix=".onnx-quant-", dir=dst.parent) as tmp, _quiet():
        pre = Path(tmp) / "pre.onnx"
        try:  # shape inference + fp32 graph optimisation: more ops get quantized, fewer Q/DQ pairs
            quant_pre_process(str(src), str(pre))
        except Exception as exc:
            log.warning("quantization pre-processing failed (%s); quantizing the graph as exported", exc)
            pre = src
        staged = Path(tmp) / "int8.onnx"
        if calibration is not None:
            quantize_static(
                str(pre), str(staged), SliceReader(input_name, calibration), quant_format=QuantFormat.QDQ,
                per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Percentile,
                extra_options={"CalibPercentile": PERCENTILE, "CalibTensorRangeSymmetric": False,
                               "CalibStridedMinMax": 1},  # histograms one batch at a time (any method)
            )
        else:
            quantize_dynamic(str(pre), str(staged), per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)
        model = onnx.load(str(staged))
        meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
        meta[META_QUANT] = mode
        if calibration is not None:
            meta[META_CALIBRATION] = json.dumps({
                "slices": int(len(calibration)), "method": f"percentile {PERCENTILE}", "format": "qdq",
                "activations": "uint8", "weights": "int8 per-channel, 7-bit range",
            })
        del model.metadata_props[:]
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(model)
        onnx.save_model(model, str(staged))
        os.replace(staged, dst)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"quantization": mode, "calibration_slices": 0 if calibration is None else int(len(calibration)),
            "quantized_ops": {k: v for k, v in sorted(ops.items()) if k in _QUANT_OPS}}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization prints progress to stdout and logs per-tensor notes on the root logger;
    keep stdout for the command's JSON and the log for what a user acts on."""
    root, mine = logging.getLogger(), log.level
    level = root.level
    log.setLevel(log.getEffectiveLevel())  # this module's own warnings still come through
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
        log.setLevel(mine)


_QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")


def compare(fp32: str | os.PathLike, int8: str | os.PathLike, x: np.ndarray, threshold: float = 0.5,
            batch: int = 8) -> dict[str, float]:
    """int8 vs fp32 probabilities on graph inputs ``x``: largest and mean difference, thresholded agreement."""
    import onnxruntime as ort

    outs = []
    for path in (fp32, int8):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        outs.append(np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]))
    a, b = outs
    if a.shape[1] > 1:  # multi-class: arg-max labels
        agree = float((a.argmax(1) == b.argmax(1)).mean())
    else:
        agree = float(((a > threshold) == (b > threshold)).mean())
    diff = np.abs(a - b)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "mask_agreement": agree}
