"""ONNX export and the torch-free edge predictor: same probabilities and masks as core's Predictor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from bundle_factory import make_random_bundle, sample_images

from core.cli import dispatch
from core.inference.predictor import Predictor
from serve.edge import META_CONFIG, OnnxPredictor
from serve.onnx_export import export_onnx

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    bundle = make_random_bundle(d / "bundle")
    info = export_onnx(bundle, d / "model.onnx")
    return bundle, d / "model.onnx", info


@pytest.fixture(scope="module")
def torch_pred(binary) -> Predictor:
    """core's PyTorch predictor on the exported bundle: the reference, loaded once."""
    return Predictor.from_bundle(binary[0], "cpu")


def _images() -> list[np.ndarray]:
    """Model-size slices plus other sizes, so both resize directions are exercised."""
    return [*sample_images(5, seed=7), *sample_images(2, 80, 96, seed=8), *sample_images(2, 48, 40, seed=9)]


def test_export_is_checked_self_describing_and_batch_dynamic(binary):
    bundle, path, info = binary
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[META_CONFIG]) == json.loads((bundle / "config.json").read_text())
    assert info["opset"] == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert info["opset"] >= 17 and info["max_abs_diff"] < 1e-4
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch size
    assert not list(path.parent.glob("*.data"))  # weights inside the one file


def test_edge_matches_pytorch_probabilities_and_masks(binary, torch_pred):
    edge = OnnxPredictor(binary[1], batch_size=4)
    images = _images()
    ref, got = torch_pred.predict_proba(images), edge.predict_proba(images)
    assert max(float(np.abs(r - g).max()) for r, g in zip(ref, got, strict=True)) < 1e-4
    for volume in (False, True):
        same = sample_images(6, seed=11)
        a, b = torch_pred.predict(same, volume=volume), edge.predict(same, volume=volume)
        assert a.shape == b.shape and (a == b).mean() >= 0.999 and a.any()
    mixed_ref, mixed = torch_pred.predict(images), edge.predict(images)
    agree = sum(int((r == g).sum()) for r, g in zip(mixed_ref, mixed, strict=True))
    assert agree / sum(r.size for r in mixed_ref) >= 0.999
    assert [m.shape for m in mixed] == [i.shape[:2] for i in images]


def test_multiclass_export_uses_softmax_labels(tmp_path):
    bundle = make_random_bundle(tmp_path / "mc", class_names=("background", "core", "oedema", "csf"),
                                postprocess={"min_area": 0, "largest_component": False})
    info = export_onnx(bundle, tmp_path / "mc.onnx")
    torch_pred, edge = Predictor.from_bundle(bundle, "cpu"), OnnxPredictor(tmp_path / "mc.onnx")
    images = sample_images(3, seed=2)
    ref, got = torch_pred.predict_proba(images), edge.predict_proba(images)
    assert got[0].shape == (4, 64, 64) and info["max_abs_diff"] < 1e-4
    assert max(float(np.abs(r - g).max()) for r, g in zip(ref, got, strict=True)) < 1e-4
    assert (torch_pred.predict(images) == edge.predict(images)).mean() >= 0.999


def test_export_cli_and_rejects_foreign_onnx(binary, tmp_path, capsys):
    bundle, path, _ = binary
    out = tmp_path / "cli.onnx"
    assert dispatch("python -m serve", "", ["serve.onnx_export"], ["export-onnx", "--bundle", str(bundle),
                                                                     "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["onnx"] == str(out) and info["max_abs_diff"] < 1e-4 and out.is_file()
    plain = onnx.load(str(path))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ValueError, match="export-onnx"):
        OnnxPredictor(tmp_path / "plain.onnx")


EDGE_DRIVER = r'''
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "monai", "safetensors"):
            raise ImportError(f"{name} is not installed on this device")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from serve.edge import OnnxPredictor
pred = OnnxPredictor(sys.argv[1])
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.stack([pred.predict(images, volume=True), pred.predict(images)]))
assert not any(m.split(".")[0] in ("torch", "monai") for m in sys.modules), "torch got imported"
print("EDGE_OK")
'''


def test_edge_runs_where_torch_cannot_be_imported(binary, torch_pred, tmp_path):
    path = binary[1]
    images = sample_images(6, seed=13)
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "edge.py").write_text(EDGE_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(tmp_path / "edge.py"), str(path), str(tmp_path / "images.npy"),
                           str(tmp_path / "masks.npy")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "EDGE_OK" in proc.stdout, proc.stderr[-3000:]
    vol, slices = np.load(tmp_path / "masks.npy")
    assert (vol == torch_pred.predict(images, volume=True)).mean() >= 0.999
    assert (slices == torch_pred.predict(images)).mean() >= 0.999
