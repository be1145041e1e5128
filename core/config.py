"""One configuration object that flows from the command line into a trial and into the bundle.

Field names are the `python -m core train` option names (``--batch-size`` <-> ``batch_size``), and the
keys of a tune search-space YAML, so a value means the same thing everywhere it appears. The parser
below (``from_mapping``, ``add_arguments``) also builds the other jobs' settings dataclasses (serve's,
tune's), so every entry point coerces and reports a bad key one way.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

ARCHS = ("unet", "attention_unet", "segresnet", "swin_unetr", "lite")
LOSSES = ("dicefocal", "dicece")
METRICS = ("dsc_volume", "dice_tumour", "dice_all", "iou", "fp_slice_rate")
SCOPES = ("slice", "patient")  # per-slice or per-volume preprocessing (core.data.preprocessing)
BATCH_SIZE = 32  # slices per forward pass at inference: the Predictor's, serve's and serve batch's default
T = TypeVar("T")


@dataclass
class TrainConfig:
    """Hyperparameters and run settings of one training run (one tune trial)."""

    arch: str = field(default="unet", metadata={"choices": ARCHS, "help": "network (core.networks.models.MODELS)"})
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
    def from_dict(cls, values: dict[str, Any], source: str = "training options") -> TrainConfig:
        """Build from a dict (a YAML space, a trial's config, a bundle's hyperparameters); missing keys take
        their defaults, unknown or mistyped ones are a ConfigError (see ``from_mapping``)."""
        return from_mapping(cls, values, source)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        check_choices(self)
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


@dataclass
class PredictorOptions:
    """What ``Predictor.from_args`` reads: the ``core evaluate`` and ``core predict`` options."""

    # A string, not a Path: Path("s3://b/p") would collapse the "//" and lose the scheme.
    bundle: str = field(metadata={"help": "bundle directory (e.g. RUN/best) or s3://bucket/prefix (fetched once "
                                          "per node, checked)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    batch_size: int = field(default=BATCH_SIZE, metadata={"help": "slices per forward pass"})


# ---- one parser for every config dataclass --------------------------------------------------------------
# Each job's settings are a dataclass whose fields carry their default, and in ``metadata`` their help text,
# choices and (rarely) a flag spelling. Dicts (YAML, `serve run key=value`, deploy configs, bundles' and
# trials' configs) go through ``from_mapping``, command lines through ``add_arguments``/``from_args``: one
# coercion, one error format, one place for each default.
class ConfigError(ValueError):
    """A config value that cannot be used: ``<source>: <problem naming the key>``."""


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def field_types(cls: type) -> dict[str, type]:
    """Each field's type, resolved (the annotations are strings under ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _optional(kind: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (types.UnionType, typing.Union) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return (inner[0] if len(inner) == 1 else kind), True
    return kind, False


def meta(text: str, **more: Any) -> dict[str, Any]:
    """A field's metadata: its help text, and optionally ``choices``, ``flag`` (another spelling),
    ``false_flag`` (another spelling of a bool's ``--no-x``), ``argument`` (more ``add_argument`` keywords),
    ``from_arg`` (turns the parsed flag into the field's value), ``positional`` (typed without a flag), and
    ``one_of`` or ``at_most_one_of`` (a group name: exactly one, or at most one, of the fields naming that
    group may be given)."""
    return {"help": text, **more}


def coerce(kind: Any, value: Any, key: str, source: str) -> Any:
    """``value`` as a field of type ``kind`` holds it: strings from the command line or ``key=value``, numpy
    numbers from Optuna and YAML's ``1e-3`` (a string) are converted; anything else is a ConfigError."""
    kind, nullable = _optional(kind)
    if value is None and nullable:
        return None
    problem = f"{source}: {key}: expected {getattr(kind, '__name__', kind)}{' or None' if nullable else ''}, " \
              f"got {value!r}"
    container = typing.get_origin(kind)
    if container in (dict, list, tuple):  # structured values (tune's --set pairs, a spacing) pass as they are
        if isinstance(value, container):
            return value
        raise ConfigError(problem)
    if kind is bool:
        if isinstance(value, bool | numbers.Integral) and value in (0, 1):
            return bool(value)
        if getattr(getattr(value, "dtype", None), "kind", None) == "b":  # numpy's bool
            return bool(value)
        text = str(value).strip().lower() if isinstance(value, str) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ConfigError(problem)
    if isinstance(value, bool) and kind in (int, float):
        raise ConfigError(problem)  # True is an int to Python, never a filter count
    if kind is int:
        try:
            if isinstance(value, str):
                return int(value.strip())
        except ValueError:
            pass
        try:
            number = float(value) if isinstance(value, str) else value  # "1e3", 16.0
            if isinstance(number, numbers.Real) and float(number).is_integer():
                return int(number)
        except (TypeError, ValueError, OverflowError):
            pass
        raise ConfigError(problem)
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(problem) from None
    if isinstance(value, dict | list | tuple | set) or value is None:
        raise ConfigError(problem)
    return Path(str(value)) if kind is Path else str(value)


def check_keys(cls: type, keys: Iterable[str], source: str) -> None:
    """Unknown keys are a ConfigError naming them and the known ones."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def check_choices(obj: Any) -> None:
    """Each field whose metadata lists ``choices`` holds one of them."""
    for f in fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise ValueError(f"{f.name}: expected one of {', '.join(map(str, choices))}, "
                             f"got {getattr(obj, f.name)!r}")


def from_mapping(cls: type[T], values: Mapping[str, Any], source: str) -> T:
    """An instance of the dataclass ``cls`` from ``values``: unknown keys, missing required ones, values of
    the wrong type and values its ``validate()`` refuses are each a ConfigError starting with ``source``."""
    check_keys(cls, values, source)
    kinds = field_types(cls)
    missing = sorted(f.name for f in fields(cls) if _required(f) and f.name not in values)
    if missing:
        raise ConfigError(f"{source}: missing option(s) {', '.join(missing)}")
    obj = cls(**{k: coerce(kinds[k], v, k, source) for k, v in values.items()})
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    return obj


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def flag(f: dataclasses.Field) -> str:
    """The command-line spelling of a field: ``--batch-size`` for ``batch_size`` unless metadata says."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type = TrainConfig) -> None:
    """One option per field of the dataclass ``cls``, with its default, type, choices and help (a positional
    argument where its metadata says); a bool is ``--x/--no-x`` (metadata ``false_flag`` adds another
    spelling of ``--no-x``); a field with no default is a required option; fields naming the same
    ``one_of``/``at_most_one_of`` group are mutually exclusive."""
    kinds = field_types(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(cls):
        kind, _ = _optional(kinds[f.name])
        help_text = f.metadata.get("help", "")
        target = _group(parser, groups, f)
        if f.metadata.get("positional"):  # typed without a flag (e.g. tune report RUN)
            target.add_argument(f.name, type=_caster(kind), help=help_text, **f.metadata.get("argument", {}))
            continue
        if "argument" in f.metadata:  # spelled its own way (e.g. tune's --set, --quiet)
            target.add_argument(flag(f), dest=f.name, help=help_text,
                                **{"default": f.default, **f.metadata["argument"]})
            continue
        if _required(f):
            target.add_argument(flag(f), dest=f.name, required=True, type=_caster(kind), help=help_text)
            continue
        if f.default not in (None, ""):  # "(default: None)" tells the reader nothing
            help_text += f" (default: {f.default})"
        if kind is bool:
            target.add_argument(flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
            if "false_flag" in f.metadata:
                target.add_argument(f.metadata["false_flag"], dest=f.name, action="store_false",
                                    help=f"the same as --no-{flag(f)[2:]}")
        else:
            target.add_argument(flag(f), dest=f.name, type=_caster(kind), default=f.default,
                                choices=f.metadata.get("choices"), help=help_text)


def _group(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
           groups: dict[str, argparse._MutuallyExclusiveGroup],
           f: dataclasses.Field) -> argparse.ArgumentParser | argparse._ArgumentGroup:
    """Where the field's option goes: ``parser``, or the mutually exclusive group its metadata names (made on
    first use, required for ``one_of``)."""
    for key, required in (("one_of", True), ("at_most_one_of", False)):
        if key in f.metadata:
            name = f.metadata[key]
            if name not in groups:
                groups[name] = parser.add_mutually_exclusive_group(required=required)
            return groups[name]
    return parser


def _caster(kind: Any) -> Any:
    """What argparse turns each value into (each item, for a ``list[X]`` field with ``nargs``)."""
    if typing.get_origin(kind) is list:
        return _caster(typing.get_args(kind)[0])
    return kind if kind in (int, float, Path) else str


def from_args(args: argparse.Namespace, cls: type[T] = TrainConfig) -> T:  # type: ignore[assignment]
    """The dataclass ``cls`` from the options ``add_arguments(parser, cls)`` added."""
    values = {f.name: f.metadata.get("from_arg", _same)(getattr(args, f.name)) for f in fields(cls)}
    return from_mapping(cls, values, "command line")


def _same(value: Any) -> Any:
    return value


def add_command(sub: argparse._SubParsersAction, name: str, run: Callable[[argparse.Namespace], Any],
                *options: type, doc: str | None = None, **parser: Any) -> argparse.ArgumentParser:
    """A subcommand whose flags are the fields of each ``options`` dataclass in turn, run by ``run``: ``doc`` (a
    module docstring) is its description as written, ``parser`` keywords (help, description) go to add_parser."""
    if doc is not None:
        parser.update(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p = sub.add_parser(name, **parser)
    for cls in options:
        add_arguments(p, cls)
    p.set_defaults(func=run)
    return p
