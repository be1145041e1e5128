"""Shared fixtures: environment, one local Ray per session, small synthetic data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lgg"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance per test worker for the whole run (ray.init costs 5-9 s here).

    Logical CPUs beyond the 2 physical cores let several small trials and replicas run side by side.
    """
    import ray

    from serve.startup import apply_env_defaults

    if not ray.is_initialized():
        apply_env_defaults()  # as `serve run` starts Ray: its Serve (throughput-optimized) is the one tested
        # address="local": a cluster of its own, never one a `ray start` or another test worker left running
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    # Leave Ray to the interpreter's exit hook: other session fixtures may still use it.


@pytest.fixture(scope="session")
def synth_src(tmp_path_factory) -> Path:
    """12 synthetic patients, 16 slices of 64x64, binary masks, in the Kaggle layout."""
    from core.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth"), patients=12, slices=16, size=64, seed=0)


@pytest.fixture(scope="session")
def prepared_dir(synth_src, tmp_path_factory) -> Path:
    """The binary synthetic set prepared with 2 val and 2 test patients."""
    from core.data.prepare import SplitOptions, prepare

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(synth_src, out, SplitOptions(val=2, test=2, seed=0), progress=False)
    return out


@pytest.fixture(scope="session")
def multiclass_prepared_dir(tmp_path_factory) -> Path:
    """6 synthetic patients with 3 foreground classes (tumour core, oedema, CSF)."""
    from core.data.prepare import SplitOptions, prepare
    from core.data.synth import synthesize

    src = synthesize(tmp_path_factory.mktemp("synth_mc"), patients=6, slices=12, size=64, seed=1, classes=3)
    out = tmp_path_factory.mktemp("prepared_mc") / "prepared"
    prepare(src, out, SplitOptions(val=1, test=1, seed=0), progress=False)
    return out


@pytest.fixture(scope="session")
def real_lgg_src(tmp_path_factory) -> Path:
    """Two real LGG patients restored losslessly from ../shared/data/lgg (skipped where absent)."""
    import subprocess
    import sys

    if not (REAL_DATA / "restore.py").is_file():
        pytest.skip(f"real LGG data not present at {REAL_DATA} (only on the project's development machines)")
    out = tmp_path_factory.mktemp("lgg")
    subprocess.run([sys.executable, str(REAL_DATA / "restore.py"), str(out), "--patients", "2"], check=True,
                   capture_output=True)
    return out / "kaggle_3m"


@pytest.fixture(scope="module")
def aws():
    """A moto server for the SageMaker tests (S3 and the SageMaker APIs), per module; see sagemaker_sim."""
    from sagemaker_sim import BUCKET, moto_aws

    with moto_aws(BUCKET) as env:
        yield env
