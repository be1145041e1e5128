"""The field's preprocessing (issue 19): standardisation per slice or per patient, the brain crop,
missing-sequence training, component post-processing chosen with the worst patient in view, --init."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.bundle import load_bundle
from core.config import TrainConfig
from core.data.arrays import load_split, patient_rows
from core.data.preprocessing import (
    Preprocessing,
    box_matrices,
    mirror_boxes,
    normalise,
    single_slice_note,
)
from core.evaluation.metrics import segmentation_metrics
from core.evaluation.selection import ValSplit, choose_postprocess
from core.inference.postprocess import apply_postprocess
from core.inference.predictor import Predictor
from core.training.augment import substitute_sequences
from core.training.trainer import Trainer

NATIVE, TRAINED = 96, 64


def head(n: int = 4, size: int = 96, seed: int = 0) -> np.ndarray:
    """(n,3,size,size) uint8: a bright off-centre ellipse (a 'brain') on black, different per channel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    brain = ((yy - 0.45 * size) / (0.3 * size)) ** 2 + ((xx - 0.55 * size) / (0.2 * size)) ** 2 < 1
    out = np.zeros((n, 3, size, size), np.uint8)
    for c, level in enumerate((60, 120, 90)):
        out[:, c] = np.where(brain, rng.integers(level - 30, level + 30, (n, size, size)), 0)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from core.data.prepare import SplitOptions, prepare
    from core.data.synth import synthesize

    src = synthesize(tmp_path_factory.mktemp("synth"), patients=5, slices=8, size=NATIVE, seed=5)
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(src, out, SplitOptions(val=1, test=0, seed=0), progress=False)
    return out


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> tuple[Trainer, Path]:
    cfg = TrainConfig(arch="lite", filters=8, epochs=2, batch_size=8, image_size=TRAINED, lr=5e-3, oversample=0.5,
                      normalisation="patient", brain_crop="patient", missing_sequence=0.5, device="cpu", seed=0)
    trainer = Trainer.from_prepared(cfg, prepared)
    trainer.fit()
    return trainer, trainer.export_bundle(tmp_path_factory.mktemp("bundle") / "b")


def test_scale_is_the_old_division_by_255():
    images = head()
    stats, boxes = Preprocessing().plan(images)
    assert boxes is None
    assert np.allclose(normalise(images.astype(np.float32), stats), images / 255.0, atol=1e-7)


@pytest.mark.parametrize("scope", ["slice", "patient"])
def test_standardisation_z_scores_the_brain_after_the_percentile_clip(scope):
    images = head(n=3)
    images[2] //= 2  # a darker slice: per-slice numbers differ from the patient's
    stats, _ = Preprocessing(normalisation=scope).plan(images)
    x = normalise(images.astype(np.float32), stats)
    brain = images.max(1) > 0
    if scope == "patient":
        assert np.array_equal(stats[0], stats[2])  # one set of numbers for the volume
        values = x.transpose(1, 0, 2, 3)[:, brain]
        assert np.allclose(values.mean(1), 0, atol=0.1) and np.allclose(values.std(1), 1, atol=0.1)
    else:
        assert not np.array_equal(stats[0], stats[2])
        for i in range(3):
            values = x[i][:, brain[i]]
            assert np.allclose(values.mean(1), 0, atol=0.1) and np.allclose(values.std(1), 1, atol=0.1)
    lo, hi = np.percentile(images[0, 1][brain[0]], [10, 99]) if scope == "slice" else (None, None)
    if lo is not None:
        assert stats[0, 1, :2] == pytest.approx([lo, hi])


def test_brain_box_is_a_square_about_the_brain_and_mirrors_with_the_slice():
    images = head(n=2)
    _, boxes = Preprocessing(crop="slice").plan(images)
    y0, x0, side_y, side_x = boxes[0]
    ys, xs = np.nonzero(images[0].max(0))
    assert side_y == side_x == max(np.ptp(ys), np.ptp(xs)) + 1
    assert y0 <= ys.min() and y0 + side_y > ys.max() and x0 <= xs.min() and x0 + side_x > xs.max()
    # The mirrored pass (flip TTA) uses the mirror of the box: the crop of the mirror is the mirror of the crop.
    mirrored = mirror_boxes(boxes, NATIVE)
    assert np.array_equal(mirrored[:, [0, 2, 3]], boxes[:, [0, 2, 3]]) and mirrored[0, 1] == NATIVE - x0 - side_x
    _, flipped = Preprocessing(crop="slice").plan(np.ascontiguousarray(images[:, :, :, ::-1]))
    assert np.abs(mirrored - flipped).max() <= 1  # the box found afresh differs by the centring's rounding


def test_crop_and_back_is_exact_inside_the_box_and_zero_outside():
    box = np.array([[-4, 10, 40, 40]])  # leaves the image at the top: padded with black there
    down_h, down_w, up_h, up_w = box_matrices(box, (NATIVE, NATIVE), (40, 40))  # side == size: no resampling
    x = np.random.default_rng(0).random((NATIVE, NATIVE)).astype(np.float32)
    crop = down_h[0] @ x @ down_w[0].T
    assert np.array_equal(crop[4:, :], x[:36, 10:50]) and not crop[:4].any()
    back = up_h[0] @ crop @ up_w[0].T
    inside = np.zeros_like(x, bool)
    inside[:36, 10:50] = True
    assert np.array_equal(back[inside], x[inside]) and not back[~inside].any()


def test_missing_sequence_substitution_copies_flair_pixels_and_numbers():
    images = torch.from_numpy(head(n=64).astype(np.float32))
    stats = torch.from_numpy(Preprocessing(normalisation="slice").plan(head(n=64))[0])
    out, out_stats = substitute_sequences(images, stats, 0.5, torch.Generator().manual_seed(0))
    replaced = [(out[:, c] == out[:, 1]).flatten(1).all(1) for c in (0, 2)]
    hit = replaced[0] | replaced[1]
    assert 10 < int(hit.sum()) < 54 and bool((replaced[0] & replaced[1]).any())  # pre, post, or both
    for c, rows in zip((0, 2), replaced, strict=True):
        assert torch.equal(out_stats[rows, c], stats[rows, 1])
        assert torch.equal(out[~rows, c], images[~rows, c])  # the others untouched
    assert torch.equal(out[:, 1], images[:, 1])


def test_bundle_records_preprocessing_and_its_predictor_reproduces_val(trained, prepared):
    trainer, path = trained
    bundle = load_bundle(path)
    assert bundle.config["normalisation"]["type"] == "patient" and bundle.config["crop"]["type"] == "patient"
    assert trainer.train_data.boxes is not None and tuple(trainer.train_data.images.shape[2:]) == (TRAINED,) * 2
    val = load_split(prepared, "val")
    images, truth = np.asarray(val.images).transpose(0, 2, 3, 1), np.asarray(val.masks)
    patients = np.asarray(val.patients).astype(str)
    predictor = Predictor(bundle, "cpu")
    masks = np.zeros_like(truth)
    for rows in patient_rows(patients, np.asarray(val.slices)):
        masks[rows] = predictor.predict(images[rows], volume=True)
    got = segmentation_metrics(masks, truth, patients)
    assert got["dsc_volume"] == pytest.approx(bundle.metrics["val"]["dsc_volume"], abs=1e-6)
    assert "dsc_volume_min" in bundle.metrics["val"]
    # One slice at a time, the patient's numbers are not there: the probabilities differ, and paths say so.
    rows = patient_rows(patients, np.asarray(val.slices))[0]
    alone = np.stack(predictor.predict_proba(images[rows]))
    together = np.stack(predictor.predict_proba(images[rows], volume=True))
    assert np.abs(alone - together).max() > 1e-4
    assert "per patient" in single_slice_note(bundle.config)
    assert single_slice_note({"normalisation": {"type": "slice"}, "crop": {"type": "slice"}}) is None


def test_init_starts_from_a_bundle_at_another_size_and_is_recorded(trained, prepared, tmp_path):
    from core.__main__ import COMMANDS
    from core.cli import dispatch

    _, path = trained
    start = load_bundle(path)
    cfg = TrainConfig(arch="lite", filters=8, epochs=1, init=str(path), normalisation="patient",
                      brain_crop="patient", device="cpu")
    trainer = Trainer.from_prepared(cfg, prepared)
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in start.model.state_dict().items())
    with pytest.raises(ValueError, match="must match"):
        Trainer.from_prepared(cfg.replace(filters=16), prepared)
    # The command line: options left at their defaults (arch, filters, preprocessing) follow the bundle.
    argv = ["train", "--data", str(prepared), "--out", str(tmp_path / "tuned"), "--init", str(path),
            "--epochs", "1", "--batch-size", "8", "--image-size", str(NATIVE), "--device", "cpu"]
    assert dispatch("python -m core", "", COMMANDS, argv) == 0
    out = load_bundle(tmp_path / "tuned" / "best")
    assert out.config["init"]["source"] == str(path) and out.config["init"]["image_size"] == [TRAINED, TRAINED]
    assert out.config["image_size"] == [NATIVE, NATIVE] and out.config["arch"] == "lite"
    assert out.config["normalisation"]["type"] == "patient" and out.config["crop"]["type"] == "patient"


def test_component_post_processing_keeps_a_small_tumour_beside_a_large_false_positive():
    masks = np.zeros((3, 32, 32), np.uint8)
    masks[:, 2:20, 2:20] = 1  # the large false positive
    masks[1, 25:28, 25:28] = 1  # the small tumour (9 voxels)
    masks[2, 30, 0] = 1  # a speck
    kept = apply_postprocess(masks, {"min_volume": 5, "min_area": 0}, volume=True)
    assert kept[1, 25:28, 25:28].all() and not kept[2, 30, 0] and kept[:, 2:20, 2:20].all()
    largest = apply_postprocess(masks, {"largest_component": True}, volume=True)
    assert not largest[1, 25:28, 25:28].any()  # what the old rule did


def test_post_processing_is_never_chosen_at_the_worst_patients_cost():
    truth = np.zeros((4, 32, 32), np.uint8)
    truth[:2, 10:14, 10:14] = 1  # patient a: a 32-voxel tumour
    truth[2:, 5:10, 5:10] = 1  # patient b: 25 px a slice
    pred = truth.copy()
    pred[:2, 10:14, 10:14] = 0
    pred[0, 11, 11] = 1  # all that is found of a's tumour: one pixel
    pred[2:, 28:31, 28:31] = 1  # b's specks (9 px a slice): removing them (min_area 10) also empties a
    val = ValSplit(truth, np.array(["a", "a", "b", "b"]), np.arange(4))
    settings, metrics, search = choose_postprocess(pred, val)
    base = val.metrics(pred)
    assert metrics["dsc_volume_min"] >= base["dsc_volume_min"]
    assert any(s["dsc_volume"] > base["dsc_volume"] and s["dsc_volume_min"] < base["dsc_volume_min"] for s in search)


def test_2_5d_context_appends_each_neighbours_channels_with_the_edges_repeated():
    volume = np.broadcast_to(np.arange(4, dtype=np.uint8)[:, None, None, None] * 10, (4, 3, 2, 2)).copy()
    volume[:, 1] += 1  # FLAIR told apart from the other sequences
    flair = Preprocessing(context=1)
    out = flair.with_context(volume)
    assert out.shape == (4, 5, 2, 2) and flair.channel_names[3:] == ["flair-1", "flair+1"]
    assert [int(v) for v in out[:, 3, 0, 0]] == [1, 1, 11, 21]  # slice i-1's FLAIR; the first repeats itself
    assert [int(v) for v in out[:, 4, 0, 0]] == [11, 21, 31, 31]
    np.testing.assert_array_equal(out[:, :3], volume)
    every = Preprocessing(context=2, context_sequences="all")
    assert every.with_context(volume).shape == (4, 15, 2, 2) and len(every.channel_names) == 15
    channels_last = every.with_context(volume.transpose(0, 2, 3, 1), channel_axis=3)
    np.testing.assert_array_equal(channels_last, every.with_context(volume).transpose(0, 2, 3, 1))
    # The bundle records it (and its channel names); a bundle without the entry has no context.
    assert Preprocessing.from_config(every.to_config()) == every
    assert every.to_config()["channels"] == every.channel_names
    assert Preprocessing.from_config({}).context == 0 and "context" not in Preprocessing().to_config()
    with pytest.raises(ValueError, match="context"):
        Preprocessing(context=4)


def test_int8_calibration_inputs_carry_a_2_5d_bundles_channels():
    from serve.quantize import model_inputs

    config = {"image_size": [32, 32], **Preprocessing(context=1).to_config()}
    images = np.random.default_rng(0).integers(0, 255, (3, 3, 48, 48), dtype=np.uint8)
    x = model_inputs(images, config)
    assert x.shape == (3, 5, 32, 32)
    # One slice alone: its neighbours are itself, so the FLAIR channels are one input.
    np.testing.assert_array_equal(x[:, 3], x[:, 1])
    np.testing.assert_array_equal(x[:, 4], x[:, 1])
