"""Fine-tuning's start: a run's network takes a bundle's weights (``--init``), checked against its config."""

from __future__ import annotations

import logging
from typing import Any

import torch

from core.bundle import load_bundle
from core.config import TrainConfig
from core.data.preprocessing import Preprocessing

log = logging.getLogger(__name__)


def load_init(model: torch.nn.Module, cfg: TrainConfig, preprocessing: Preprocessing) -> dict[str, Any]:
    """Load ``cfg.init``'s weights into ``model`` (same network; any image size: the nets are convolutional).

    Returns what the new bundle records of where it started. A bundle of another architecture, filter
    count or class count is an error naming the difference; other preprocessing is only logged.
    """
    start = load_bundle(cfg.init, "cpu")
    if "members" in start.config:
        raise ValueError(f"--init {cfg.init}: an ensemble bundle; fine-tune from one of its members instead")
    theirs = {"arch": start.config["arch"], "filters": int(start.config["model_args"]["filters"])}
    ours = {"arch": cfg.arch, "filters": cfg.filters}
    if theirs != ours:
        raise ValueError(f"--init {cfg.init}: bundle is {theirs}, this run is {ours}; they must match")
    try:
        model.load_state_dict(start.model.state_dict())
    except RuntimeError as exc:  # e.g. another number of classes
        raise ValueError(f"--init {cfg.init}: weights do not fit this network ({exc})") from exc
    for key, value in preprocessing.to_config().items():
        if start.config.get(key, {"type": "none"} if key == "crop" else None) != value:
            log.warning("--init %s: its %s %s differs from this run's %s", cfg.init, key, start.config.get(key), value)
    return {"source": str(cfg.init), "version": start.version,
            "image_size": start.config["image_size"], "val": start.metrics.get("val", {}).get("dsc_volume")}
