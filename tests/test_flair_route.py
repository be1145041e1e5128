"""Routed ensembles: slices whose pre- and post-contrast are copies of FLAIR go to the
FLAIR-only members, every other slice to the full ones, in PyTorch and in the exported ONNX graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_random_bundle, sample_images

from core.bundle import load_bundle
from core.evaluation.choices import with_flair
from core.inference.postprocess import NO_POSTPROCESS
from core.inference.predictor import Predictor

PLAIN = {"tta": "none", "postprocess": dict(NO_POSTPROCESS), "threshold": 0.5}


def flair_member(path: Path, seed: int) -> Path:
    """A random bundle that says it was trained with FLAIR in every channel (``sequences: flair``)."""
    bundle = make_random_bundle(path, size=(64, 64), postprocess={}, seed=seed, foreground=0.4)
    config = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**config, "sequences": "flair"}))
    return bundle


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("route")
    return {"full": make_random_bundle(root / "full", size=(64, 64), postprocess={}, seed=1),
            "flair": flair_member(root / "flair", seed=2)}


@pytest.fixture(scope="module")
def routed(members, tmp_path_factory) -> Path:
    from core.training.ensemble import build_ensemble_bundle

    out = tmp_path_factory.mktemp("routed") / "bundle"
    return build_ensemble_bundle([members["full"], members["flair"]], None, ["background", "tumour"], out, fixed=PLAIN)


def mixed_volume() -> tuple[np.ndarray, np.ndarray]:
    """Eight slices, rows 1, 4 and 5 with pre/post replaced by FLAIR; and which rows those are."""
    images = sample_images(8, 64, 64, seed=7)
    copies = np.zeros(8, bool)
    copies[[1, 4, 5]] = True
    images[copies] = with_flair(images[copies])
    return images, copies


def test_config_records_which_members_are_flair_only(members, routed, tmp_path):
    from core.training.ensemble import build_ensemble_bundle

    config = json.loads((routed / "config.json").read_text())
    assert [m.get("sequences") for m in config["members"]] == [None, "flair"]
    assert "sequences" not in config  # mixed: routed inside the network, the input stays as sent
    assert load_bundle(routed).model.routed
    only = build_ensemble_bundle([members["flair"]], None, ["background", "tumour"], tmp_path / "f", fixed=PLAIN)
    assert json.loads((only / "config.json").read_text())["sequences"] == "flair"  # all FLAIR-only: the input is
    assert not load_bundle(only).model.routed


def test_copies_go_to_the_flair_member_and_the_rest_to_the_full_one(members, routed):
    images, copies = mixed_volume()
    full = np.stack(Predictor.from_bundle(members["full"], "cpu").predict_proba(images))
    flair = np.stack(Predictor.from_bundle(members["flair"], "cpu").predict_proba(images))
    got = np.stack(Predictor.from_bundle(routed, "cpu").predict_proba(images))
    assert np.abs(got[copies] - flair[copies]).max() < 1e-5
    assert np.abs(got[~copies] - full[~copies]).max() < 1e-5
    assert np.abs(full - flair).max() > 0.1  # the two members differ, so the test tells them apart
    # One channel replaced is not a FLAIR-only scan: the full member keeps it.
    partial = images.copy()
    partial[0, ..., 0] = partial[0, ..., 1]
    assert not np.allclose(partial[0, ..., 2], partial[0, ..., 1])
    one = Predictor.from_bundle(routed, "cpu").predict_proba(partial[:1])[0]
    assert np.abs(one - Predictor.from_bundle(members["full"], "cpu").predict_proba(partial[:1])[0]).max() < 1e-5


def test_onnx_graph_routes_the_same_rows(routed, tmp_path):
    from serve.edge import OnnxPredictor
    from serve.onnx_export import export_onnx

    images, _ = mixed_volume()
    export_onnx(routed, tmp_path / "routed.onnx")  # traced: both groups run, each row keeps its own
    reference = np.stack(Predictor.from_bundle(routed, "cpu").predict_proba(images))
    got = np.stack(OnnxPredictor(tmp_path / "routed.onnx").predict_proba(images))
    assert np.abs(reference - got).max() < 1e-4


def test_a_routed_bundle_post_processes_flair_copies_with_the_flair_only_rules(tmp_path):
    """The Predictor applies ``postprocess_flair_only`` to a volume whose slices are all FLAIR copies and the
    bundle's own rules to any other."""
    bundle = make_random_bundle(tmp_path / "b", seed=3)
    config = json.loads((bundle / "config.json").read_text())
    config["postprocess_flair_only"] = {**NO_POSTPROCESS, "min_probability": 1.01, "min_probability_slice": 1.01}
    (bundle / "config.json").write_text(json.dumps(config))
    predictor = Predictor.from_bundle(bundle, "cpu")
    predictor.threshold = 0.0  # random weights: every pixel is tumour, so only post-processing can clear it
    images = sample_images(4, seed=2)
    assert predictor.segment(images).masks.any() and not predictor.segment(images).network_mask_kept
    # the FLAIR-only rules would empty the volume: the network's mask comes back instead, for review
    copies = predictor.segment(with_flair(images))
    assert copies.network_mask_kept and copies.review is True and copies.masks.any()
    assert not predictor.predict(with_flair(images)).any() and predictor.predict(images).any()
