"""Out-of-fold probabilities: every patient of a CV pool predicted by the fold model that never saw it.

A pass is a way the product can be asked (a whole volume, one slice at a time, a scan whose pre- and
post-contrast are FLAIR copies) under one TTA mode. Passes are predicted on first use and kept as
float16 .npy in a cache folder, so choices can be re-run without predicting again.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from core.data.arrays import SplitArrays
from core.evaluation.choices import with_flair

# What every fold's training fixes, so that no weight, TTA or rule is chosen on the patients it then
# predicts out of fold: the last epoch's weights, no early stopping, nothing chosen on the fold's val.
OUT_OF_FOLD_TRAINING = {"keep": "last", "patience": 0, "tta": "none", "postprocess": "none"}

# name -> (volume scope, TTA, pre/post-contrast replaced by FLAIR)
PASSES: dict[str, tuple[bool, str, bool]] = {
    f"{kind}_{tta}": (kind != "slice", tta, kind == "flair")
    for kind in ("volume", "slice", "flair") for tta in ("none", "flip")
}


class OutOfFold:
    """``oof(name)``: the pool's (N,H,W) float16 probabilities of a pass, each row by its own fold's model."""

    def __init__(self, fold_bundles: list[str | os.PathLike], folds: list[list[str]], pool: SplitArrays,
                 cache: str | os.PathLike, device: str = "cpu") -> None:
        if len(fold_bundles) != len(folds):
            raise ValueError(f"{len(fold_bundles)} fold bundles for {len(folds)} folds")
        self.fold_bundles, self.folds, self.pool = [Path(b) for b in fold_bundles], folds, pool
        self.cache, self.device = Path(cache), device
        self.patients = np.asarray(pool.patients).astype(str)
        covered = sorted(p for f in folds for p in f)
        if covered != sorted(np.unique(self.patients).tolist()):
            raise ValueError("the folds do not cover the pool's patients exactly once")

    def __call__(self, name: str) -> np.ndarray:
        if name not in PASSES:
            raise ValueError(f"unknown out-of-fold pass {name!r}; known: {', '.join(PASSES)}")
        path = self.cache / f"{name}.npy"
        if path.is_file():
            return np.load(path, allow_pickle=False)
        from core.inference.predictor import Predictor

        volume, tta, flair = PASSES[name]
        out = np.zeros(np.shape(self.pool.masks), np.float16)
        for bundle, fold in zip(self.fold_bundles, self.folds, strict=True):
            predictor = Predictor.from_bundle(bundle, self.device)
            predictor.tta = tta
            rows = np.flatnonzero(np.isin(self.patients, fold))
            images = np.ascontiguousarray(np.asarray(self.pool.images[rows]).transpose(0, 2, 3, 1))
            probs = predictor.predict_proba(with_flair(images) if flair else images,
                                            patients=self.patients[rows] if volume else None)
            out[rows] = np.stack(probs).astype(np.float16)
        self.cache.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".tmp.npy"), out)
        os.replace(path.with_suffix(".tmp.npy"), path)  # a killed run leaves no half-written pass
        return out


class MeanOutOfFold:
    """The out-of-fold probabilities of an ensemble of CV studies on the same folds (fold k's model of each,
    nnU-Net's ensemble of configurations): each pass the mean of the studies' own passes, as the ensemble
    bundle averages its members' probabilities."""

    def __init__(self, parts: list[OutOfFold]) -> None:
        if not parts:
            raise ValueError("an ensemble of no studies")
        if any(sorted(map(sorted, p.folds)) != sorted(map(sorted, parts[0].folds)) for p in parts):
            raise ValueError("the studies' folds differ: an ensemble of studies needs the same folds")
        self.parts = parts

    def __call__(self, name: str) -> np.ndarray:
        total = np.zeros(np.shape(self.parts[0].pool.masks), np.float32)
        for part in self.parts:  # one at a time: a pass of the whole pool is hundreds of MB
            total += part(name)
        return (total / len(self.parts)).astype(np.float16)
