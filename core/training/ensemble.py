"""Ensemble bundles built from member bundles: their networks as one (``core.networks.ensemble``), with
threshold, TTA and post-processing chosen on val for the ensemble as a whole (core.evaluation.selection).
Writing and loading them is ``core.bundle``'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import Bundle, ensemble_config, ensemble_of, load_bundle, save_ensemble_bundle
from core.data.arrays import SplitArrays
from core.evaluation.selection import ValSplit, choose_inference, choose_one_slice, choose_threshold
from core.inference.predictor import Predictor


def build_ensemble_bundle(
    bundles: list[str | os.PathLike], val: SplitArrays | None, class_names: list[str], out: str | os.PathLike,
    name: str = "gliomaseg-ensemble", sources: list[str] | None = None, device: str = "cpu",
    tta: bool = True, postprocess: bool = True, half: bool = False, extra_metrics: dict[str, Any] | None = None,
    fixed: dict[str, Any] | None = None,
) -> Path:
    """One bundle from member bundles, probabilities averaged, with threshold, TTA and post-processing
    chosen on ``val`` for the ensemble as a whole (each kept only where it raises val dsc_volume).

    Without ``val`` (e.g. cross-validation folds, where no patient is held out from every member) nothing
    is chosen: ``fixed`` gives the threshold, TTA and post-processing.
    """
    loaded = [load_bundle(b, device) for b in bundles]
    config = ensemble_config([b.config for b in loaded], name, sources)
    multiclass = int(config["model_args"]["out_channels"]) > 1
    model = ensemble_of([b.model for b in loaded], config).to(device).eval()
    members = [{"source": (sources or [str(b) for b in bundles])[i], "val": b.metrics.get("val")}
               for i, b in enumerate(loaded)]
    if val is None:
        config.update(fixed or {})
        metrics = {"members": members, "selection": "no val split: threshold, TTA and post-processing fixed"}
        return save_ensemble_bundle(out, model.cpu(), config, {**metrics, **(extra_metrics or {})}, half)
    split = ValSplit(np.asarray(val.masks), np.asarray(val.patients), np.asarray(val.slices), class_names)
    images = np.asarray(val.images).transpose(0, 2, 3, 1)
    predictor = Predictor(Bundle(model=model, config=config, metrics={}, path=Path(out)), device)
    probs = {}
    for mode in ("none", "flip") if tta else ("none",):
        predictor.tta = mode
        probs[mode] = np.stack(predictor.predict_proba(images, patients=split.patients))
    threshold, threshold_search = 0.5, {}
    if multiclass:
        masks = {mode: p.argmax(1).astype(np.uint8) for mode, p in probs.items()}
    else:
        threshold, threshold_search = choose_threshold(probs["none"], split)
        masks = {mode: (p > threshold).astype(np.uint8) for mode, p in probs.items()}
    chosen_tta, settings, entries = choose_inference(masks["none"], masks.get("flip"), split, postprocess)
    config.update(threshold=threshold, tta=chosen_tta, postprocess=settings)
    if "val_one_slice" in entries:  # re-chosen and scored on the real one-slice path, not volume masks
        predictor.tta, predictor.threshold = chosen_tta, threshold
        area, entries["val_one_slice"] = choose_one_slice(predictor, val, split)
        config["postprocess"] = {**settings, "min_area_slice_mm2": float(area)}
    metrics = {
        **entries, "threshold_search": threshold_search, "members": members,
        "selection": "members, threshold, TTA and post-processing were all selected on this val split",
        **(extra_metrics or {}),
    }
    return save_ensemble_bundle(out, model.cpu(), config, metrics, half)
