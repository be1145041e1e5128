"""Training resolution and test-time augmentation (issue 12): a bundle trained at 64 px on 128 px data
predicts 128 px masks, and its TTA and post-processing give the same masks in every inference path."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import sample_images
from sagemaker_sim import run_container
from scipy import ndimage

from core.bundle import load_bundle
from core.config import TrainConfig
from core.data.arrays import load_split, patient_rows
from core.data.preprocessing import single_slice_note
from core.evaluation.metrics import segmentation_metrics
from core.formats import codecs
from core.inference.postprocess import KAGGLE_SPACING_MM, NO_POSTPROCESS, apply_postprocess
from core.inference.predictor import Predictor
from core.training.trainer import Trainer

NATIVE, TRAINED = 128, 64


@pytest.fixture(scope="module")
def prepared_128(tmp_path_factory) -> Path:
    from core.data.prepare import SplitOptions, prepare
    from core.data.synth import synthesize

    src = synthesize(tmp_path_factory.mktemp("synth128"), patients=5, slices=10, size=NATIVE, seed=3)
    out = tmp_path_factory.mktemp("prepared128") / "prepared"
    prepare(src, out, SplitOptions(val=1, test=0, seed=0), progress=False)
    return out


@pytest.fixture(scope="module")
def trained(prepared_128, tmp_path_factory) -> tuple[Trainer, Path]:
    cfg = TrainConfig(arch="lite", filters=8, epochs=3, batch_size=8, image_size=TRAINED, lr=5e-3,
                      oversample=0.5, device="cpu", seed=0)
    trainer = Trainer.from_prepared(cfg, prepared_128)
    trainer.fit()
    return trainer, trainer.export_bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture(scope="module")
def trained_patient(prepared_128, tmp_path_factory) -> Path:
    """A bundle standardised and brain-cropped per patient (issue 19), trained at 64 px like the other."""
    cfg = TrainConfig(arch="lite", filters=8, epochs=2, batch_size=8, image_size=TRAINED, lr=5e-3, oversample=0.5,
                      normalisation="patient", brain_crop="patient", device="cpu", seed=0)
    trainer = Trainer.from_prepared(cfg, prepared_128)
    trainer.fit()
    return trainer.export_bundle(tmp_path_factory.mktemp("bundle-patient") / "b")


@pytest.fixture(scope="module")
def trained_context(prepared_128, tmp_path_factory) -> Path:
    """A 2.5D bundle: one neighbouring slice's FLAIR each side as extra channels, preprocessing per slice."""
    cfg = TrainConfig(arch="lite", filters=8, epochs=2, batch_size=8, image_size=TRAINED, lr=5e-3, oversample=0.5,
                      normalisation="slice", brain_crop="slice", context=1, device="cpu", seed=0)
    trainer = Trainer.from_prepared(cfg, prepared_128)
    trainer.fit()
    return trainer.export_bundle(tmp_path_factory.mktemp("bundle-context") / "b")


@pytest.fixture(scope="module")
def bundles(trained, trained_patient, trained_context, tmp_path_factory) -> dict[str, Path]:
    """The trained bundle with TTA forced off and on (post-processing on), whatever val chose, and the
    per-patient and 2.5D bundles with flip TTA and component post-processing."""
    out = {}
    for name, source, tta, postprocess in (
        ("none", trained[1], "none", {"largest_component": True, "min_area": 5}),
        ("flip", trained[1], "flip", {"largest_component": True, "min_area": 5}),
        ("patient", trained_patient, "flip", {"min_volume": 20, "min_area": 5}),
        ("context", trained_context, "flip", {"min_volume": 20, "min_area": 5}),
    ):
        path = tmp_path_factory.mktemp(f"bundle-{name}") / "bundle"
        shutil.copytree(source, path)
        config = json.loads((path / "config.json").read_text())
        config.update(tta=tta, postprocess=postprocess)
        (path / "config.json").write_text(json.dumps(config))
        out[name] = path
    return out


def read_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def val_images(prepared: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    val = load_split(prepared, "val")
    return np.asarray(val.images).transpose(0, 2, 3, 1), np.asarray(val.masks), np.asarray(val.patients).astype(str)


def test_split_is_resized_once_on_the_device_and_masks_stay_binary(trained, prepared_128):
    trainer, _ = trained
    assert trainer.image_size == (TRAINED, TRAINED) and trainer.native_size == (NATIVE, NATIVE)
    assert tuple(trainer.train_data.images.shape[2:]) == (TRAINED, TRAINED)
    assert set(trainer.train_data.masks.unique().tolist()) <= {0, 1}
    # Majority: a 2x2 block turns tumour exactly where more than half of it was tumour.
    native = np.asarray(load_split(prepared_128, "train").masks)[:4].astype(int)
    blocks = native.reshape(4, TRAINED, 2, TRAINED, 2).sum((2, 4))
    assert np.array_equal(trainer.train_data.masks[:4].numpy(), (blocks > 2).astype(np.uint8))
    # Validation runs at the data's own size: masks come back at 128 px.
    assert trainer.predict_val().shape[1:] == (NATIVE, NATIVE)


def test_bundle_trained_at_64_predicts_128_masks_matching_its_val_metrics(trained, prepared_128):
    trainer, path = trained
    bundle = load_bundle(path)
    assert bundle.config["image_size"] == [TRAINED, TRAINED]
    assert bundle.config["hyperparameters"]["image_size"] == TRAINED
    assert bundle.metrics["data_size"] == [NATIVE, NATIVE]
    images, truth, patients = val_images(prepared_128)
    predictor = Predictor(bundle, "cpu")
    masks = np.zeros_like(truth)
    for rows in patient_rows(patients, np.arange(len(patients))):
        masks[rows] = predictor.predict(images[rows], volume=True)
    assert masks.shape[1:] == (NATIVE, NATIVE)
    # The bundle's recorded val metrics are what its Predictor gives on val (same resize, TTA, post-proc).
    got = segmentation_metrics(masks, truth, patients)
    assert got["dsc_volume"] == pytest.approx(bundle.metrics["val"]["dsc_volume"], abs=1e-6)


def test_a_2_5d_bundle_takes_its_neighbours_the_way_it_was_trained(trained_context, prepared_128):
    bundle = load_bundle(trained_context)
    assert bundle.config["context"] == {"slices": 1, "sequences": "flair"}
    assert bundle.config["model_args"]["in_channels"] == 5
    assert bundle.config["channels"] == ["pre-contrast", "flair", "post-contrast", "flair-1", "flair+1"]
    images, truth, patients = val_images(prepared_128)
    predictor = Predictor(bundle, "cpu")
    masks = np.zeros_like(truth)
    for rows in patient_rows(patients, np.arange(len(patients))):
        masks[rows] = predictor.predict(images[rows], volume=True)
    # The val figures the trainer recorded (its neighbours from the prepared split) are the Predictor's.
    got = segmentation_metrics(masks, truth, patients)
    assert got["dsc_volume"] == pytest.approx(bundle.metrics["val"]["dsc_volume"], abs=1e-6)

    volume = images[patients == patients[0]]
    together = np.stack(predictor.predict_proba(volume, volume=True))
    alone = np.stack(predictor.predict_proba(volume))
    assert np.abs(alone - together).max() > 1e-4  # neighbours are input: one slice alone is another answer
    # Where they must agree: a slice whose neighbours are itself (a volume's edge slice is its own outer
    # neighbour; a volume of that slice repeated), the volume path and the one-slice path give one answer.
    edge = np.stack(predictor.predict_proba(np.repeat(volume[:1], 3, axis=0), volume=True))
    np.testing.assert_allclose(edge, np.repeat(alone[:1], 3, axis=0), atol=1e-6)
    assert single_slice_note(bundle.config) is not None and "neighbouring" in single_slice_note(bundle.config)


def test_tta_averages_the_mirrored_pass(bundles):
    plain, flip = Predictor.from_bundle(bundles["none"], "cpu"), Predictor.from_bundle(bundles["flip"], "cpu")
    images = sample_images(3, NATIVE, NATIVE, seed=4)
    a, b = plain.predict_proba(images), plain.predict_proba(np.ascontiguousarray(images[:, :, ::-1]))
    expected = [0.5 * (p + q[:, ::-1]) for p, q in zip(a, b, strict=True)]
    got = flip.predict_proba(images)
    assert max(float(np.abs(e - g).max()) for e, g in zip(expected, got, strict=True)) < 1e-6
    assert max(float(np.abs(e - p).max()) for e, p in zip(expected, a, strict=True)) > 1e-3  # TTA did something


def test_same_masks_through_predictor_onnx_serve_and_sagemaker(bundles, prepared_128, ray_session, tmp_path):
    import httpx
    from serve_support import serving

    from serve.app import ServeSettings
    from serve.edge import OnnxPredictor
    from serve.onnx_export import export_onnx
    from serve.sagemaker.export import build_archive

    images, _, patients = val_images(prepared_128)
    volume = images[patients == patients[0]]
    reference = {}
    for tta, bundle in bundles.items():  # without and with flip TTA; per-patient preprocessing; 2.5D
        predictor = Predictor.from_bundle(bundle, "cpu")
        reference[tta] = predictor.predict(volume, volume=True), predictor.predict(volume[:4])
        assert reference[tta][0].shape == (len(volume), NATIVE, NATIVE) and reference[tta][0].any()

        export_onnx(bundle, tmp_path / f"{tta}.onnx")
        edge = OnnxPredictor(tmp_path / f"{tta}.onnx")
        assert edge.tta == predictor.tta
        assert (edge.predict(volume, volume=True) == reference[tta][0]).mean() >= 0.9999
        assert (edge.predict(volume[:4]) == reference[tta][1]).mean() >= 0.9999

        archive = build_archive(bundle, tmp_path / f"{tta}.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp_path / tta, filter="data")
        (tmp_path / f"{tta}.npy").write_bytes(codecs.encode_npy(volume))
        for name in ("slice", "slice-binary"):  # each request's answer goes to BODY.out
            (tmp_path / f"{tta}-{name}.npy").write_bytes(codecs.encode_npy(volume[0]))
        spec = [{"body": str(tmp_path / f"{tta}.npy"), "content_type": codecs.NPY, "accept": codecs.NPY},
                {"body": str(tmp_path / f"{tta}-slice.npy"), "content_type": codecs.NPY, "accept": codecs.JSON},
                {"body": str(tmp_path / f"{tta}-slice-binary.npy"), "content_type": codecs.NPY, "accept": codecs.NPY}]
        (tmp_path / f"{tta}.json").write_text(json.dumps(spec))
        out = run_container(tmp_path / tta, tmp_path / f"{tta}.json", tmp_path, {})
        answers = json.loads(out.split("RESULTS", 1)[1])[:3]
        statuses = [r["status"] for r in answers]
        assert np.array_equal(read_npy((tmp_path / f"{tta}.npy.out").read_bytes()) > 0, reference[tta][0] > 0)
        # One slice of a per-patient or 2.5D bundle: answered, as by Serve, with the note in JSON and in the
        # invocation's custom attributes (Serve's Warning), whatever the format.
        summary = json.loads((tmp_path / f"{tta}-slice.npy.out").read_bytes())
        per_patient = tta in ("patient", "context")
        assert (summary["preprocessing_note"] is not None) == per_patient
        assert statuses == [200, 200, 200]
        for r in answers[1:]:
            scope = r["headers"].get("X-Amzn-SageMaker-Custom-Attributes", "")
            assert scope.startswith("preprocessing_scope=slice") == per_patient, r
        np.testing.assert_array_equal(read_npy((tmp_path / f"{tta}-slice-binary.npy.out").read_bytes()) > 0,
                                      reference[tta][1][:1] > 0)

    apps = {f"/{tta}": ServeSettings(bundle=str(bundle)) for tta, bundle in bundles.items()}
    with serving(apps) as urls:
        for tta, (ref_volume, ref_slices) in reference.items():
            url = urls[f"/{tta}"]
            info = httpx.get(f"{url}/v1/model", timeout=30).json()
            per_patient = tta in ("patient", "context")
            assert info["tta"] == ("flip" if per_patient else tta) and info["image_size"] == [TRAINED, TRAINED]
            assert info.get("context") == ({"slices": 1, "sequences": "flair"} if tta == "context" else None)
            recorded = json.loads((Path(bundles[tta]) / "metrics.json").read_text())["val"]["dsc_volume"]
            assert info["metrics"]["val"]["dsc_volume"] == recorded  # what the bundle recorded, as served
            r = httpx.post(f"{url}/v1/segment/volume", content=codecs.encode_npy(volume), params={"format": "npy"},
                           headers={"Content-Type": codecs.NPY}, timeout=120)
            assert r.status_code == 200, r.text
            assert np.array_equal(read_npy(r.content) > 0, ref_volume > 0)
            for i in range(4):
                r = httpx.post(f"{url}/v1/segment", content=codecs.encode_npy(volume[i]), params={"format": "npy"},
                               headers={"Content-Type": codecs.NPY}, timeout=60)
                assert r.status_code == 200, r.text
                assert np.array_equal(read_npy(r.content) > 0, ref_slices[i] > 0)
                # One slice of a per-patient or 2.5D bundle: standardised (or its neighbours filled) by
                # itself, and the response says so.
                assert (r.headers.get("X-Preprocessing-Scope") == "slice") == per_patient
                assert ("/v1/segment/volume" in r.headers.get("Warning", "")) == per_patient


def test_tta_and_postprocessing_left_out_unless_they_raise_val(trained, monkeypatch):
    trainer, _ = trained
    truth = trainer.val_truth
    noisy = truth.copy()
    noisy[:, :3, :3] = 1  # a speck on every slice: hurts, and post-processing can remove it
    model = trainer.best_model()

    monkeypatch.setattr(trainer, "predict_val", lambda m=None, tta=False: noisy if tta else truth.copy())
    tta, settings, entries = trainer.choose_inference(model)
    assert (tta, settings) == ("none", NO_POSTPROCESS)  # perfect already: nothing can strictly help
    assert entries["val"]["dsc_volume"] == pytest.approx(1.0)
    assert entries["tta_search"]["flip"] <= entries["tta_search"]["none"]

    # Lesions grown by a pixel: no post-processing undoes that, so only TTA (here perfect) can help.
    grown = ndimage.binary_dilation(truth > 0, structure=np.ones((1, 3, 3), bool)).astype(np.uint8)
    monkeypatch.setattr(trainer, "predict_val", lambda m=None, tta=False: truth.copy() if tta else grown)
    tta, settings, entries = trainer.choose_inference(model)
    assert tta == "flip" and settings == NO_POSTPROCESS
    assert entries["tta_search"]["flip"] > entries["tta_search"]["none"]

    monkeypatch.setattr(trainer, "cfg", trainer.cfg.replace(tta="none"))
    monkeypatch.setattr(trainer, "predict_val", lambda m=None, tta=False: noisy)
    tta, settings, entries = trainer.choose_inference(model)
    assert tta == "none" and "val_tta" not in entries
    assert settings != NO_POSTPROCESS  # the specks are what minimum-area post-processing removes
    assert entries["val"]["dsc_volume"] > entries["val_raw"]["dsc_volume"]
    # One slice at a time there is no 3D step: the specks need the slice path's own minimum area.
    assert settings["min_area_slice_mm2"] > 0
    assert entries["val_one_slice"]["fp_slice_rate"] < entries["val_raw"]["fp_slice_rate"]


def test_one_slice_path_applies_its_own_minimum_area_and_the_volume_path_its_3d_rule():
    masks = np.zeros((3, 32, 32), np.uint8)
    masks[1, 10:20, 10:20] = 1  # a 100-px lesion on the middle slice (300 voxels with its neighbours)
    masks[0, 10:20, 10:20] = masks[2, 10:20, 10:20] = 1
    masks[0, 0:3, 0:3] = 1  # a 9-px speck
    pixel_mm2 = KAGGLE_SPACING_MM[1] * KAGGLE_SPACING_MM[2]  # no spacing given: the Kaggle grid's
    settings = {**NO_POSTPROCESS, "min_volume_mm3": 50 * pixel_mm2 * KAGGLE_SPACING_MM[0],
                "min_area_slice_mm2": 20 * pixel_mm2}
    volume = apply_postprocess(masks, settings, volume=True)
    assert volume[0, :3, :3].sum() == 0 and volume.sum() == 300  # the 3D rule removes the speck
    one = np.stack([apply_postprocess(m[None], settings, volume=False)[0] for m in masks])
    assert one[0, :3, :3].sum() == 0 and one.sum() == 300  # the slice rule removes it too
    legacy = {"min_area": 5, "min_volume": 50}  # a bundle from before min_area_slice: min_area per slice
    assert apply_postprocess(masks[:1], legacy, volume=False).sum() == 109


def test_image_size_is_checked_and_reaches_the_cli_and_space():
    from tune.space import parse_space

    with pytest.raises(ValueError, match="image_size"):
        TrainConfig(image_size=100).validate()
    space = parse_space({"image_size": [64, 128]})
    assert list(space.searched["image_size"].choices) == [64, 128]
