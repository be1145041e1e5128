"""Ensembles: several networks, each at its own input size, as one module whose output activates to the
mean of their probabilities.

The module takes a batch at the ensemble's input size (the largest member's), resizes it to each
member's size (``core.inference.resize``, pixel values rounded as a trained split is stored), runs the
member, resizes its probabilities back and averages them. It returns log-probabilities (softmax) or
logits of the mean probability (sigmoid), so everything that consumes a network's logits (Predictor,
ONNX export, TTA, thresholds, post-processing) takes an ensemble unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core.data.arrays import SplitArrays
from core.inference.selection import ValSplit, choose_inference, choose_threshold
from core.inference.slices import resize_matrix
from core.io import atomic_dir, write_json
from core.models import build_model

EPS = 1e-6  # keeps logit(p) finite; probabilities this close to 0 or 1 threshold the same either way


class Ensemble(torch.nn.Module):
    """Members (``nn.Module``) with their input sizes; ``forward`` gives logits of mean probabilities."""

    def __init__(
        self, members: list[torch.nn.Module], sizes: list[tuple[int, int]], multiclass: bool, scale: float = 1 / 255
    ) -> None:
        super().__init__()
        if not members or len(members) != len(sizes):
            raise ValueError(f"an ensemble needs one size per member, got {len(members)} members, {len(sizes)} sizes")
        self.members = torch.nn.ModuleList(members)
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        self.multiclass = multiclass
        self.scale = scale
        # The resize matrices between the input size and each member's, as (non-saved) buffers: constants
        # in an exported ONNX graph, and on the module's device.
        size = self.input_size
        for i, member_size in enumerate(self.sizes):
            for axis in (0, 1):
                down = resize_matrix(size[axis], member_size[axis])
                self.register_buffer(f"down{i}_{axis}", torch.from_numpy(down), persistent=False)
                self.register_buffer(f"up{i}_{axis}", torch.from_numpy(resize_matrix(member_size[axis], size[axis])),
                                     persistent=False)

    @property
    def input_size(self) -> tuple[int, int]:
        """The largest member's size: inputs arrive at it, so no member sees an upsampled slice."""
        return max(self.sizes, key=lambda s: s[0] * s[1])

    def _resize(self, x: torch.Tensor, i: int, kind: str) -> torch.Tensor:
        h, w = getattr(self, f"{kind}{i}_0"), getattr(self, f"{kind}{i}_1")
        return torch.einsum("oh,nchw,pw->ncop", h, x, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"ensemble input must be {self.input_size}, got {tuple(x.shape[2:])}")
        total = None
        for i, member in enumerate(self.members):
            xm = x
            if self.sizes[i] != self.input_size:  # pixel values rounded to uint8 levels, as a member's split was
                xm = self._resize(x / self.scale, i, "down").round().clamp(0, 255) * self.scale
            logits = member(xm).float()
            probs = logits.softmax(1) if self.multiclass else logits.sigmoid()
            if self.sizes[i] != self.input_size:
                probs = self._resize(probs, i, "up")
            total = probs if total is None else total + probs
        mean = (total / len(self.members)).clamp(EPS, 1 - EPS)
        return mean.log() if self.multiclass else torch.logit(mean)


def member_config(config: dict[str, Any]) -> dict[str, Any]:
    """What an ensemble bundle records per member, from that member's own bundle config."""
    return {"arch": config["arch"], "model_args": dict(config["model_args"]),
            "image_size": [int(v) for v in config["image_size"]]}


def build_ensemble(members: list[dict[str, Any]], multiclass: bool, scale: float = 1 / 255) -> Ensemble:
    """An Ensemble of freshly built members from their ``member_config`` records (weights not loaded)."""
    nets = [build_model(m["arch"], m["model_args"]["in_channels"], m["model_args"]["out_channels"],
                        m["model_args"]["filters"], m["model_args"]["dropout"]) for m in members]
    return Ensemble(nets, [tuple(m["image_size"]) for m in members], multiclass, scale)


def member_file(index: int) -> str:
    """A member's weights file inside an ensemble bundle."""
    return f"members/{index}.safetensors"


def ensemble_config(
    configs: list[dict[str, Any]], name: str, sources: list[str] | None = None
) -> dict[str, Any]:
    """An ensemble bundle's config.json from its members' bundle configs (same classes and channels).

    Its ``image_size`` is the largest member's; threshold, TTA and post-processing start plain and are
    chosen on val for the ensemble as a whole.
    """
    first = configs[0]
    for c in configs[1:]:
        for key in ("class_names", "channels", "normalisation"):
            if c.get(key) != first.get(key):
                raise ValueError(f"ensemble members differ in {key}: {first.get(key)!r} vs {c.get(key)!r}")
    members = [{**member_config(c), "weights": member_file(i), "version": c.get("version"),
                **({"source": sources[i]} if sources else {})} for i, c in enumerate(configs)]
    size = max((tuple(m["image_size"]) for m in members), key=lambda s: s[0] * s[1])
    return {
        **{k: first[k] for k in ("format", "channels", "normalisation", "class_names")},
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
    from core.bundle import CONFIG, METRICS
    from core.inference.bundle_uri import FILES_KEY, hash_files

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


def load_ensemble_weights(model: Ensemble, path: Path, config: dict[str, Any]) -> None:
    """Load each member's weights file (named in ``config['members']``) into ``model``."""
    for member, record in zip(model.members, config["members"], strict=True):
        file = path / record["weights"]
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing; the ensemble bundle's config.json lists it")
        state = load_file(str(file))
        member.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


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
    from core.bundle import Bundle, load_bundle
    from core.inference.predictor import Predictor

    loaded = [load_bundle(b, device) for b in bundles]
    config = ensemble_config([b.config for b in loaded], name, sources)
    multiclass = int(config["model_args"]["out_channels"]) > 1
    model = Ensemble([b.model for b in loaded], [tuple(c["image_size"]) for c in config["members"]], multiclass,
                     float(config["normalisation"]["scale"])).to(device).eval()
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
        probs[mode] = np.stack(predictor.predict_proba(images))
    threshold, threshold_search = 0.5, {}
    if multiclass:
        masks = {mode: p.argmax(1).astype(np.uint8) for mode, p in probs.items()}
    else:
        threshold, threshold_search = choose_threshold(probs["none"], split)
        masks = {mode: (p > threshold).astype(np.uint8) for mode, p in probs.items()}
    chosen_tta, settings, entries = choose_inference(masks["none"], masks.get("flip"), split, postprocess)
    config.update(threshold=threshold, tta=chosen_tta, postprocess=settings)
    metrics = {
        **entries, "threshold_search": threshold_search, "members": members,
        "selection": "members, threshold, TTA and post-processing were all selected on this val split",
        **(extra_metrics or {}),
    }
    return save_ensemble_bundle(out, model.cpu(), config, metrics, half)
