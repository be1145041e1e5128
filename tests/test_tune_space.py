"""Search-space YAML: each value form, defaults replaced key by key, clear errors."""

from __future__ import annotations

import optuna.distributions as od
import pytest

from tune.search import parse_sets
from tune.space import DEFAULT_SPACE, load_space, parse_space


def write(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_default_space_is_the_earlier_study_plus_arch_and_loss_weighting():
    space = load_space()
    s = space.searched
    assert s["dropout"] == od.FloatDistribution(0.0, 0.5)
    assert s["lr"] == od.FloatDistribution(1e-6, 0.1, log=True)
    assert s["batch_size"].choices == (16, 32)
    assert s["filters"].choices == (8, 16, 32)
    assert {"unet", "attention_unet"} <= set(s["arch"].choices)
    assert "lambda_focal" in s
    assert space.constants == {}


def test_yaml_forms_replace_the_defaults(tmp_path):
    path = write(tmp_path, """
arch: [unet, attention_unet]
filters: [8, 16]
lr: {loguniform: [1.0e-4, 1e-2]}
dropout: {uniform: [0.0, 0.3]}
batch_size: [16]
patience: {int: [2, 5]}
loss: dicece
""")
    space = load_space(path)
    s = space.searched
    assert s["arch"].choices == ("unet", "attention_unet")
    assert s["filters"].choices == (8, 16)
    assert s["lr"] == od.FloatDistribution(1e-4, 1e-2, log=True)  # "1e-2" (a YAML string) is read as a number
    assert s["dropout"] == od.FloatDistribution(0.0, 0.3)
    assert s["patience"] == od.IntDistribution(2, 5)
    assert space.constants == {"batch_size": 16, "loss": "dicece"}  # a one-item list is a constant
    assert "lambda_focal" in s  # keys the file does not name keep their defaults
    assert set(s) | set(space.constants) == set(DEFAULT_SPACE) | {"patience", "loss"}


def test_overrides_win_over_the_file(tmp_path):
    space = load_space(write(tmp_path, "arch: [unet, segresnet]\n"), {"arch": "lite", "filters": 8})
    assert space.constants["arch"] == "lite" and space.constants["filters"] == 8
    assert "arch" not in space.searched


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("archh: [unet]\n", "unknown option(s) archh"),
        ("arch: [unet, resnet9000]\n", "arch"),
        ("lr: {loguniform: [0, 0.1]}\n", "loguniform needs low > 0"),
        ("lr: {uniform: [0.1, 0.01]}\n", "low < high"),
        ("lr: {normal: [0, 1]}\n", "expected one of"),
        ("filters: {uniform: [8, 32]}\n", "integer option"),
        ("dropout: {uniform: [0.0, 1.0]}\n", "dropout"),
        ("epochs: 10\n", "--max-epochs"),
        ("arch: []\n", "empty list"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_spaces_name_the_problem(tmp_path, text, message):
    with pytest.raises(ValueError, match="space.yaml") as info:
        load_space(write(tmp_path, text))
    assert message in str(info.value)


def test_missing_file_and_set_parsing(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_space(tmp_path / "nope.yaml")
    assert parse_sets(["arch=lite", "lr=1e-3", "batch-size=[8, 16]", "augment=false"]) == {
        "arch": "lite", "lr": 1e-3, "batch_size": [8, 16], "augment": False,
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_sets(["arch"])
    with pytest.raises(ValueError, match="unknown option"):
        parse_space({"nope": 1})


def test_stop_reasons_and_nan_objectives():
    from tune.objective import finite
    from tune.results import stop_reason

    assert stop_reason({"stop_reason": "completed"}, None, "asha") == "completed"
    assert stop_reason({"stop_reason": "patience"}, None, "asha") == "early-stopped by patience"
    assert stop_reason({"stop_reason": "running"}, None, "asha") == "early-stopped by ASHA"
    assert stop_reason({"stop_reason": "running"}, None, "median") == "early-stopped by median"
    assert stop_reason({"stop_reason": "diverged"}, None, "asha").startswith("diverged")
    assert stop_reason({}, RuntimeError("boom"), "asha") == "error: RuntimeError"
    assert stop_reason({}, None, "asha") == "not started"
    assert finite("dsc_volume", float("nan")) == 0.0 and finite("fp_slice_rate", float("nan")) == 1.0
    assert finite("dsc_volume", 0.7) == 0.7


def test_init_bundles_are_checked_and_made_absolute(tmp_path, monkeypatch):
    from bundle_factory import make_random_bundle

    bundle = make_random_bundle(tmp_path / "start")
    monkeypatch.chdir(tmp_path)  # a relative path, as typed: trials run in their own directories
    space = parse_space({"init": ["start"], "arch": "lite"})
    assert space.constants["init"] == str(bundle.resolve())
    assert parse_space({"init": "s3://bucket/bundle"}).constants["init"] == "s3://bucket/bundle"
    with pytest.raises(ValueError, match="init: nothere is not a bundle"):
        parse_space({"init": "nothere"})
