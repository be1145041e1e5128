"""A volume answer's quality score: 0-1, higher = more trustworthy, from the model's own probabilities.

Both methods need nothing beyond the one forward pass every answer makes:
- ``soft_dice``: the Dice between the probability map and the final mask, 2 sum(p m) / (sum p + sum m),
  with p counted where it is at least ``CANDIDATE`` (a 1 mm scan has millions of background voxels whose
  faint probabilities would otherwise outweigh any tumour). Crisp, confident tumours score near 1;
  probability spread over uncertain tissue, or confident regions that post-processing removed, pull it
  down. A scan with no candidate tissue scores 1.
- ``confidence``: the mean probability inside the final mask (1 - the highest probability anywhere when
  the mask is empty), i.e. how sure the model is of what it reports.
Which one a bundle uses, and the score below which an answer says "review", are chosen by
cross-validation against per-patient Dice (``python -m tune study``) and recorded in its ``quality``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUALITY_METHODS = ("soft_dice", "confidence")
CANDIDATE = 0.25  # probability from which a voxel counts as candidate tumour in ``soft_dice``
_EMPTY_MASS = 1.0  # below this much candidate probability (in voxels) a scan counts as confidently empty


def foreground(probs: np.ndarray) -> np.ndarray:
    """(N,H,W) tumour probability, or 1 - background for multi-class (N,C,H,W) probabilities."""
    probs = np.asarray(probs, np.float32)
    return 1.0 - probs[:, 0] if probs.ndim == 4 else probs


def quality_score(probs: np.ndarray, masks: np.ndarray, method: str = "soft_dice") -> float:
    """The quality of one volume's final (N,H,W) masks given its probabilities (see the module doc)."""
    p = foreground(probs).astype(np.float64)
    m = np.asarray(masks) > 0
    if method == "soft_dice":
        mass, size = float(p[p >= CANDIDATE].sum()), float(m.sum())
        if mass + size < _EMPTY_MASS:
            return 1.0
        return float(np.clip(2.0 * float(p[m].sum()) / (mass + size), 0.0, 1.0))
    if method == "confidence":
        return float(p[m].mean()) if m.any() else float(1.0 - p.max(initial=0.0))
    raise ValueError(f"quality method {method!r} is not one of {', '.join(QUALITY_METHODS)}")


def assess(probs: np.ndarray, masks: np.ndarray, settings: dict[str, Any] | None) -> tuple[float | None, bool | None]:
    """(quality, review) under a bundle's ``quality`` settings: the score by its method (default
    ``soft_dice``, so every bundle answers one), and whether it is below the bundle's ``review_below``
    (None where no threshold was chosen)."""
    settings = settings or {}
    score = quality_score(probs, masks, str(settings.get("method", "soft_dice")))
    threshold = settings.get("review_below")
    return round(score, 4), (None if threshold is None else bool(score < float(threshold)))
