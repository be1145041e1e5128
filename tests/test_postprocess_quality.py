"""Post-processing in physical units with the component probability rule, and the quality score."""

from __future__ import annotations

import numpy as np
import pytest

from core.inference.postprocess import (
    KAGGLE_SPACING_MM,
    NO_POSTPROCESS,
    apply_postprocess,
    physical,
    postprocess_volume,
)
from core.inference.quality import assess, quality_score
from core.inference.slices import SlicePredictor

KAGGLE_VOXEL_MM3 = float(np.prod(KAGGLE_SPACING_MM))


def cube(shape: tuple[int, int, int], corner: tuple[int, int, int], side: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[tuple(slice(c, c + s) for c, s in zip(corner, side, strict=True))] = 1
    return out


def test_a_rule_in_mm3_treats_a_1mm_scan_as_it_treats_the_kaggle_grid() -> None:
    rule = {**NO_POSTPROCESS, "min_volume_mm3": 2000.0}
    # About 2,200 mm3 on each grid: kept on both; about 1,800 mm3 on each: removed on both.
    kept_1mm = cube((20, 40, 40), (2, 5, 5), (11, 10, 20))  # 2,200 voxels of 1 mm3
    gone_1mm = cube((20, 40, 40), (2, 5, 5), (9, 10, 20))  # 1,800
    assert apply_postprocess(kept_1mm, rule, volume=True, spacing=(1, 1, 1)).sum() == 2200
    assert apply_postprocess(gone_1mm, rule, volume=True, spacing=(1, 1, 1)).sum() == 0
    kept_kaggle = cube((8, 40, 40), (1, 5, 5), (2, 16, 16))  # 512 voxels = 2,250 mm3
    gone_kaggle = cube((8, 40, 40), (1, 5, 5), (2, 14, 15))  # 420 voxels = 1,846 mm3
    assert apply_postprocess(kept_kaggle, rule, volume=True).sum() == 512  # no spacing: the Kaggle grid's
    assert apply_postprocess(gone_kaggle, rule, volume=True).sum() == 0
    # The same 512 voxels at 1 mm are only 512 mm3: removed.
    assert apply_postprocess(kept_kaggle, rule, volume=True, spacing=(1, 1, 1)).sum() == 0


def test_voxel_counts_of_older_bundles_keep_their_masks_on_the_kaggle_grid() -> None:
    legacy = {"min_volume": 300, "min_area": 0, "min_area_slice": 25, "largest_component": False}
    rules = physical(legacy)
    assert rules["min_volume_mm3"] == pytest.approx(300 * KAGGLE_VOXEL_MM3)
    assert rules["min_area_slice_mm2"] == pytest.approx(25 * KAGGLE_SPACING_MM[1] * KAGGLE_SPACING_MM[2])
    exactly = cube((6, 30, 30), (1, 0, 0), (3, 10, 10))  # 300 voxels: kept, as `>= 300` always did
    short = cube((6, 30, 30), (1, 0, 0), (3, 10, 10))
    short[1, 0, 0] = 0  # 299
    assert apply_postprocess(exactly, legacy, volume=True).sum() == 300
    assert apply_postprocess(short, legacy, volume=True).sum() == 0
    lesion = np.zeros((1, 30, 30), np.uint8)
    lesion[0, :5, :5] = 1  # 25 px: kept one slice alone; 24 px: removed
    assert apply_postprocess(lesion, legacy, volume=False).sum() == 25
    lesion[0, 0, 0] = 0
    assert apply_postprocess(lesion, legacy, volume=False).sum() == 0


def test_the_probability_rule_removes_the_faint_region_and_keeps_the_confident_tumour() -> None:
    tumour = cube((10, 64, 64), (2, 5, 5), (4, 12, 12))
    faint = cube((10, 64, 64), (3, 40, 40), (5, 15, 15))  # larger than the tumour: no size rule keeps only it
    masks = tumour | faint
    probs = np.where(tumour > 0, 0.96, np.where(faint > 0, 0.82, 0.01)).astype(np.float32)
    rule = {**NO_POSTPROCESS, "min_probability": 0.9}
    out = apply_postprocess(masks, rule, volume=True, probs=probs)
    assert np.array_equal(out, tumour)
    assert np.array_equal(apply_postprocess(masks, rule, volume=True), masks)  # no probabilities: rule skipped
    one = apply_postprocess(masks[3:4], {**NO_POSTPROCESS, "min_probability_slice": 0.9}, volume=False,
                            probs=probs[3:4])
    assert np.array_equal(one, tumour[3:4])


def test_quality_falls_with_uncertain_or_removed_regions_and_flags_review() -> None:
    tumour = cube((6, 32, 32), (1, 4, 4), (3, 10, 10))
    crisp = np.where(tumour > 0, 0.98, 0.0).astype(np.float32)
    diffuse = crisp.copy()
    diffuse[:, 20:30, 20:30] = 0.45  # below threshold, but probability mass the answer does not report
    assert quality_score(crisp, tumour) > 0.98
    assert quality_score(diffuse, tumour) < quality_score(crisp, tumour) - 0.2
    assert quality_score(np.zeros_like(crisp), np.zeros_like(tumour)) == 1.0  # confidently empty
    assert quality_score(crisp, tumour, "confidence") == pytest.approx(0.98)
    assert quality_score(diffuse, np.zeros_like(tumour), "confidence") == pytest.approx(0.02, abs=1e-6)
    with pytest.raises(ValueError, match="quality method"):
        quality_score(crisp, tumour, "bogus")
    assert assess(diffuse, tumour, {"method": "soft_dice", "review_below": 0.9})[1] is True
    assert assess(crisp, tumour, {"method": "soft_dice", "review_below": 0.9})[1] is False
    assert assess(crisp, tumour, None)[1] is None  # no threshold chosen: no verdict


class Thresholding(SlicePredictor):
    """A network-free predictor: the FLAIR channel's brightness is the probability (a real SlicePredictor)."""

    def __init__(self, postprocess: dict) -> None:
        self._configure({"image_size": [32, 32], "model_args": {"out_channels": 1}, "postprocess": postprocess,
                         "quality": {"review_below": 0.9}}, {}, 8)

    def _network(self, x: np.ndarray) -> np.ndarray:
        return (x[:, 1:2] - x[:, 1:2].min()) / max(float(np.ptp(x[:, 1:2])), 1e-6)


def test_segment_applies_the_rules_at_the_scans_spacing_and_answers_quality() -> None:
    images = np.zeros((6, 32, 32, 3), np.uint8)
    images[1:4, 4:14, 4:14, 1] = 255  # 300 voxels
    predictor = Thresholding({**NO_POSTPROCESS, "min_volume_mm3": 1000.0})
    kaggle = predictor.segment(images)  # 300 voxels of 4.39 mm3: kept
    assert kaggle.masks.sum() == 300 and kaggle.quality > 0.9 and kaggle.review is False
    images[1:5, 18:30, 18:30, 1] = 255  # a second lesion, 576 voxels
    both = predictor.segment(images, spacing=(2, 1, 1))  # 600 mm3 removed, 1152 mm3 kept
    assert both.masks.sum() == 576 and both.masks[:, 4:14, 4:14].sum() == 0 and not both.network_mask_kept


def test_a_rule_never_empties_a_volume_the_network_found_tumour_in() -> None:
    images = np.zeros((6, 32, 32, 3), np.uint8)
    images[1:4, 4:14, 4:14, 1] = 255  # 300 voxels: 300 mm3 at 1 mm, under the 1000 mm3 rule
    predictor = Thresholding({**NO_POSTPROCESS, "min_volume_mm3": 1000.0})
    answer = predictor.segment(images, spacing=(1, 1, 1))
    assert answer.masks.sum() == 300 and answer.network_mask_kept  # the network's mask, not an empty one
    assert answer.review is True and answer.quality > 0.9  # flagged for a reader whatever the quality says
    assert predictor.predict(images, volume=True, spacing=(1, 1, 1)).sum() == 300
    masks, kept = postprocess_volume(np.zeros((6, 32, 32), np.uint8), {"min_volume_mm3": 1000.0})
    assert masks.sum() == 0 and not kept  # nothing found: nothing to keep, no review forced
