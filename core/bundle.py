"""The bundle: what a trained model is. A directory of model.safetensors + config.json + metrics.json.

Loading never unpickles: weights come from safetensors, config and metrics from JSON. config.json records
a sha256 per other file (``files``) and loading checks them; a bundle may live at ``s3://bucket/prefix``
(see ``core.inference.bundle_uri``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.inference.bundle_uri import (
    CONFIG,
    FILES_KEY,
    METRICS,
    WEIGHTS,
    hash_files,
    is_remote,
    listed_files,
    resolve_bundle,
    verify_files,
)
from core.inference.ensemble_net import build_ensemble, load_ensemble_weights
from core.io import atomic_dir, read_json, write_json
from core.training.models import build_model

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "gliomaseg-bundle/1"


@dataclass
class Bundle:
    model: torch.nn.Module
    config: dict[str, Any]
    metrics: dict[str, Any]
    path: Path

    @property
    def version(self) -> str:
        return str(self.config.get("version", "unknown"))


def make_bundle_config(
    train_config: dict[str, Any],
    *,
    in_channels: int,
    class_names: list[str],
    image_size: tuple[int, int],
    postprocess: dict[str, Any],
    tta: str = "none",
    split_hash: str = "",
    name: str = "gliomaseg",
    preprocessing: dict[str, Any] | None = None,
    init: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to rebuild, feed and post-process the model, beside the weights."""
    out_channels = 1 if len(class_names) <= 2 else len(class_names)
    return {
        "format": BUNDLE_FORMAT,
        "name": name,
        "version": f"{name}-{time.strftime('%Y%m%dT%H%M%S')}",
        "arch": train_config["arch"],
        "model_args": {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "filters": int(train_config["filters"]),
            "dropout": float(train_config["dropout"]),
        },
        "image_size": [int(image_size[0]), int(image_size[1])],
        "channels": ["pre-contrast", "flair", "post-contrast"][:in_channels],
        # normalisation and crop (core.data.preprocessing.Preprocessing.to_config); /255, uncropped by default
        "normalisation": {"type": "scale", "scale": 1.0 / 255.0},
        "crop": {"type": "none"},
        **(preprocessing or {}),
        "threshold": float(train_config.get("threshold", 0.5)),
        "postprocess": dict(postprocess),
        "tta": tta,
        "class_names": list(class_names),
        "hyperparameters": dict(train_config),
        "data": {"split_hash": split_hash},
        **({"init": dict(init)} if init else {}),  # the bundle whose weights this training started from
    }


def ensemble_scale(config: dict[str, Any]) -> float | None:
    """The /255 an ensemble undoes to round a resized input to uint8 levels; None for standardised input."""
    norm = config.get("normalisation", {})
    return float(norm["scale"]) if norm.get("type", "scale") == "scale" else None


def build_from_config(config: dict[str, Any]) -> torch.nn.Module:
    """The network a bundle config describes (weights not loaded): one architecture, or an ensemble."""
    args = config["model_args"]
    if "members" in config:
        multiclass = int(args["out_channels"]) > 1
        return build_ensemble(config["members"], multiclass, ensemble_scale(config))
    return build_model(config["arch"], args["in_channels"], args["out_channels"], args["filters"], args["dropout"])


def save_bundle(
    path: str | os.PathLike,
    model: torch.nn.Module,
    config: dict[str, Any],
    metrics: dict[str, Any],
    half: bool = False,
) -> Path:
    """Write a bundle atomically (a crash leaves any previous bundle at ``path`` intact)."""
    module = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    config = {**config, "weights_dtype": "float16" if half else "float32"}
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": BUNDLE_FORMAT})
        write_json(tmp / METRICS, metrics)
        # Written last: it records the digest of every other file (a copy or download is checked on load).
        write_json(tmp / CONFIG, {**config, FILES_KEY: hash_files(tmp)})
    return Path(path)


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle from a directory or ``s3://bucket/prefix``; errors name the missing, changed or bad file."""
    remote = is_remote(path)
    path = resolve_bundle(path)  # a remote bundle is fetched (or reused from the node's cache) and checked
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path / CONFIG}: missing; a bundle needs {WEIGHTS} and {CONFIG}")
    try:
        config = read_json(path / CONFIG)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / CONFIG}: not valid JSON ({exc})") from exc
    if config.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path / CONFIG}: format {config.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    files = listed_files(config, str(path))
    if files is None:  # written before hashes were recorded: one network (ensembles came with the hashes)
        if not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"{path / WEIGHTS}: missing; a bundle needs {WEIGHTS} and {CONFIG}")
        log.info("%s: no file hashes in %s (written before they were recorded); loading it unchecked", path, CONFIG)
    elif not remote:  # resolve_bundle has just checked a fetched copy; verify_files names a missing file
        verify_files(path, files)
    metrics = read_json(path / METRICS) if (path / METRICS).is_file() else {}
    model = build_from_config(config)
    if "members" in config:  # an ensemble keeps one weights file per member
        load_ensemble_weights(model, path, config)  # type: ignore[arg-type]
    else:
        state = load_file(str(path / WEIGHTS))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.to(device).eval()
    return Bundle(model=model, config=config, metrics=metrics, path=path)
