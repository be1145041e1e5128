"""`python -m serve export-onnx --bundle B --out model.onnx`: a self-contained ONNX model for edge devices.

The graph takes ``image``: float32 (N,3,H,W) standardised input at the bundle's input size (the
bundle's crop and normalisation, which may be per volume, are applied outside it by core's numpy rules),
with a dynamic batch axis, and returns ``proba``: sigmoid (binary, (N,1,H,W)) or softmax (multi-class)
probabilities. The activation is inside the graph; the bundle's config and metrics ride along as ONNX
metadata, so serve/edge.py's OnnxPredictor needs only the file. ``--quantize int8``
writes an INT8 model instead (serve/quantize.py: static, calibrated on ``--calibration PREPARED``'s
validation slices, or dynamic without them); the metadata says which (``gliomaseg.quantization``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.bundle import load_bundle
from core.config import add_command, from_args, meta
from serve.edge import FORMAT, META_CONFIG, META_FORMAT, META_METRICS
from serve.quantize import DEFAULT_CALIBRATION_SLICES, META_QUANT, MODES, calibration_images, model_inputs

log = logging.getLogger(__name__)
# The exporter's optimisation passes log every rewrite at INFO; a user wants the summary, not those.
for _noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
INPUT, OUTPUT = "image", "proba"
DEFAULT_OPSET = 18


class ProbabilityModel(torch.nn.Module):
    """Bundle network with its output activation; it takes standardised input (the bundle's normalisation
    and crop are per slice or per volume, so OnnxPredictor applies them with core's numpy rules)."""

    def __init__(self, model: torch.nn.Module, multiclass: bool) -> None:
        super().__init__()
        self.model, self.multiclass = model, multiclass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits.softmax(1) if self.multiclass else logits.sigmoid()


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, dynamo: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; failures still raise
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                dynamic_shapes=({0: batch},), opset_version=opset, external_data=False, verbose=False,
            )
        else:
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=min(opset, 17),
            )


def prelu_to_leaky_relu(model: Any) -> int:
    """Rewrite PRelu nodes whose slope is one constant as LeakyRelu (the same function; ONNX Runtime runs
    PRelu as a broadcast op, LeakyRelu as a fast activation). MONAI's PReLU has one slope. Returns the count."""
    from onnx import helper, numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        slope = consts.get(node.input[1]) if node.op_type == "PRelu" and len(node.input) == 2 else None
        if slope is None or int(np.prod(slope.dims)) != 1:
            continue
        alpha = float(numpy_helper.to_array(slope).ravel()[0])
        node.CopyFrom(helper.make_node("LeakyRelu", [node.input[0]], list(node.output), name=node.name, alpha=alpha))
        done += 1
    used = {name for node in model.graph.node for name in node.input}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for t in unused:
        model.graph.initializer.remove(t)
    return done


def export_onnx(
    bundle: str | os.PathLike, out: str | os.PathLike, opset: int = DEFAULT_OPSET, verify: bool = True,
    quantize: str = "none", calibration: str | os.PathLike | np.ndarray | None = None,
    calibration_slices: int = DEFAULT_CALIBRATION_SLICES,
) -> dict[str, Any]:
    """Export, embed metadata, run onnx.checker, and (``verify``) compare with PyTorch on random input.

    ``quantize="int8"``: write an INT8 model to ``out``, statically quantized with ``calibration`` (a
    prepared directory, whose val split is used, or (N,3,H,W) uint8 slices), dynamically without it;
    ``verify`` then also compares it with the fp32 graph on the calibration slices.
    """
    import onnx

    if quantize not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)}, got {quantize!r}")
    if calibration is not None and quantize == "none":
        raise ValueError("--calibration applies only with --quantize int8")
    calib = None if calibration is None else calibration_images(calibration, calibration_slices)
    loaded = load_bundle(bundle, "cpu")
    config = loaded.config
    multiclass = int(config["model_args"]["out_channels"]) > 1
    module = ProbabilityModel(loaded.model, multiclass).eval()
    h, w = (int(v) for v in config["image_size"])
    channels = int(config["model_args"]["in_channels"])
    example = torch.randn(2, channels, h, w)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".onnx-export-", dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        exporter = "dynamo"
        try:
            _export(module, example, raw, opset, dynamo=True)
        except Exception as exc:  # the dynamo exporter cannot trace every network; TorchScript can
            log.warning("dynamo ONNX export failed (%s); falling back to the TorchScript exporter", exc)
            exporter = "torchscript"
            _export(module, example, raw, opset, dynamo=False)
        model = onnx.load(str(raw), load_external_data=True)
        rewritten = prelu_to_leaky_relu(model)
        meta = {
            META_FORMAT: FORMAT,
            META_CONFIG: json.dumps(config, sort_keys=True),
            META_METRICS: json.dumps(loaded.metrics, sort_keys=True, default=float),
            "gliomaseg.version": loaded.version,
            "gliomaseg.input": f"{INPUT}: float32 (N,{channels},{h},{w}) standardised "
                               "(the config's channels, normalisation, crop)",
            "gliomaseg.output": f"{OUTPUT}: {'softmax' if multiclass else 'sigmoid'} probabilities",
            META_QUANT: "none",
        }
        del model.metadata_props[:]
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        model.doc_string = f"gliomaseg {loaded.version} ({config.get('arch')})"
        onnx.checker.check_model(model, full_check=True)
        staged = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(staged))
        info: dict[str, Any] = {
            "onnx": str(out), "exporter": exporter,
            "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
            "input": [INPUT, "batch", channels, h, w], "model_version": loaded.version,
            "prelu_to_leaky_relu": rewritten,
        }
        if verify:
            info["max_abs_diff"] = verify_onnx(staged, module, (channels, h, w))
        if quantize == "int8":
            from serve.quantize import compare, quantize_int8

            x = None if calib is None else model_inputs(calib, config)
            quantized = Path(tmp) / "int8.onnx"
            info.update(quantize_int8(staged, quantized, x, input_name=INPUT))
            if verify:
                probe = x if x is not None else _random_inputs(4, (channels, h, w))
                info["int8_vs_fp32"] = compare(staged, quantized, probe, float(config.get("threshold", 0.5)))
            staged = quantized
        os.replace(staged, out)
    info["bytes"] = out.stat().st_size
    return info


def _random_inputs(batch: int, shape: tuple[int, int, int]) -> np.ndarray:
    """``batch`` random inputs of (channels, height, width) ``shape`` at uint8 levels."""
    return (torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0)) * 255).round().numpy()


def verify_onnx(path: str | os.PathLike, module: torch.nn.Module, shape: tuple[int, int, int], batch: int = 3) -> float:
    """Largest |ONNX Runtime - PyTorch| probability on a random batch (a batch size unlike the export's)."""
    import onnxruntime as ort

    x = torch.from_numpy(_random_inputs(batch, shape))
    with torch.inference_mode():
        ref = module(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT: x.numpy()})[0]
    if got.shape != ref.shape:
        raise RuntimeError(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape}")
    return float(np.abs(got - ref).max())


@dataclass
class OnnxExportOptions:
    """The `serve export-onnx` options."""

    bundle: str = field(metadata=meta("bundle directory (e.g. runs/NAME/best)"))
    out: str = field(default="model.onnx", metadata=meta("the ONNX file to write"))
    opset: int = field(default=DEFAULT_OPSET, metadata=meta("ONNX opset"))
    verify: bool = field(default=True, metadata=meta(
        "the ONNX Runtime vs PyTorch comparison (--no-verify skips it)"))
    quantize: str = field(default="none", metadata=meta(
        "int8: INT8 model for CPUs and edge devices (static with --calibration, else dynamic)", choices=MODES))
    calibration: str | None = field(default=None, metadata=meta(
        "prepared directory whose val slices calibrate static INT8 quantization", argument={"metavar": "PREPARED"}))
    calibration_slices: int = field(default=DEFAULT_CALIBRATION_SLICES, metadata=meta(
        f"calibration slices, half with tumour where masks say (default {DEFAULT_CALIBRATION_SLICES})",
        argument={"metavar": "N", "type": int}))


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "export-onnx", cmd_export_onnx, OnnxExportOptions,
                help="bundle -> self-contained ONNX model (dynamic batch) for edge devices")


def cmd_export_onnx(args: argparse.Namespace) -> int:
    opts = from_args(args, OnnxExportOptions)
    info = export_onnx(opts.bundle, opts.out, opset=opts.opset, verify=opts.verify, quantize=opts.quantize,
                       calibration=opts.calibration, calibration_slices=opts.calibration_slices)
    print(json.dumps(info, indent=2))
    if info.get("max_abs_diff", 0.0) > 1e-4:
        log.warning("ONNX probabilities differ from PyTorch by up to %.2e", info["max_abs_diff"])
    if "quantization" in info:
        log.info("%s model written to %s (%d bytes)", info["quantization"], info["onnx"], info["bytes"])
    return 0
