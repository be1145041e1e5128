"""One typed config per job: each command line is built from its dataclasses (every field a flag, every flag
a field, the field's default the flag's), every dict source coerces one way, and a bad key reads the same
wherever it comes from."""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import re
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pytest

from core.config import (
    BATCH_SIZE,
    ConfigError,
    PredictorOptions,
    TrainConfig,
    add_arguments,
    flag,
    from_args,
    from_mapping,
)
from core.data.cli import DownloadOptions, EdaOptions, ExportNnunetOptions, PrepareOptions, SynthOptions
from core.data.prepare import SplitOptions
from core.evaluation.cli import EvaluateJob
from core.inference.cli import PredictJob
from core.inference.jobs import ScanFlags
from core.training.cli import TrainRun
from serve.app import LaunchOptions, ServeSettings
from serve.batch.run import BatchOptions
from serve.client import ClientOptions
from serve.demo import DemoOptions
from serve.demo import parser as demo_parser
from serve.onnx_export import OnnxExportOptions
from serve.sagemaker.cli import (
    DeploySagemakerOptions,
    ExportSagemakerOptions,
    InvokeSagemakerOptions,
    TransformSagemakerOptions,
)
from tune.cv import CVOptions
from tune.ensemble import EnsembleOptions
from tune.report import ReportOptions
from tune.search import SearchOptions
from tune.space import parse_space
from tune.study import StudyOptions

ROOT = Path(__file__).resolve().parents[1]


def _command(module: str, *names: str) -> argparse.ArgumentParser:
    """The command ``module``'s register() adds (its subcommand ``names``, for core data's)."""
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module).register(sub)
    parser = next(iter(sub.choices.values()))
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


_train = functools.partial(_command, "core.training.cli")
_serve_run = functools.partial(_command, "serve.app")
_serve_batch = functools.partial(_command, "serve.batch.cli")
_tune_run = functools.partial(_command, "tune.search")
_tune_cv = functools.partial(_command, "tune.cv")
_tune_study = functools.partial(_command, "tune.study")
_tune_ensemble = functools.partial(_command, "tune.ensemble")
_tune_report = functools.partial(_command, "tune.report")


def _sagemaker(name: str) -> argparse.ArgumentParser:
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module("serve.sagemaker.cli").register(sub)
    return sub.choices[name]


def _data(name: str) -> argparse.ArgumentParser:
    return _command("core.data.cli", name)


def _predictor() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser, PredictorOptions)
    return parser


# Each job's command line, the dataclasses it is built from, and the least a user must type.
JOBS = {
    "core train": (_train, (TrainRun, TrainConfig), ["--data", "d", "--out", "o"]),
    "serve run": (_serve_run, (ServeSettings, LaunchOptions), ["--bundle", "b"]),
    "serve batch": (_serve_batch, (BatchOptions,), ["--bundle", "b", "--src", "s", "--out", "o"]),
    "serve predict": (functools.partial(_command, "serve.client"), (ClientOptions,), ["a.tif", "--out", "o"]),
    "serve export-onnx": (functools.partial(_command, "serve.onnx_export"), (OnnxExportOptions,), ["--bundle", "b"]),
    "serve export-sagemaker": (functools.partial(_sagemaker, "export-sagemaker"), (ExportSagemakerOptions,),
                               ["--bundle", "b"]),
    "serve deploy-sagemaker": (functools.partial(_sagemaker, "deploy-sagemaker"), (DeploySagemakerOptions,),
                               ["--model-data", "s3://b/m.tar.gz", "--role", "r", "--endpoint", "e"]),
    "serve invoke-sagemaker": (functools.partial(_sagemaker, "invoke-sagemaker"), (InvokeSagemakerOptions,),
                               ["--endpoint", "e", "f.tif"]),
    "serve batch-transform-sagemaker": (functools.partial(_sagemaker, "batch-transform-sagemaker"),
                                        (TransformSagemakerOptions,),
                                        ["--model", "m", "--input", "s3://b/i/", "--output", "s3://b/o/"]),
    "serve demo": (demo_parser, (DemoOptions,), ["--bundle", "b", "--data", "d", "--out", "o"]),
    "tune run": (_tune_run, (SearchOptions,), ["--data", "d", "--name", "n"]),
    "tune cv": (_tune_cv, (CVOptions,), ["--data", "d"]),
    "tune ensemble": (_tune_ensemble, (EnsembleOptions,), ["runs/r"]),
    "tune report": (_tune_report, (ReportOptions,), ["s3://b/runs/r"]),
    "tune study": (_tune_study, (StudyOptions,), ["--src", "s", "--out", "o", "--config", "c"]),
    "core data synth": (functools.partial(_data, "synth"), (SynthOptions,), ["--out", "o"]),
    "core data prepare": (functools.partial(_data, "prepare"), (PrepareOptions, SplitOptions),
                          ["--src", "s", "--out", "o"]),
    "core data export-nnunet": (functools.partial(_data, "export-nnunet"), (ExportNnunetOptions, SplitOptions),
                                ["--src", "s", "--out", "Dataset501_X"]),
    "core data eda": (functools.partial(_data, "eda"), (EdaOptions,), ["p"]),
    "core data download": (functools.partial(_data, "download"), (DownloadOptions,), ["--out", "o"]),
    "core evaluate": (functools.partial(_command, "core.evaluation.cli"), (PredictorOptions, EvaluateJob),
                      ["--bundle", "b", "--data", "d", "--out", "o"]),
    "core predict": (functools.partial(_command, "core.inference.cli"), (PredictorOptions, PredictJob, ScanFlags),
                     ["--bundle", "b", "x.tif", "--out", "o"]),
    "core evaluate/predict": (_predictor, (PredictorOptions,), ["--bundle", "b"]),
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_field_has_a_flag_and_every_flag_a_field(job: str) -> None:
    make, models, _ = JOBS[job]
    dests = {a.dest for a in make()._actions if a.dest != "help"}
    names = {f.name for model in models for f in fields(model)}
    assert dests == names, f"{job}: flags without a field {sorted(dests - names)}, fields without a flag " \
                           f"{sorted(names - dests)}"


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_flag_left_out_takes_the_fields_default(job: str) -> None:
    make, models, required = JOBS[job]
    args = make().parse_args(required)
    for model in models:
        given = {f.name: getattr(from_args(args, model), f.name) for f in fields(model)}
        for f in fields(model):
            if flag(f) in required:  # typed (one of a required group, e.g. tune study's --src)
                continue
            if f.default is not MISSING:
                assert given[f.name] == f.default, f"{job}: --{f.name} defaults to {given[f.name]!r}"
            elif f.default_factory is not MISSING:
                assert given[f.name] == f.default_factory()


def test_flags_spelled_their_own_way_reach_their_fields() -> None:
    serve_args = _serve_run().parse_args(["--bundle", "b", "--split", "--max-batch-size", "8"])
    assert from_args(serve_args, ServeSettings).colocate is False
    assert from_args(serve_args, ServeSettings).ongoing() == 16
    tune_args = _tune_run().parse_args(["--data", "d", "--name", "n", "--set", "arch=lite", "--set", "lr=1e-3",
                                        "--quiet", "--gpus-per-trial", "0.5"])
    opts = from_args(tune_args, SearchOptions)
    assert opts.fixed == {"arch": "lite", "lr": 1e-3} and opts.verbose == 0 and opts.gpus_per_trial == 0.5
    cv = from_args(_tune_cv().parse_args(["--data", "d", "--from", "runs/x", "--set", "lr=1e-3", "--half"]), CVOptions)
    assert (cv.from_run, cv.fixed, cv.half, cv.storage) == (Path("runs/x"), {"lr": 1e-3}, True, Path("runs"))
    study = from_args(_tune_study().parse_args(["--data", "d", "--out", "o", "--folds-from", "f", "--set", "lr=1e-3"]),
                      StudyOptions)
    assert (study.src, study.data, study.folds_from, study.fixed) == (None, Path("d"), Path("f"), {"lr": 1e-3})
    batch = from_args(_serve_batch().parse_args(["--bundle", "b", "--src", "s", "--out", "o", "--no-progress",
                                                 "--sequences", "flair,t1", "--series", "flair=3", "--series",
                                                 "pre=1", "--spacing", "5,1,1"]), BatchOptions)
    assert (batch.progress, batch.sequences, batch.series, batch.spacing) == (
        False, ["flair", "t1"], {"flair": "3", "pre": "1"}, (5.0, 1.0, 1.0))
    ensemble = from_args(_tune_ensemble().parse_args(["runs/r", "--half", "--top", "5"]), EnsembleOptions)
    assert (ensemble.run, ensemble.half, ensemble.top) == (Path("runs/r"), True, 5)
    assert from_args(_tune_report().parse_args(["s3://b/runs/r"]), ReportOptions).run == "s3://b/runs/r"
    prepare = _data("prepare").parse_args(["--src", "s", "--out", "o", "--no-progress", "--val", "2"])
    assert from_args(prepare, PrepareOptions).progress is False and from_args(prepare, SplitOptions).val == 2.0
    predict = _command("core.inference.cli").parse_args(["--bundle", "b", "a.tif", "b", "--out", "o"])
    assert from_args(predict, PredictJob).inputs == [Path("a.tif"), Path("b")]
    onnx = _command("serve.onnx_export").parse_args(["--bundle", "b", "--no-verify", "--calibration-slices", "8"])
    assert (from_args(onnx, OnnxExportOptions).verify, from_args(onnx, OnnxExportOptions).calibration_slices) == (
        False, 8)
    client = from_args(_command("serve.client").parse_args(["a.tif", "b", "--out", "o", "--series", "3"]),
                       ClientOptions)
    assert (client.inputs, client.series) == (["a.tif", "b"], {"flair": "3"})
    train_args = _train().parse_args(["--data", "d", "--out", "o", "--no-augment", "--batch-size", "8"])
    assert from_args(train_args).augment is False and from_args(train_args).batch_size == 8
    with pytest.raises(ConfigError, match="^tune options: --search 'grid'"):
        from_mapping(SearchOptions, {"data": "d", "name": "n", "search": "grid"}, "tune options")


def test_one_of_a_group_must_be_given_and_only_one(capsys) -> None:
    """Fields naming one ``one_of`` group are a required mutually exclusive group (tune study's --src | --data)."""
    for argv in (["--out", "o"], ["--out", "o", "--src", "s", "--data", "d"]):
        with pytest.raises(SystemExit):
            _tune_study().parse_args(argv)
    assert "not allowed with argument --src" in capsys.readouterr().err


def test_sagemaker_flags_reach_their_fields(capsys) -> None:
    deploy = ["--model-data", "s3://b/m.tar.gz", "--role", "r", "--endpoint", "e"]
    opts = from_args(_sagemaker("deploy-sagemaker").parse_args(
        [*deploy, "--serverless", "--env", "A=1", "--env", "B=2", "--dry-run"]), DeploySagemakerOptions)
    assert (opts.serverless, opts.env, opts.dry_run, opts.instance_type) == (True, ["A=1", "B=2"], True,
                                                                           "ml.g4dn.xlarge")
    with pytest.raises(SystemExit):  # --instance-type and --serverless: at most one of the "kind" group
        _sagemaker("deploy-sagemaker").parse_args([*deploy, "--instance-type", "ml.m5.large", "--serverless"])
    assert "not allowed with argument" in capsys.readouterr().err
    invoke = from_args(_sagemaker("invoke-sagemaker").parse_args(["--endpoint", "e", "a.tif", "b.nii.gz", "--slices"]),
                       InvokeSagemakerOptions)
    assert (invoke.files, invoke.slices, invoke.accept) == (["a.tif", "b.nii.gz"], True, "application/json")


def test_inference_batch_size_is_one_default() -> None:
    from core.inference.predictor import Predictor
    from serve.edge import OnnxPredictor

    defaults = [inspect.signature(Predictor.__init__).parameters["batch_size"].default,
                inspect.signature(Predictor.from_bundle).parameters["batch_size"].default,
                inspect.signature(OnnxPredictor.__init__).parameters["batch_size"].default,
                BatchOptions.batch_size, ServeSettings.max_batch_size, PredictorOptions.batch_size]
    assert defaults == [BATCH_SIZE] * len(defaults)


def test_the_replica_is_told_its_derived_request_limit() -> None:
    """The ingress reports the limit ServeSettings derives (2 x the batch) rather than deriving it again."""
    from serve.app import build_app

    for settings, limit in ((ServeSettings(bundle="b", max_batch_size=8), 16),
                            (ServeSettings(bundle="b", max_batch_size=8, max_ongoing_requests=24), 24)):
        deployment = build_app(settings)._bound_deployment
        assert deployment.max_ongoing_requests == limit
        assert deployment.init_args[1]["max_ongoing_requests"] == limit  # the ingress's settings dict


# Each dict source: how it is called with one bad key, and the source its messages start with.
SOURCES = {
    "train": (lambda bad: TrainConfig.from_dict(bad), "training options", "filters"),
    "serve": (lambda bad: ServeSettings.from_dict({"bundle": "b", **bad}), "serve settings", "max_batch_size"),
    "space": (lambda bad: parse_space(bad, "space.yaml"), "space.yaml", "filters"),
    "tune": (lambda bad: from_mapping(SearchOptions, {"data": "d", "name": "n", **bad}, "tune options"),
             "tune options", "num_samples"),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_an_unknown_key_reads_the_same_everywhere(source: str) -> None:
    build, prefix, _ = SOURCES[source]
    with pytest.raises(ConfigError) as info:
        build({"colour": "red"})
    assert re.fullmatch(rf"{re.escape(prefix)}: unknown option\(s\) colour; known: [a-z_, ]+", str(info.value))


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_a_mistyped_value_names_the_key_and_the_type(source: str) -> None:
    build, prefix, int_key = SOURCES[source]
    with pytest.raises(ConfigError) as info:
        build({int_key: "many"})
    assert str(info.value) == f"{prefix}: {int_key}: expected int, got 'many'"


def test_values_from_text_numpy_and_yaml_are_coerced_by_the_field_type() -> None:
    cfg = TrainConfig.from_dict({"lr": "1e-3", "filters": np.int64(16), "dropout": np.float32(0.25),
                                 "batch_size": 8.0, "augment": "no", "amp": 0, "arch": "lite"})
    assert (cfg.lr, cfg.filters, cfg.dropout, cfg.batch_size, cfg.augment, cfg.amp) == (1e-3, 16, 0.25, 8, False,
                                                                                       False)
    assert type(cfg.filters) is int and type(cfg.lr) is float
    for bad in ({"filters": 3.5}, {"filters": True}, {"augment": "maybe"}, {"arch": ["unet"]}):
        with pytest.raises(ConfigError, match=rf"^training options: {next(iter(bad))}: expected"):
            TrainConfig.from_dict(bad)
    settings = ServeSettings.from_dict({"bundle": "b", "replicas": 3, "gpus_per_replica": "0.25", "token_env": None,
                                        "colocate": "false", "max_ongoing_requests": "24"})
    assert (settings.replicas, settings.gpus_per_replica, settings.token_env, settings.colocate) == ("3", 0.25, None,
                                                                                                    False)
    assert settings.ongoing() == 24
    with pytest.raises(ConfigError, match="^serve settings: missing option"):
        ServeSettings.from_dict({})
    with pytest.raises(ConfigError, match="^training options: arch: expected one of unet"):
        TrainConfig.from_dict({"arch": "resnet9000"})
    with pytest.raises(ConfigError, match=r"^serve settings: replicas must be a positive integer"):
        ServeSettings.from_dict({"bundle": "b", "replicas": "0"})


def test_written_bundles_hyperparameters_read_back_unchanged() -> None:
    """The bundle format outlives the code: each member's recorded hyperparameters are a valid TrainConfig
    that writes back the same values."""
    config = json.loads((ROOT / "pretrained/lgg/config.json").read_text())
    members = config["hyperparameters"]["members"]
    assert members
    for recorded in members:
        again = TrainConfig.from_dict(recorded).to_dict()
        assert {k: again[k] for k in recorded} == recorded
        assert all(type(again[k]) is type(v) for k, v in recorded.items())
