"""The ensemble network: several networks, each at its own input size, as one module whose output
activates to the mean of their probabilities.

The module takes a batch at the ensemble's input size (the largest member's), resizes it to each
member's size (``core.networks.resample``), runs the member, resizes its
probabilities back and averages them. It returns log-probabilities (softmax) or logits of the mean
probability (sigmoid), so everything that consumes a network's logits (Predictor, ONNX export, TTA,
thresholds, post-processing) takes an ensemble unchanged. Ensemble bundles are written and loaded by
``core.bundle`` and built from member bundles by ``core.training.ensemble``.

A *routed* ensemble mixes full members with FLAIR-only ones (trained with FLAIR in every channel): a
slice whose other channels are exact copies of FLAIR (a scan without pre/post-contrast, filled the
way the Kaggle set fills a missing sequence) goes to the FLAIR-only members, every other slice to the
full ones. Copies stay exact through per-channel standardisation, so the test is equality.
"""

from __future__ import annotations

import torch

from core.networks.resample import resize_matrix

EPS = 1e-6  # keeps logit(p) finite; probabilities this close to 0 or 1 threshold the same either way


class Ensemble(torch.nn.Module):
    """Members (``nn.Module``) with their input sizes; ``forward`` gives logits of mean probabilities."""

    def __init__(
        self, members: list[torch.nn.Module], sizes: list[tuple[int, int]], multiclass: bool,
        scale: float | None = 1 / 255, flair_only: list[bool] | None = None, flair_channel: int = 0,
    ) -> None:
        super().__init__()
        if not members or len(members) != len(sizes):
            raise ValueError(f"an ensemble needs one size per member, got {len(members)} members, {len(sizes)} sizes")
        self.flair_only = [bool(f) for f in flair_only] if flair_only is not None else [False] * len(members)
        if len(self.flair_only) != len(members):
            raise ValueError(f"flair_only needs one entry per member, got {len(self.flair_only)} for {len(members)}")
        self.flair_channel = int(flair_channel)  # the input channel that holds FLAIR (core.formats.volume)
        # Each route's members: FLAIR-only ones take the copies, full ones the rest.
        indices = range(len(members))
        self._routes = ([i for i in indices if self.flair_only[i]], [i for i in indices if not self.flair_only[i]])
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

    @property
    def routed(self) -> bool:
        """Whether slices are routed: some members, not all, are FLAIR-only."""
        return any(self.flair_only) and not all(self.flair_only)

    def flair_copies(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) bool: rows whose every other channel equals FLAIR exactly (pre/post-contrast missing)."""
        f = self.flair_channel
        return (x == x[:, f : f + 1]).flatten(1).all(1)

    def _mean(self, x: torch.Tensor, members: list[int]) -> torch.Tensor:
        """The mean probability of the listed members on x (at the input size)."""
        total = None
        for i in members:
            xm = x
            if self.sizes[i] != self.input_size and self.scale is None:  # standardised input: resized as is
                xm = self._resize(x, i, "down")
            elif self.sizes[i] != self.input_size:  # pixel values rounded to uint8 levels, as a member's split was
                # x holds uint8 levels / 255: round them back exactly first, or a level's float error flips
                # the rounding of a resized pixel that lies on a half level.
                levels = (x / self.scale).round()
                xm = self._resize(levels, i, "down").round().clamp(0, 255) / (1.0 / self.scale)
            logits = self.members[i](xm).float()
            probs = logits.softmax(1) if self.multiclass else logits.sigmoid()
            if self.sizes[i] != self.input_size:
                probs = self._resize(probs, i, "up")
            total = probs if total is None else total + probs
        assert total is not None
        return total / len(members)

    def _logits(self, mean: torch.Tensor) -> torch.Tensor:
        mean = mean.clamp(EPS, 1 - EPS)
        return mean.log() if self.multiclass else torch.logit(mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"ensemble input must be {self.input_size}, got {tuple(x.shape[2:])}")
        if not self.routed:
            return self._logits(self._mean(x, list(range(len(self.members)))))
        flair, full = self._routes
        copies = self.flair_copies(x)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            # A traced graph cannot branch on the data: both groups run, each row keeps its own.
            return self._logits(torch.where(copies[:, None, None, None], self._mean(x, flair), self._mean(x, full)))
        out = None
        for members, rows in ((flair, copies), (full, ~copies)):
            if bool(rows.any()):  # each row through its own group only
                part = self._mean(x[rows], members)
                out = part.new_empty((x.shape[0], *part.shape[1:])) if out is None else out
                out[rows] = part
        assert out is not None
        return self._logits(out)

