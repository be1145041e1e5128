"""INT8 ONNX export (issue 14): static with calibration slices, dynamic without; the edge predictor runs it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from bundle_factory import make_random_bundle, sample_images

from core.cli import dispatch
from core.data.arrays import load_split
from serve.edge import META_CONFIG, META_METRICS, OnnxPredictor
from serve.onnx_export import export_onnx
from serve.quantize import META_CALIBRATION, META_QUANT, calibration_images

COMMANDS = ["serve.onnx_export", "serve.client"]


@pytest.fixture(scope="module")
def exported(prepared_dir, tmp_path_factory):
    """A random lite bundle, its fp32 export and its static INT8 export calibrated on the synthetic val split."""
    d = tmp_path_factory.mktemp("int8")
    bundle = make_random_bundle(d / "bundle")
    fp32 = export_onnx(bundle, d / "model.onnx", verify=False)
    int8 = export_onnx(bundle, d / "model-int8.onnx", quantize="int8", calibration=prepared_dir,
                       calibration_slices=16)
    return bundle, fp32, int8


def _meta(path: str | Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _ops(path: str | Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _agreement(a: np.ndarray | list[np.ndarray], b: np.ndarray | list[np.ndarray]) -> float:
    same = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    return same / sum(x.size for x in a)


def _dice(a: np.ndarray | list[np.ndarray], b: np.ndarray | list[np.ndarray]) -> float:
    """Overlap of the two tumour masks (pixel agreement alone is dominated by background)."""
    x, y = (np.concatenate([m.ravel() > 0 for m in masks]) for masks in (a, b))
    return float(2 * (x & y).sum() / max(int(x.sum() + y.sum()), 1))


def test_static_int8_keeps_metadata_and_says_how_it_was_quantized(exported):
    bundle, fp32, int8 = exported
    meta = _meta(int8["onnx"])
    assert json.loads(meta[META_CONFIG]) == json.loads((bundle / "config.json").read_text())
    assert json.loads(meta[META_METRICS])["note"] == "random weights for tests"
    assert meta[META_QUANT] == "int8-static" and _meta(fp32["onnx"])[META_QUANT] == "none"
    assert json.loads(meta[META_CALIBRATION])["slices"] == int8["calibration_slices"] == 16
    assert int8["quantization"] == "int8-static"
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(int8["onnx"])
    assert "PRelu" not in _ops(fp32["onnx"]) and fp32["prelu_to_leaky_relu"] > 0  # one-slope PReLU: LeakyRelu
    assert int8["bytes"] < fp32["bytes"]
    model = onnx.load(int8["onnx"])
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch still dynamic
    assert int8["max_abs_diff"] < 1e-4  # the fp32 graph it came from matched PyTorch
    assert int8["int8_vs_fp32"]["mask_agreement"] >= 0.95


def test_edge_predictor_runs_int8_close_to_fp32(exported, prepared_dir):
    _, fp32, int8 = exported
    ref, edge = OnnxPredictor(fp32["onnx"], batch_size=8), OnnxPredictor(int8["onnx"], batch_size=8)
    assert edge.size == ref.size and edge.threshold == ref.threshold
    val = load_split(prepared_dir, "val")
    images = np.asarray(val.images[:32]).transpose(0, 2, 3, 1)
    a, b = ref.predict(images), edge.predict(images)
    assert a.shape == b.shape and _agreement(a, b) >= 0.95 and _dice(a, b) >= 0.8  # close to fp32, not identical
    # 3D post-processing keeps each volume's largest component; a random network's components are alike in
    # size, so which one wins may differ: compare pixels only.
    a, b = ref.predict(images, volume=True), edge.predict(images, volume=True)
    assert a.shape == b.shape and b.any() and _agreement(a, b) >= 0.95
    mixed = [*sample_images(3, 80, 96, seed=21), *sample_images(2, 48, 40, seed=22)]  # both resize directions
    a, b = ref.predict(mixed), edge.predict(mixed)
    assert [m.shape for m in b] == [i.shape[:2] for i in mixed]
    assert _agreement(a, b) >= 0.95 and _dice(a, b) >= 0.8
    pa, pb = ref.predict_proba(images[:4]), edge.predict_proba(images[:4])
    assert max(float(np.abs(x - y).max()) for x, y in zip(pa, pb, strict=True)) > 0  # really quantized


def test_serve_predict_onnx_runs_the_int8_model(exported, synth_src, tmp_path, capsys):
    _, _, int8 = exported
    patient = sorted(p for p in synth_src.iterdir() if p.is_dir())[0]
    out = tmp_path / "masks"
    assert dispatch("python -m serve", "", COMMANDS, ["predict", "--onnx", int8["onnx"], str(patient),
                                                      "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 1 and "error" not in summary[0] and summary[0]["slices"] == 16
    assert "1/1 ok" in capsys.readouterr().out


def test_dynamic_int8_without_calibration_through_the_cli(exported, tmp_path, capsys, caplog):
    bundle, fp32, _ = exported
    out = tmp_path / "dyn.onnx"
    with caplog.at_level(logging.WARNING, logger="serve.quantize"):
        assert dispatch("python -m serve", "", COMMANDS, ["export-onnx", "--bundle", str(bundle), "--out", str(out),
                                                          "--quantize", "int8"]) == 0
    info = json.loads(capsys.readouterr().out)  # stdout is the JSON alone: no quantizer chatter
    assert info["quantization"] == "int8-dynamic" and info["calibration_slices"] == 0 and info["onnx"] == str(out)
    assert any("dynamic" in r.getMessage() and "--calibration" in r.getMessage() for r in caplog.records)
    assert _meta(out)[META_QUANT] == "int8-dynamic" and META_CALIBRATION not in _meta(out)
    assert "ConvInteger" in _ops(out)
    images = sample_images(6, seed=5)
    a, b = OnnxPredictor(fp32["onnx"]).predict(images), OnnxPredictor(out).predict(images)
    assert b.any() and _agreement(a, b) >= 0.95 and _dice(a, b) >= 0.85


def test_calibration_errors_name_the_problem(exported, tmp_path, capsys):
    bundle = str(exported[0])
    missing = tmp_path / "no-such-prepared"
    argv = ["export-onnx", "--bundle", bundle, "--out", str(tmp_path / "x.onnx"), "--quantize", "int8"]
    assert dispatch("python -m serve", "", COMMANDS, [*argv, "--calibration", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing / "val" / "images.npy") in err and "prepared" in err
    assert dispatch("python -m serve", "", COMMANDS, ["export-onnx", "--bundle", bundle, "--out",
                                                      str(tmp_path / "y.onnx"), "--calibration", str(missing)]) == 2
    assert "--quantize int8" in capsys.readouterr().err
    assert dispatch("python -m serve", "", COMMANDS, [*argv, "--calibration", str(tmp_path),
                                                      "--calibration-slices", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx"))  # nothing written on a bad request


def test_calibration_slices_cover_tumour_and_tumour_free_slices(tmp_path):
    n = 40
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 3, 8, 8)).copy()
    masks = np.zeros((n, 8, 8), np.uint8)
    masks[30:, 2:4, 2:4] = 1  # 10 tumour slices out of 40, all at the end
    (tmp_path / "val").mkdir()
    np.save(tmp_path / "val" / "images.npy", images)
    np.save(tmp_path / "val" / "masks.npy", masks)
    rows = calibration_images(tmp_path, 8)[:, 0, 0, 0]
    assert len(rows) == 8 and len(set(rows)) == 8 and (rows >= 30).sum() == 4
    rows = calibration_images(tmp_path, 30)[:, 0, 0, 0]  # more than the tumour slices: the rest tumour-free
    assert len(set(rows)) == 30 and (rows >= 30).sum() == 10
    assert len(calibration_images(tmp_path, 100)) == n
    assert list(calibration_images(images, 4)[:, 0, 0, 0]) == [0, 13, 26, 39]  # an array: evenly spread
    with pytest.raises(ValueError, match="uint8"):
        calibration_images(images.astype(np.float32), 4)
