"""Training checkpoints without pickle: tensors in one safetensors file, everything else in JSON.

A checkpoint directory holds ``state.safetensors`` (model, best-epoch model, optimizer moments, RNG
states) and ``state.json`` (epoch, history, best, config, optimizer hyperparameters, scheduler,
Python RNG). Both are written atomically together by ``core.io.atomic_dir``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.io import atomic_dir, read_json, write_json

CHECKPOINT_FORMAT = "gliomaseg-checkpoint/1"
TENSORS, STATE = "state.safetensors", "state.json"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses shared or non-contiguous storage; a fresh contiguous CPU copy is always safe.
    return t.detach().to("cpu", copy=True).contiguous()


def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``optim/<param>/<key>``) and JSON scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = _cpu(value)
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state(gen: torch.Generator, cpu: torch.Tensor, cuda: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The run's random streams: its sampling/augmentation generator and its (private) torch states."""
    out = {"rng/torch_cpu": cpu, "rng/generator": gen.get_state()}
    if cuda is not None:
        out["rng/torch_cuda"] = cuda
    return out


def restore_rng(
    tensors: dict[str, torch.Tensor], gen: torch.Generator, py_state: list[Any] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Restore the generator and Python's RNG; return the torch CPU and CUDA states to adopt."""
    gen.set_state(tensors["rng/generator"])
    if py_state is not None:
        version, internal, gauss = py_state
        random.setstate((version, tuple(internal), gauss))
    return tensors["rng/torch_cpu"], tensors.get("rng/torch_cuda")


def write_checkpoint(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors and JSON metadata together; a crash leaves the previous checkpoint intact."""
    version, internal, gauss = random.getstate()
    meta = {"format": CHECKPOINT_FORMAT, **meta, "python_random": [version, list(internal), gauss]}
    with atomic_dir(directory) as tmp:
        save_file({k: _cpu(v) for k, v in tensors.items()}, str(tmp / TENSORS))
        write_json(tmp / STATE, meta)
    return Path(directory)


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    directory = Path(directory)
    for name in (TENSORS, STATE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing; not a training checkpoint")
    meta = read_json(directory / STATE)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory / STATE}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return load_file(str(directory / TENSORS)), meta


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
