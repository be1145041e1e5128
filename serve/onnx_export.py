"""`python -m serve export-onnx --bundle B --out model.onnx`: a self-contained ONNX model for edge devices.

The graph takes ``image``: float32 (N,3,H,W) pixel values 0..255 at the bundle's input size, with a
dynamic batch axis, and returns ``proba``: sigmoid (binary, (N,1,H,W)) or softmax (multi-class)
probabilities. Normalisation and activation are inside the graph; the bundle's config and metrics
ride along as ONNX metadata, so serve/edge.py's OnnxPredictor needs only the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.bundle import load_bundle
from serve.edge import FORMAT, META_CONFIG, META_FORMAT, META_METRICS

log = logging.getLogger(__name__)
# The exporter's optimisation passes log every rewrite at INFO; a user wants the summary, not those.
for _noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
INPUT, OUTPUT = "image", "proba"
DEFAULT_OPSET = 18


class ProbabilityModel(torch.nn.Module):
    """Bundle network with its normalisation and output activation, as the Predictor applies them."""

    def __init__(self, model: torch.nn.Module, scale: float, multiclass: bool) -> None:
        super().__init__()
        self.model, self.scale, self.multiclass = model, scale, multiclass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x * self.scale)
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


def export_onnx(
    bundle: str | os.PathLike, out: str | os.PathLike, opset: int = DEFAULT_OPSET, verify: bool = True
) -> dict[str, Any]:
    """Export, embed metadata, run onnx.checker, and (``verify``) compare with PyTorch on random input."""
    import onnx

    loaded = load_bundle(bundle, "cpu")
    config = loaded.config
    multiclass = int(config["model_args"]["out_channels"]) > 1
    module = ProbabilityModel(loaded.model, float(config["normalisation"]["scale"]), multiclass).eval()
    h, w = (int(v) for v in config["image_size"])
    example = torch.rand(2, 3, h, w) * 255
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
        meta = {
            META_FORMAT: FORMAT,
            META_CONFIG: json.dumps(config, sort_keys=True),
            META_METRICS: json.dumps(loaded.metrics, sort_keys=True, default=float),
            "gliomaseg.version": loaded.version,
            "gliomaseg.input": f"{INPUT}: float32 (N,3,{h},{w}) pixel values 0..255",
            "gliomaseg.output": f"{OUTPUT}: {'softmax' if multiclass else 'sigmoid'} probabilities",
        }
        del model.metadata_props[:]
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        model.doc_string = f"gliomaseg {loaded.version} ({config.get('arch')})"
        onnx.checker.check_model(model, full_check=True)
        staged = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(staged))
        os.replace(staged, out)
    info: dict[str, Any] = {
        "onnx": str(out), "bytes": out.stat().st_size, "exporter": exporter,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "input": [INPUT, "batch", 3, h, w], "model_version": loaded.version,
    }
    if verify:
        info["max_abs_diff"] = verify_onnx(out, module, (h, w))
    return info


def verify_onnx(path: str | os.PathLike, module: torch.nn.Module, size: tuple[int, int], batch: int = 3) -> float:
    """Largest |ONNX Runtime - PyTorch| probability on a random batch (a batch size unlike the export's)."""
    import onnxruntime as ort

    x = (torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0)) * 255).float()
    with torch.inference_mode():
        ref = module(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT: x.numpy()})[0]
    if got.shape != ref.shape:
        raise RuntimeError(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape}")
    return float(np.abs(got - ref).max())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-onnx", help="bundle -> self-contained ONNX model (dynamic batch) for edge devices")
    p.add_argument("--bundle", required=True, help="bundle directory (e.g. runs/NAME/best)")
    p.add_argument("--out", default="model.onnx")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch comparison")
    p.set_defaults(func=cmd_export_onnx)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    info = export_onnx(args.bundle, args.out, opset=args.opset, verify=not args.no_verify)
    print(json.dumps(info, indent=2))
    if info.get("max_abs_diff", 0.0) > 1e-4:
        log.warning("ONNX probabilities differ from PyTorch by up to %.2e", info["max_abs_diff"])
    return 0
