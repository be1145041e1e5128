"""The ensemble network: several networks, each at its own input size, as one module whose output
activates to the mean of their probabilities.

The module takes a batch at the ensemble's input size (the largest member's), resizes it to each
member's size (``core.networks.resample``), runs the member, resizes its
probabilities back and averages them. It returns log-probabilities (softmax) or logits of the mean
probability (sigmoid), so everything that consumes a network's logits (Predictor, ONNX export, TTA,
thresholds, post-processing) takes an ensemble unchanged. Ensemble bundles are written and loaded by
``core.bundle`` and built from member bundles by ``core.training.ensemble``.
"""

from __future__ import annotations

from typing import Any

import torch

from core.networks.models import build_model
from core.networks.resample import resize_matrix

EPS = 1e-6  # keeps logit(p) finite; probabilities this close to 0 or 1 threshold the same either way


class Ensemble(torch.nn.Module):
    """Members (``nn.Module``) with their input sizes; ``forward`` gives logits of mean probabilities."""

    def __init__(
        self, members: list[torch.nn.Module], sizes: list[tuple[int, int]], multiclass: bool,
        scale: float | None = 1 / 255,
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
            if self.sizes[i] != self.input_size and self.scale is None:  # standardised input: resized as is
                xm = self._resize(x, i, "down")
            elif self.sizes[i] != self.input_size:  # pixel values rounded to uint8 levels, as a member's split was
                # x holds uint8 levels / 255: round them back exactly first, or a level's float error flips
                # the rounding of a resized pixel that lies on a half level.
                levels = (x / self.scale).round()
                xm = self._resize(levels, i, "down").round().clamp(0, 255) / (1.0 / self.scale)
            logits = member(xm).float()
            probs = logits.softmax(1) if self.multiclass else logits.sigmoid()
            if self.sizes[i] != self.input_size:
                probs = self._resize(probs, i, "up")
            total = probs if total is None else total + probs
        mean = (total / len(self.members)).clamp(EPS, 1 - EPS)
        return mean.log() if self.multiclass else torch.logit(mean)


def build_ensemble(members: list[dict[str, Any]], multiclass: bool, scale: float | None = 1 / 255) -> Ensemble:
    """An Ensemble of freshly built members from their ``member_config`` records (weights not loaded)."""
    nets = [build_model(m["arch"], m["model_args"]["in_channels"], m["model_args"]["out_channels"],
                        m["model_args"]["filters"], m["model_args"]["dropout"]) for m in members]
    return Ensemble(nets, [tuple(m["image_size"]) for m in members], multiclass, scale)
