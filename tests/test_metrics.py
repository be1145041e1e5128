"""Metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.evaluation.metrics import (
    confusion_matrix,
    is_better,
    per_patient_dice,
    per_slice_dice,
    segmentation_metrics,
)


def _masks(n: int, size: int = 8) -> np.ndarray:
    return np.zeros((n, size, size), np.uint8)


def test_empty_prediction_on_empty_slice_scores_one():
    pred, truth = _masks(2), _masks(2)
    assert per_slice_dice(pred, truth).tolist() == [1.0, 1.0]
    m = segmentation_metrics(pred, truth, np.array(["a", "a"]))
    assert m["dsc_volume"] == 1.0 and m["dice_all"] == 1.0 and m["iou"] == 1.0
    assert m["fp_slice_rate"] == 0.0
    assert math.isnan(m["dice_tumour"])  # no tumour slice: undefined, not invented


def test_empty_prediction_on_tumour_scores_zero():
    pred, truth = _masks(1), _masks(1)
    truth[0, 2:4, 2:4] = 1
    assert per_slice_dice(pred, truth).tolist() == [0.0]
    m = segmentation_metrics(pred, truth, np.array(["a"]))
    assert m["dice_tumour"] == 0.0 and m["dsc_volume"] == 0.0 and m["iou"] == 0.0
    assert math.isnan(m["fp_slice_rate"])  # no tumour-free slice


def test_false_positive_on_empty_slice():
    # slice 0: tumour, perfectly found; slice 1: empty truth, 1 predicted pixel; slice 2: empty, empty
    pred, truth = _masks(3), _masks(3)
    truth[0, 0:2, 0:2] = pred[0, 0:2, 0:2] = 1
    pred[1, 5, 5] = 1
    m = segmentation_metrics(pred, truth, np.array(["a", "a", "a"]))
    assert per_slice_dice(pred, truth).tolist() == [1.0, 0.0, 1.0]
    assert m["fp_slice_rate"] == pytest.approx(0.5)  # 1 of 2 tumour-free slices
    assert m["dice_tumour"] == 1.0
    assert m["dice_all"] == pytest.approx(2 / 3)
    assert m["dsc_volume"] == pytest.approx(2 * 4 / (5 + 4))  # 3D: 4 overlap, 5 predicted, 4 true
    assert m["iou"] == pytest.approx(4 / 5)


def test_per_patient_3d_dice_is_not_the_mean_of_slices():
    # patient a: slice 1 has 4 true px, 2 found; slice 2 has 1 true px, missed, + 1 FP px
    # patient b: no tumour, nothing predicted -> 1.0
    pred, truth = _masks(4), _masks(4)
    truth[0, 0:2, 0:2] = 1
    pred[0, 0, 0:2] = 1
    truth[1, 4, 4] = 1
    pred[1, 6, 6] = 1
    patients = np.array(["a", "a", "b", "b"])
    per_patient = per_patient_dice(pred, truth, patients)
    assert per_patient["a"] == pytest.approx(2 * 2 / (3 + 5))
    assert per_patient["b"] == 1.0
    m = segmentation_metrics(pred, truth, patients)
    assert m["dsc_volume"] == pytest.approx((0.5 + 1.0) / 2)
    slice_mean = (2 * 2 / 6 + 0.0) / 2
    assert m["dice_tumour"] == pytest.approx(slice_mean)
    # patient order in the rows does not matter
    order = np.array([2, 0, 3, 1])
    assert segmentation_metrics(pred[order], truth[order], patients[order]) == pytest.approx(m, nan_ok=True)


def test_multiclass_adds_per_class_dice_and_uses_foreground():
    truth, pred = _masks(1), _masks(1)
    truth[0, 0:2, 0:2] = 1  # class 1: 4 px
    truth[0, 4:6, 4:6] = 2  # class 2: 4 px
    pred[0, 0:2, 0:2] = 1
    pred[0, 4:6, 4:6] = 1  # right place, wrong class
    m = segmentation_metrics(pred, truth, np.array(["a"]), class_names=["background", "core", "oedema"])
    assert m["dsc_volume"] == 1.0  # foreground agrees everywhere
    assert m["dice_core"] == pytest.approx(2 * 4 / (8 + 4))
    assert m["dice_oedema"] == 0.0
    cm = confusion_matrix(pred, truth, 3)
    assert cm.tolist() == [[56, 0, 0], [0, 4, 0], [0, 4, 0]]


def test_fp_slice_rate_is_minimised_others_maximised():
    assert is_better("dsc_volume", 0.9, 0.8) and not is_better("dsc_volume", 0.8, 0.9)
    assert is_better("fp_slice_rate", 0.1, 0.2) and not is_better("fp_slice_rate", 0.2, 0.1)
    assert not is_better("dsc_volume", float("nan"), 0.1)
    assert is_better("dsc_volume", 0.1, float("-inf"))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(_masks(2), _masks(3), np.array(["a", "a"]))


def test_per_patient_dice_is_monais_dice_of_each_patients_volume():
    """The vectorised counts give what MONAI's compute_dice gives on each patient's stacked volume, including
    its convention for a tumour-free patient predicted empty (1, with ignore_empty=False)."""
    import torch
    from monai.metrics import compute_dice

    rng = np.random.default_rng(3)
    patients = np.repeat(["a", "b", "c", "d"], 6)
    truth = (rng.random((24, 16, 16)) > 0.8).astype(np.uint8)
    pred = ((truth > 0) ^ (rng.random((24, 16, 16)) > 0.9)).astype(np.uint8)
    truth[patients == "d"] = 0
    pred[patients == "d"] = 0
    ours = per_patient_dice(pred, truth, patients)
    for pid in "abcd":
        rows = patients == pid
        as_volume = [torch.from_numpy(x[rows].astype(np.float32))[None, None] for x in (pred, truth)]
        theirs = float(compute_dice(*as_volume, include_background=True, ignore_empty=False))
        assert ours[pid] == pytest.approx(theirs, abs=1e-6), pid
    assert ours["d"] == 1.0 and 0.5 < ours["a"] < 1.0
