"""Ensemble bundles: several bundles' networks as one bundle (``core.inference.ensemble_net``), with
threshold, TTA and post-processing chosen on val for the ensemble as a whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save_file

from core.bundle import CONFIG, METRICS, Bundle, ensemble_scale, load_bundle
from core.data.arrays import SplitArrays
from core.inference.bundle_uri import FILES_KEY, hash_files
from core.inference.ensemble_net import Ensemble, member_file
from core.inference.predictor import Predictor
from core.inference.selection import ValSplit, choose_inference, choose_one_slice, choose_threshold
from core.io import atomic_dir, write_json


def member_config(config: dict[str, Any]) -> dict[str, Any]:
    """What an ensemble bundle records per member, from that member's own bundle config."""
    return {"arch": config["arch"], "model_args": dict(config["model_args"]),
            "image_size": [int(v) for v in config["image_size"]]}


def ensemble_config(
    configs: list[dict[str, Any]], name: str, sources: list[str] | None = None
) -> dict[str, Any]:
    """An ensemble bundle's config.json from its members' bundle configs (same classes and channels).

    Its ``image_size`` is the largest member's; threshold, TTA and post-processing start plain and are
    chosen on val for the ensemble as a whole.
    """
    first = configs[0]
    for c in configs[1:]:
        for key in ("class_names", "channels", "normalisation", "crop"):
            if c.get(key) != first.get(key):
                raise ValueError(f"ensemble members differ in {key}: {first.get(key)!r} vs {c.get(key)!r}")
    members = [{**member_config(c), "weights": member_file(i), "version": c.get("version"),
                **({"source": sources[i]} if sources else {})} for i, c in enumerate(configs)]
    size = max((tuple(m["image_size"]) for m in members), key=lambda s: s[0] * s[1])
    return {
        **{k: first[k] for k in ("format", "channels", "normalisation", "class_names")},
        "crop": first.get("crop", {"type": "none"}),
        "name": name, "arch": "ensemble", "members": members,
        "model_args": {"in_channels": first["model_args"]["in_channels"],
                       "out_channels": first["model_args"]["out_channels"]},
        "image_size": list(size), "threshold": 0.5, "tta": "none", "postprocess": {},
        "hyperparameters": {"members": [c.get("hyperparameters", {}) for c in configs]},
        "data": first.get("data", {}),
    }


def save_ensemble_bundle(
    path: str | os.PathLike, model: Ensemble, config: dict[str, Any], metrics: dict[str, Any], half: bool = False
) -> Path:
    """Write an ensemble bundle atomically: one weights file per member (``members/<i>.safetensors``)."""
    config = {**config, "weights_dtype": "float16" if half else "float32"}
    with atomic_dir(path) as tmp:
        for i, member in enumerate(model.members):
            state = {k: v.detach().cpu().contiguous() for k, v in member.state_dict().items()}
            if half:
                state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
            (tmp / member_file(i)).parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(tmp / member_file(i)), metadata={"format": config["format"]})
        write_json(tmp / METRICS, metrics)
        # Written last: it records the digest of every other file, members included (checked on load).
        write_json(tmp / CONFIG, {**config, FILES_KEY: hash_files(tmp)})
    return Path(path)


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
    model = Ensemble([b.model for b in loaded], [tuple(c["image_size"]) for c in config["members"]], multiclass,
                     ensemble_scale(config)).to(device).eval()
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
