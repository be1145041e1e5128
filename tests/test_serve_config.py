"""Serve without a running app: the builder's settings and their validation, `serve run`'s refusals,
`serve build`'s deploy config, and the client's file collection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import make_random_bundle
from ray import serve

from core.cli import dispatch
from serve.app import ServeSettings, app_builder, build_app
from serve.client import collect, safe_name

MY_COMMANDS = ("serve.app", "serve.client")  # serve/__main__ also lists issue 6's modules


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("serve_config") / "bundle")


def test_client_names_and_collection(synth_src: Path) -> None:
    assert safe_name("../../etc/passwd") == "etc_passwd" and safe_name("...") == "input"
    assert "/" not in safe_name("a/b\\c") and len(safe_name("x" * 500)) == 100
    jobs = collect([synth_src])  # kaggle_3m: one volume per patient, masks excluded
    assert len(jobs) == 12 and all(len(j.files) == 16 for j in jobs)
    assert not any(f.stem.endswith("_mask") for j in jobs for f in j.files)
    assert [int(f.stem.rsplit("_", 1)[1]) for f in jobs[0].files] == list(range(1, 17))
    with pytest.raises(FileNotFoundError):
        collect(["/no/such/path"])


def bound_deployments(app: serve.Application) -> dict[str, serve.Deployment]:
    """The deployments an application binds, by name (the ingress and those bound into its arguments)."""
    out, todo = {}, [app]
    while todo:
        deployment = todo.pop()._bound_deployment
        out[deployment.name] = deployment
        bound = (*deployment.init_args, *deployment.init_kwargs.values())
        todo += [a for a in bound if isinstance(a, serve.Application)]
    return out


def test_builder_settings_and_cli_validation(ray_session, bundle: Path, tmp_path: Path) -> None:
    from serve.app import resolve_resources

    with pytest.raises(ValueError, match="no GPU"):
        resolve_resources(ServeSettings(bundle="b"), 0.5)
    cpu = resolve_resources(ServeSettings(bundle="b", replicas="auto"), None)
    assert cpu.gpus_per_replica == 0 and cpu.max_replicas == int(ray_session.cluster_resources()["CPU"] // 2)
    app = app_builder({"bundle": str(bundle), "max_batch_size": "8", "replicas": "auto", "batch_wait_ms": "2"})
    model = bound_deployments(app)["SegmentModel"]
    assert model.max_ongoing_requests == 2 * 8  # room for two batches of 8 per replica
    assert set(bound_deployments(app)) == {"SegmentModel"}  # colocated: the model answers HTTP, one hop
    split = bound_deployments(build_app(ServeSettings(bundle=str(bundle), max_batch_size=8, colocate=False,
                                                      max_ongoing_requests=24)))
    assert set(split) == {"Ingress", "SegmentModel"} and split["SegmentModel"].max_ongoing_requests == 24
    fixed = build_app(ServeSettings(bundle=str(bundle), replicas="3"))
    assert bound_deployments(fixed)["SegmentModel"].num_replicas == 3
    auto = ServeSettings(bundle="b", replicas="auto", max_replicas=4, max_batch_size=8).autoscaling()
    assert auto["max_replicas"] == 4 and auto["min_replicas"] == 1 and auto["target_ongoing_requests"] == 8
    for bad in ({"bundle": str(bundle), "colour": "red"}, {"bundle": str(bundle), "replicas": "0"},
                {"bundle": str(tmp_path)}):
        with pytest.raises((ValueError, FileNotFoundError)):
            app_builder(bad)
    run = ["run", "--bundle"]
    assert dispatch("python -m serve", "", MY_COMMANDS, [*run, str(tmp_path)]) == 2
    os.environ.pop("GLIOMASEG_UNSET_TOKEN", None)
    argv = [*run, str(bundle), "--token-env", "GLIOMASEG_UNSET_TOKEN"]
    assert dispatch("python -m serve", "", MY_COMMANDS, argv) == 2


def test_serve_build_writes_a_deploy_config(bundle: Path, tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "serve"
    env = {**os.environ, "GLIOMASEG_BUNDLE": str(bundle)}
    out = tmp_path / "serve.yaml"
    subprocess.run([str(cli), "build", "serve.app:app", "-o", str(out)], check=True, env=env, capture_output=True,
                   cwd=Path(__file__).resolve().parents[1], timeout=120)
    text = out.read_text()
    assert "import_path: serve.app:app" in text and "SegmentModel" in text  # the colocated model+ingress
