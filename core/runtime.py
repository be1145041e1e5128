"""Device selection, seeding and mixed precision shared by training, evaluation and inference."""

from __future__ import annotations

import contextlib
import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def assigned_gpus() -> str | None:
    """The GPUs a scheduler (Ray, Slurm, a user) handed this process, as CUDA_VISIBLE_DEVICES names them.

    None when nothing was assigned: unset, empty, or ``-1`` (the usual ways of hiding every GPU).
    """
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return None if value in ("", "-1", "NoDevFiles") else value


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable device or driver"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; anything else is passed to ``torch.device`` (and checked).

    ``auto`` in a process that was given GPUs (e.g. a Ray trial or replica with ``num_gpus``) but
    cannot use CUDA still runs, on the CPU, with a WARNING: a quiet CPU fallback would look like a
    very slow GPU run.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        gpus = assigned_gpus()
        if gpus is not None:
            log.warning(
                "this process was given GPU(s) CUDA_VISIBLE_DEVICES=%s, but CUDA is not available (%s): "
                "it trains and predicts on the CPU instead, far slower than on the GPU",
                gpus, _why_no_cuda(),
            )
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp16 gave NaN losses in the earlier study); a no-op on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
