"""Ensembles and cross-validation (issue 13): an ensemble bundle is the mean of its members' probabilities
in every inference path, and a K-fold CV validates every patient exactly once."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_random_bundle, sample_images
from sagemaker_sim import run_container
from tune_support import TINY_NET

from core.bundle import load_bundle
from core.formats import codecs
from core.inference.postprocess import NO_POSTPROCESS
from core.inference.predictor import Predictor

PLAIN = {"tta": "none", "postprocess": dict(NO_POSTPROCESS), "threshold": 0.5}


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """Two members at different input sizes (64 and 32 px), neither post-processing."""
    root = tmp_path_factory.mktemp("members")
    return [make_random_bundle(root / "a", size=(64, 64), postprocess={}, seed=1),
            make_random_bundle(root / "b", size=(32, 32), postprocess={}, seed=2, foreground=0.4)]


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory) -> Path:
    from core.training.ensemble import build_ensemble_bundle

    out = tmp_path_factory.mktemp("ensemble") / "bundle"
    return build_ensemble_bundle(members, None, ["background", "tumour"], out, fixed=PLAIN)


def test_bundle_lists_members_with_sizes_and_hashed_weights(ensemble):
    config = json.loads((ensemble / "config.json").read_text())
    assert config["arch"] == "ensemble" and config["image_size"] == [64, 64]
    assert [m["image_size"] for m in config["members"]] == [[64, 64], [32, 32]]
    for m in config["members"]:
        assert (ensemble / m["weights"]).is_file() and m["weights"] in config["files"]
    (ensemble / config["members"][1]["weights"]).write_bytes(b"x")  # a changed member is refused by name
    with pytest.raises(ValueError, match="members/1.safetensors"):
        load_bundle(ensemble)


@pytest.fixture(scope="module")
def intact(members, tmp_path_factory) -> Path:
    from core.training.ensemble import build_ensemble_bundle

    out = tmp_path_factory.mktemp("ensemble2") / "bundle"
    return build_ensemble_bundle(members, None, ["background", "tumour"], out, fixed=PLAIN)


def test_ensemble_is_the_mean_of_member_probabilities(members, intact):
    images = sample_images(5, 64, 64, seed=5)
    singles = [Predictor.from_bundle(m, "cpu").predict_proba(images) for m in members]
    expected = [0.5 * (a + b) for a, b in zip(*singles, strict=True)]
    got = Predictor.from_bundle(intact, "cpu").predict_proba(images)
    assert max(float(np.abs(e - g).max()) for e, g in zip(expected, got, strict=True)) < 1e-5
    # Masks are the mean thresholded: differ from each member's where they disagree.
    masks = Predictor.from_bundle(intact, "cpu").predict(images)
    assert np.array_equal(masks, (np.stack(expected) > 0.5).astype(np.uint8))


def test_a_2_5d_ensemble_takes_its_members_neighbours(tmp_path):
    from core.training.ensemble import build_ensemble_bundle

    members = [make_random_bundle(tmp_path / name, size=(32, 32), postprocess={}, seed=seed, context=1)
               for name, seed in (("a", 1), ("b", 2))]
    out = build_ensemble_bundle(members, None, ["background", "tumour"], tmp_path / "ensemble", fixed=PLAIN)
    config = json.loads((out / "config.json").read_text())
    assert config["context"] == {"slices": 1, "sequences": "flair"} and config["model_args"]["in_channels"] == 5
    volume = sample_images(4, 32, 32, seed=5)
    singles = [np.stack(Predictor.from_bundle(m, "cpu").predict_proba(volume, volume=True)) for m in members]
    got = np.stack(Predictor.from_bundle(out, "cpu").predict_proba(volume, volume=True))
    np.testing.assert_allclose(got, 0.5 * (singles[0] + singles[1]), atol=1e-5)
    plain = make_random_bundle(tmp_path / "plain", size=(32, 32), postprocess={}, seed=3)
    with pytest.raises(ValueError, match="channels"):  # a 2.5D member and a plain one take different inputs
        build_ensemble_bundle([members[0], plain], None, ["background", "tumour"], tmp_path / "mixed", fixed=PLAIN)


def test_ensemble_through_onnx_sagemaker_and_serve(intact, ray_session, tmp_path):
    import httpx
    from serve_support import serving

    from serve.app import ServeSettings
    from serve.edge import OnnxPredictor
    from serve.onnx_export import export_onnx
    from serve.sagemaker.export import build_archive

    volume = sample_images(6, 80, 96, seed=6)  # not the ensemble's size: both resize directions
    reference = Predictor.from_bundle(intact, "cpu")
    ref_proba, ref_masks = reference.predict_proba(volume), reference.predict(volume, volume=True)

    export_onnx(intact, tmp_path / "ens.onnx")  # one graph holds every member and the averaging
    edge = OnnxPredictor(tmp_path / "ens.onnx")
    assert max(float(np.abs(r - g).max()) for r, g in zip(ref_proba, edge.predict_proba(volume), strict=True)) < 1e-4
    assert (edge.predict(volume, volume=True) == ref_masks).mean() >= 0.999

    archive = build_archive(intact, tmp_path / "model.tar.gz")
    with tarfile.open(archive) as tar:
        assert "members/1.safetensors" in tar.getnames()
        tar.extractall(tmp_path / "model", filter="data")
    (tmp_path / "vol.npy").write_bytes(codecs.encode_npy(volume))
    spec = [{"body": str(tmp_path / "vol.npy"), "content_type": codecs.NPY, "accept": codecs.NPY}]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_container(tmp_path / "model", tmp_path / "spec.json", tmp_path, {})
    got = np.load(io.BytesIO((tmp_path / "vol.npy.out").read_bytes()), allow_pickle=False)
    assert np.array_equal(got > 0, ref_masks > 0)

    with serving({"/": ServeSettings(bundle=str(intact))}) as urls:
        r = httpx.post(f"{urls['/']}/v1/segment/volume", content=codecs.encode_npy(volume), params={"format": "npy"},
                       headers={"Content-Type": codecs.NPY}, timeout=120)
        assert r.status_code == 200, r.text
        assert np.array_equal(np.load(io.BytesIO(r.content), allow_pickle=False) > 0, ref_masks > 0)
        assert httpx.get(f"{urls['/']}/v1/model", timeout=30).json()["arch"] == "ensemble"


def test_three_fold_cv_validates_every_patient_exactly_once(ray_session, prepared_dir, tmp_path):
    from core.data.arrays import SplitArrays, load_split
    from core.evaluation.evaluate import evaluate_split
    from tune.cv import run_cv

    config = {**TINY_NET, "epochs": 1, "lr": 5e-3, "oversample": 0.5}
    out = run_cv(prepared_dir, "cv3", 3, config, tmp_path)
    folds = json.loads((tmp_path / "cv3" / "folds.json").read_text())["folds"]
    pool = sorted({str(p) for s in ("train", "val") for p in load_split(prepared_dir, s).patients})
    flat = [p for f in folds for p in f]
    assert len(folds) == 3 and sorted(flat) == pool and len(flat) == len(set(flat))
    assert [r["fold"] for r in out["folds"]] == [0, 1, 2]
    parts = [load_split(prepared_dir, split, mmap=False) for split in ("train", "val")]
    pooled = SplitArrays(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("images", "masks", "patients",
                                                                                    "slices")))
    for row in out["folds"]:
        bundle = load_bundle(tmp_path / "cv3" / "folds" / f"fold{row['fold']}")
        val_patients = set(folds[row["fold"]])
        # Each fold's bundle was validated on its fold and trained on the rest: its split says so.
        assert row["patients"] == len(val_patients) and bundle.config["data"]["split_hash"]
        # Its recorded score is what the bundle scores on exactly its fold's patients (core's evaluation).
        fold = pooled.select(np.flatnonzero(np.isin(np.asarray(pooled.patients).astype(str), list(val_patients))))
        assert row["slices"] == len(fold)
        assert evaluate_split(Predictor(bundle, "cpu"), fold)["dsc_volume"] == pytest.approx(
            row["val"]["dsc_volume"], abs=1e-6)
        # Per patient, for paired comparisons of two CVs: exactly the fold's patients, and their mean is
        # the fold's dsc_volume (both from the bundle's own post-processed volume masks).
        per_patient = row["per_patient_dsc_volume"]
        assert set(per_patient) == val_patients
        assert np.mean(list(per_patient.values())) == pytest.approx(row["val"]["dsc_volume"], abs=1e-6)
    summary = out["summary"]["dsc_volume"]
    assert summary["mean"] == pytest.approx(np.mean([r["val"]["dsc_volume"] for r in out["folds"]]))
    ens = load_bundle(tmp_path / "cv3" / "ensemble")
    assert len(ens.config["members"]) == 3
    assert Predictor(ens, "cpu").predict(sample_images(2)).shape == (2, 64, 64)
    # The saved folds are reusable: a bad folds file (a patient missing) is refused by name.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"folds": [folds[0], folds[1]]}))
    with pytest.raises(ValueError, match="bad.json"):
        run_cv(prepared_dir, "cv3b", 2, config, tmp_path, folds_file=bad)


def test_cv_over_train_alone_keeps_val_out_and_scores_the_fold_ensemble_there(ray_session, prepared_dir, tmp_path):
    from core.data.arrays import load_split
    from core.evaluation.evaluate import evaluate_split
    from tune.cv import pool_splits, run_cv

    pool, _ = pool_splits(prepared_dir, "train")
    train = {str(p) for p in load_split(prepared_dir, "train").patients}
    val = {str(p) for p in load_split(prepared_dir, "val").patients}
    assert {str(p) for p in pool.patients} == train
    with pytest.raises(ValueError, match="pool"):
        pool_splits(prepared_dir, "val")
    config = {**TINY_NET, "epochs": 1, "lr": 5e-3, "oversample": 0.5}
    out = run_cv(prepared_dir, "cv2", 2, config, tmp_path, pool_name="train")
    folds = json.loads((tmp_path / "cv2" / "folds.json").read_text())["folds"]
    assert sorted(p for f in folds for p in f) == sorted(train) and not val & {p for f in folds for p in f}
    assert out["pool"] == "train"
    # The ensemble's val figure is what the shipped ensemble bundle scores on val (core's evaluation).
    ensemble = load_bundle(tmp_path / "cv2" / "ensemble")
    assert evaluate_split(Predictor(ensemble, "cpu"), load_split(prepared_dir, "val"))["dsc_volume"] == (
        pytest.approx(out["ensemble_val"]["dsc_volume"], abs=1e-6))
    assert out["summary"]["worst_patient_dsc_volume"] <= out["summary"]["dsc_volume"]["mean"]
    metrics = ensemble.metrics
    assert "selected on this val split" in metrics["selection"]
