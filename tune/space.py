"""The search space: the default (the earlier study's, plus architecture and loss weighting) and YAML.

A space maps `python -m core train` option names to one of: a list (categorical choice), a constant,
``{uniform: [a, b]}``, ``{loguniform: [a, b]}`` or ``{int: [a, b]}``. Keys a YAML file names replace
the defaults; the rest of the defaults stay. Searched keys become Optuna distributions (so the study
in optuna.db is readable by Optuna's own tools); constants go to every trial unchanged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna.distributions as od
import yaml

from core.config import ConfigError, TrainConfig, check_keys, field_types

# The earlier study's space (dropout, lr, batch size, filters) plus architecture and loss weighting.
# lambda_dice stays 1 and lambda_focal varies, so the search is over their ratio (the scale is lr's job).
DEFAULT_SPACE: dict[str, Any] = {
    "arch": ["unet", "attention_unet", "segresnet"],
    "filters": [8, 16, 32],
    "dropout": {"uniform": [0.0, 0.5]},
    "lr": {"loguniform": [1.0e-6, 0.1]},
    "batch_size": [16, 32],
    "lambda_focal": {"loguniform": [0.1, 10.0]},
}
FORMS = ("uniform", "loguniform", "int")
# Owned by the search itself (--max-epochs, one process per trial), so a space may not set them.
RESERVED = {"epochs": "--max-epochs", "workers": "one process per trial (workers=1)"}


@dataclass(frozen=True)
class Space:
    """Searched keys as Optuna distributions, and the constants every trial shares."""

    searched: dict[str, od.BaseDistribution]
    constants: dict[str, Any]

    def describe(self) -> dict[str, str]:
        out = {k: _describe(d) for k, d in self.searched.items()}
        out.update({k: f"= {v!r}" for k, v in self.constants.items()})
        return out


def load_space(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Space:
    """The default space, with the keys of the YAML file at ``path`` and then ``overrides`` replacing it."""
    spec = dict(DEFAULT_SPACE)
    if path is not None:
        spec.update(read_yaml(path))
    spec.update(overrides or {})
    return parse_space(spec, source=str(path) if path else "search space")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such search-space file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def parse_space(spec: dict[str, Any], source: str = "search space") -> Space:
    """Validate ``spec`` against TrainConfig; every error is a ConfigError naming the key (and the file)."""
    check_keys(TrainConfig, spec, source)
    kinds = field_types(TrainConfig)
    for key, why in RESERVED.items():
        if key in spec:
            raise ConfigError(f"{source}: {key}: cannot be searched or fixed in a space; it is set by {why}")
    searched: dict[str, od.BaseDistribution] = {}
    constants: dict[str, Any] = {}
    for key, value in spec.items():
        where = f"{source}: {key}"
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{where}: an empty list has nothing to choose from")
            choices = [_checked(key, v, source) for v in value]
            if len(set(choices)) == 1:
                constants[key] = choices[0]  # one choice is a constant (Optuna would record a 1-way param)
            else:
                searched[key] = od.CategoricalDistribution(list(dict.fromkeys(choices)))
        elif isinstance(value, dict):
            searched[key] = _range(key, value, kinds[key], source)
        else:
            constants[key] = _checked(key, value, source)
    # The combination of constants must itself be a valid config (e.g. oversample + hard_negatives).
    TrainConfig.from_dict(constants, source)
    return Space(searched, constants)


def _checked(key: str, value: Any, source: str) -> Any:
    """One value as TrainConfig would hold it, coerced and validated by TrainConfig itself."""
    value = getattr(TrainConfig.from_dict({key: value}, source), key)
    return _bundle_path(value, f"{source}: {key}") if key == "init" and value else value


def _bundle_path(value: str, where: str) -> str:
    """An --init bundle as every trial can find it: absolute (trials run in their own directories), and
    there (a typo fails here, not in every trial); s3:// URIs pass as they are."""
    if "://" in value:
        return value
    path = Path(value).resolve()
    if not (path / "config.json").is_file():
        raise ConfigError(f"{where}: {value} is not a bundle (no config.json there)")
    return str(path)


def _range(key: str, value: dict[str, Any], kind: Any, source: str) -> od.BaseDistribution:
    where = f"{source}: {key}"
    if len(value) != 1 or next(iter(value)) not in FORMS:
        raise ConfigError(f"{where}: expected one of {{{', '.join(f + ': [a, b]' for f in FORMS)}}}, got {value!r}")
    form, bounds = next(iter(value.items()))
    if not (isinstance(bounds, list) and len(bounds) == 2):
        raise ConfigError(f"{where}: {form} needs [low, high], got {bounds!r}")
    try:
        low, high = (float(b) for b in bounds)  # YAML reads 1e-3 (no dot) as a string
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {form} bounds must be numbers, got {bounds!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{where}: {form} needs low < high, got {bounds!r}")
    is_int = kind is int
    if form == "int" or is_int:
        if form != "int":
            raise ConfigError(f"{where}: an integer option takes a list or {{int: [a, b]}}, not {form}")
        if not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"{where}: int bounds must be integers, got {bounds!r}")
        dist: od.BaseDistribution = od.IntDistribution(int(low), int(high))
    else:
        if kind is not float:
            raise ConfigError(f"{where}: {key} is not numeric; use a list of choices")
        if form == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {bounds!r}")
        dist = od.FloatDistribution(low, high, log=form == "loguniform")
    for probe in (low, high):  # the bounds themselves must be legal values (e.g. dropout < 1)
        _checked(key, int(probe) if is_int else probe, source)
    return dist


def _describe(dist: od.BaseDistribution) -> str:
    if isinstance(dist, od.CategoricalDistribution):
        return "choice " + repr(list(dist.choices))
    if isinstance(dist, od.IntDistribution):
        return f"int [{dist.low}, {dist.high}]"
    assert isinstance(dist, od.FloatDistribution)
    return f"{'loguniform' if dist.log else 'uniform'} [{dist.low:g}, {dist.high:g}]"
