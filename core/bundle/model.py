"""A bundle's network: its config built into a module (through core.networks), written and loaded.

Loading never unpickles: weights come from safetensors, config and metrics from JSON. config.json records
a sha256 per other file (``files``) and loading checks them; a bundle may live at ``s3://bucket/prefix``
(``core.bundle.files``). An ensemble bundle keeps one weights file per member (``members/<i>.safetensors``).
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

from core.bundle.files import (
    CONFIG,
    FILES_KEY,
    METRICS,
    WEIGHTS,
    hash_files,
    listed_files,
    member_file,
    resolve_bundle,
    verify_files,
)
from core.formats.volume import SEQUENCES
from core.io import atomic_dir, is_remote, read_json, write_json
from core.networks.ensemble import Ensemble
from core.networks.models import build_model

log = logging.getLogger(__name__)
FLAIR_CHANNEL = SEQUENCES.index("flair")  # where a routed ensemble looks for copies of FLAIR

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


def ensemble_of(members: list[torch.nn.Module], config: dict[str, Any]) -> Ensemble:
    """The Ensemble an ensemble config describes, of these member networks (in its ``members`` order)."""
    records = config["members"]
    return Ensemble(members, [tuple(m["image_size"]) for m in records], int(config["model_args"]["out_channels"]) > 1,
                    ensemble_scale(config), [m.get("sequences") == "flair" for m in records], FLAIR_CHANNEL)


def build_from_config(config: dict[str, Any]) -> torch.nn.Module:
    """The network a bundle config describes (weights not loaded): one architecture, or an ensemble."""
    if "members" in config:
        return ensemble_of([build_from_config(m) for m in config["members"]], config)
    args = config["model_args"]
    return build_model(config["arch"], args["in_channels"], args["out_channels"], args["filters"], args["dropout"])


def member_config(config: dict[str, Any]) -> dict[str, Any]:
    """What an ensemble bundle records per member, from that member's own bundle config."""
    return {"arch": config["arch"], "model_args": dict(config["model_args"]),
            "image_size": [int(v) for v in config["image_size"]],
            **({"sequences": "flair"} if config.get("sequences") == "flair" else {})}  # routes a mixed ensemble


def ensemble_config(
    configs: list[dict[str, Any]], name: str, sources: list[str] | None = None
) -> dict[str, Any]:
    """An ensemble bundle's config.json from its members' bundle configs (same classes and channels).

    Its ``image_size`` is the largest member's; threshold, TTA and post-processing start plain and are
    chosen on val for the ensemble as a whole (core.training.ensemble).
    """
    first = configs[0]
    for c in configs[1:]:
        for key in ("class_names", "channels", "normalisation", "crop", "context"):
            if c.get(key) != first.get(key):
                raise ValueError(f"ensemble members differ in {key}: {first.get(key)!r} vs {c.get(key)!r}")
    members = [{**member_config(c), "weights": member_file(i), "version": c.get("version"),
                **({"source": sources[i]} if sources else {})} for i, c in enumerate(configs)]
    if first.get("context") and len({m.get("sequences", "all") for m in members}) > 1:
        raise ValueError("a routed ensemble (FLAIR-only and full members) cannot take 2.5D context: its route "
                         "tests that every channel is a copy of FLAIR, which neighbouring slices are not")
    size = max((tuple(m["image_size"]) for m in members), key=lambda s: s[0] * s[1])
    return {
        **{k: first[k] for k in ("format", "channels", "normalisation", "class_names")},
        "crop": first.get("crop", {"type": "none"}),
        **({"context": first["context"]} if first.get("context") else {}),
        "name": name, "version": f"{name}-{time.strftime('%Y%m%dT%H%M%S')}", "arch": "ensemble", "members": members,
        "model_args": {"in_channels": first["model_args"]["in_channels"],
                       "out_channels": first["model_args"]["out_channels"]},
        "image_size": list(size), "threshold": 0.5, "tta": "none", "postprocess": {},
        "hyperparameters": {"members": [c.get("hyperparameters", {}) for c in configs]},
        "data": first.get("data", {}),
        # All FLAIR-only: the input itself becomes FLAIR everywhere; a mix routes inside the network.
        **({"sequences": "flair"} if all(m.get("sequences") == "flair" for m in members) else {}),
    }


def _write(path: str | os.PathLike, modules: dict[str, torch.nn.Module], config: dict[str, Any],
           metrics: dict[str, Any], half: bool) -> Path:
    """Each module's weights to its file, metrics.json, then config.json with every file's digest."""
    config = {**config, "weights_dtype": "float16" if half else "float32"}
    with atomic_dir(path) as tmp:
        for name, module in modules.items():
            state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            if half:
                state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(tmp / name), metadata={"format": BUNDLE_FORMAT})
        write_json(tmp / METRICS, metrics)
        # Written last: it records the digest of every other file (a copy or download is checked on load).
        write_json(tmp / CONFIG, {**config, FILES_KEY: hash_files(tmp)})
    return Path(path)


def save_bundle(
    path: str | os.PathLike,
    model: torch.nn.Module,
    config: dict[str, Any],
    metrics: dict[str, Any],
    half: bool = False,
) -> Path:
    """Write a bundle atomically (a crash leaves any previous bundle at ``path`` intact)."""
    return _write(path, {WEIGHTS: getattr(model, "module", model)}, config, metrics, half)  # DDP unwrapped


def save_ensemble_bundle(
    path: str | os.PathLike, model: Ensemble, config: dict[str, Any], metrics: dict[str, Any], half: bool = False
) -> Path:
    """Write an ensemble bundle atomically: one weights file per member (``members/<i>.safetensors``)."""
    return _write(path, {member_file(i): m for i, m in enumerate(model.members)}, config, metrics, half)


def _load_weights(module: torch.nn.Module, file: Path) -> None:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; the bundle's config.json lists it")
    state = load_file(str(file))
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


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
    if files is None:  # a bundle format without hashes: one network (every ensemble bundle records its hashes)
        if not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"{path / WEIGHTS}: missing; a bundle needs {WEIGHTS} and {CONFIG}")
        log.info("%s: no file hashes in %s; loading it unchecked", path, CONFIG)
    elif not remote:  # resolve_bundle has just checked a fetched copy; verify_files names a missing file
        verify_files(path, files)
    metrics = read_json(path / METRICS) if (path / METRICS).is_file() else {}
    model = build_from_config(config)
    if "members" in config:  # an ensemble keeps one weights file per member
        for member, record in zip(model.members, config["members"], strict=True):  # type: ignore[arg-type]
            _load_weights(member, path / record["weights"])
    else:
        _load_weights(model, path / WEIGHTS)
    model.to(device).eval()
    return Bundle(model=model, config=config, metrics=metrics, path=path)
