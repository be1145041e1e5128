"""One configuration object that flows from the command line into a trial and into the bundle.

Field names are the `python -m core train` option names (``--batch-size`` <-> ``batch_size``), and the
keys of a tune search-space YAML, so a value means the same thing everywhere it appears.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

ARCHS = ("unet", "attention_unet", "segresnet", "swin_unetr", "lite")
LOSSES = ("dicefocal", "dicece")
METRICS = ("dsc_volume", "dice_tumour", "dice_all", "iou", "fp_slice_rate")
SCOPES = ("slice", "patient")  # per-slice or per-volume preprocessing (core.data.preprocessing)


@dataclass
class TrainConfig:
    """Hyperparameters and run settings of one training run (one tune trial)."""

    arch: str = field(default="unet", metadata={"choices": ARCHS, "help": "network from core.networks.models"})
    filters: int = field(default=32, metadata={"help": "first-block filters f (f,2f,4f,... per level)"})
    dropout: float = 0.02
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = 1e-4
    batch_size: int = 16
    epochs: int = 50
    warmup_epochs: int = field(default=1, metadata={"help": "linear warm-up before the cosine decay"})
    loss: str = field(default="dicefocal", metadata={"choices": LOSSES})
    lambda_dice: float = field(default=1.0, metadata={"help": "weight of the Dice term"})
    lambda_focal: float = field(default=1.0, metadata={"help": "weight of the focal (or CE) term"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 disables"})
    patience: int = field(default=10, metadata={"help": "early stopping after N epochs without gain; 0 off"})
    oversample: float = field(
        default=0.0, metadata={"help": "share of each batch drawn from tumour slices; 0 = natural rate"}
    )
    hard_negatives: float = field(
        default=0.0, metadata={"help": "share of each batch drawn from the tumour-free slices the model "
                                       "called most tumour in the last epoch (hard negatives); 0 = off"}
    )
    image_size: int = field(
        default=0, metadata={"help": "training resolution (square, a multiple of 32); 0 = the data's own size"}
    )
    normalisation: str = field(
        default="scale", metadata={"choices": ("scale", *SCOPES),
                                   "help": "scale: /255; slice or patient: [p10, p99] clip + z-score over the brain"},
    )
    brain_crop: str = field(
        default="none", metadata={"choices": ("none", *SCOPES),
                                  "help": "crop to the brain's box (per slice or per patient), square, resized"},
    )
    missing_sequence: float = field(
        default=0.0, metadata={"help": "chance per training slice that pre- and/or post-contrast become FLAIR"},
    )
    sequences: str = field(
        default="all", metadata={"choices": ("all", "flair"),
                                 "help": "flair: FLAIR in every channel (for scans lacking pre/post-contrast)"},
    )
    context: int = field(
        default=0, metadata={"help": "2.5D: neighbouring slices each side given as extra input channels (0-3)"},
    )
    context_sequences: str = field(
        default="flair", metadata={"choices": ("flair", "all"), "help": "which sequences of each neighbour"},
    )
    init: str = field(default="", metadata={"help": "start from this bundle's weights (fine-tuning; any image size)"})
    augment: bool = True
    crop: int = field(default=0, metadata={"help": "random crop size during training; 0 = no crop"})
    noise: float = field(default=0.05, metadata={"help": "std of Gaussian noise augmentation (0-1 scale)"})
    postprocess: str = field(
        default="auto",
        metadata={"choices": ("auto", "none"), "help": "auto: keep post-processing only where it helps"},
    )
    tta: str = field(
        default="auto",
        metadata={"choices": ("auto", "none"), "help": "auto: keep left-right flip TTA only where it helps val"},
    )
    threshold: float = 0.5
    metric: str = field(default="dsc_volume", metadata={"choices": METRICS, "help": "selects the best epoch"})
    keep: str = field(
        default="best", metadata={"choices": ("best", "last"),
                                  "help": "weights kept: the best epoch on val, or the last epoch (val chooses "
                                          "nothing: out-of-fold predictions stay unbiased)"},
    )
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    workers: int = field(default=1, metadata={"help": ">1 runs Ray Train data-parallel workers"})
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on GPU (loss stays fp32)"})
    eval_batch_size: int = 64

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls(**{k: _coerce(cls, k, v) for k, v in values.items()})
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        positive = ("filters", "batch_size", "epochs", "lr", "eval_batch_size", "workers")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_size < 0 or self.image_size % 32:
            raise ValueError(f"image_size must be 0 (the data's own) or a multiple of 32, got {self.image_size}")
        for name in ("oversample", "hard_negatives", "missing_sequence"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.oversample + self.hard_negatives > 1.0:
            raise ValueError(f"oversample + hard_negatives must be at most 1 (the whole batch), got "
                             f"{self.oversample} + {self.hard_negatives}")


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Cast YAML/CLI values to the field's type (e.g. Optuna gives numpy floats, YAML gives '1e-3')."""
    kind = {f.name: f.type for f in fields(cls)}[name]
    if kind in ("bool", bool):
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if kind in ("int", int):
        return int(value)
    if kind in ("float", float):
        return float(value)
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """Add one ``--option`` per config field, defaulting to the dataclass defaults."""
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            caster = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(
                flag, type=caster, default=f.default, choices=f.metadata.get("choices"), help=help_text
            )


def from_args(args: argparse.Namespace, cls: type = TrainConfig) -> TrainConfig:
    return cls.from_dict({f.name: getattr(args, f.name) for f in fields(cls)})


def add_predictor_arguments(parser: argparse.ArgumentParser) -> None:
    """--bundle, --device, --batch-size: what Predictor.from_args reads (core evaluate and core predict)."""
    # A string, not a Path: Path("s3://b/p") would collapse the "//" and lose the scheme.
    parser.add_argument("--bundle", required=True, type=str,
                        help="bundle directory (e.g. RUN/best) or s3://bucket/prefix (fetched once per node, checked)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")
