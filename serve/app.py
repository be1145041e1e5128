"""Ray Serve application: an HTTP ingress (FastAPI) and a batching model (serve.model).

The ingress decodes, validates, authenticates and encodes; the model runs the network, batching single
slices from many requests with ``@serve.batch``. By default (``colocate``) the model lives inside the
ingress replica: one deployment, so a request crosses one Ray hop (proxy -> replica), not two, and
scaling the replicas scales both. ``colocate=False`` puts the model in its own ``SegmentModel``
deployment behind a DeploymentHandle (the ingress retries a lost model replica on another), for
clusters where decoding should scale apart from the GPUs. A volume goes to the model as one call so
3D post-processing sees the whole patient.

``python -m serve run --bundle DIR`` serves it locally; ``serve run|deploy`` with
``import_path: serve.app:app_builder`` and ``args: {bundle: DIR, ...}`` serves it on a cluster, and
``GLIOMASEG_BUNDLE=DIR serve build serve.app:app`` writes a config for ``serve deploy``. DIR may be
``s3://bucket/prefix``: each replica fetches it on its own node (core.bundle.files).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from core.bundle.files import WEIGHTS, listed_files, read_config
from core.config import BATCH_SIZE, add_arguments, from_args, from_mapping, meta
from core.io import is_remote
from serve.ingress import Ingress
from serve.model import SegmentModel
from serve.startup import DEFAULT_START_TIMEOUT_S, ServeStartError, apply_env_defaults, bring_up, init_local_ray

log = logging.getLogger(__name__)
APP_NAME = "gliomaseg"


@dataclass
class ServeSettings:
    """Everything the replicas need: the `serve run` flags, the ``serve run|deploy`` args dict
    (``key=value``) and, as a dict, the ingress's settings."""

    bundle: str = field(metadata=meta(
        "bundle directory (model.safetensors + config.json) or s3://bucket/prefix (honours AWS_ENDPOINT_URL; each "
        "replica fetches it once per node into a cache and checks its sha256s)"))
    replicas: str = field(default="1", metadata=meta("model replicas: an integer or 'auto' (autoscaling)"))
    max_replicas: int = field(default=0, metadata=meta(
        "with --replicas auto: the most replicas; 0 derives it from the cluster's GPUs/CPUs"))
    max_batch_size: int = field(default=BATCH_SIZE, metadata=meta("most slices per model batch"))
    batch_wait_ms: float = field(default=0.0, metadata=meta(
        "longest wait to fill a batch; 0: a batch is what queued while the last one ran, so a lone request "
        "never waits for company"))
    max_ongoing_requests: int = field(default=0, metadata=meta(
        "requests per model replica at once; 0: 2 x --max-batch-size (room to fill the next batch)"))
    volume_budget_mb: float = field(default=0.0, metadata=meta(
        "memory per replica for the volumes it answers at once, each counted as 4x its decoded slices: a volume "
        "that does not fit beside those in progress is answered 503 with Retry-After, one over the whole budget "
        "413; single slices never count; 0: half the memory the replica may use when it starts (its "
        "container's limit or the machine's)"))
    colocate: bool = field(default=True, metadata=meta(
        "the model inside the ingress replica (one hop); --split runs it as its own deployment behind the ingress",
        false_flag="--split"))
    torch_threads: int = field(default=0, metadata=meta(
        "torch threads per CPU replica; 0: its CPUs, at most all cores but one, leaving the proxy a core"))
    gpus_per_replica: float | None = field(default=None, metadata=meta(
        "GPU share per model replica; unset: 0.5 when the Ray cluster has a GPU, else 0"))
    cpus_per_replica: float = field(default=1.0, metadata=meta("CPUs per model replica"))
    token_env: str | None = field(default=None, metadata=meta(
        "environment variable holding a required bearer token"))
    max_body_mb: float = field(default=64.0, metadata=meta("largest request body"))
    max_slices: int = field(default=512, metadata=meta("most slices in a volume request"))
    max_pixels: int = field(default=1 << 25, metadata=meta(
        "most pixels per volume request, after decoding: bounds memory whatever the compression"))
    min_size: int = field(default=32, metadata=meta("smallest slice side accepted"))
    max_size: int = field(default=1024, metadata=meta("largest slice side accepted"))

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> ServeSettings:
        """From ``serve run ... key=value`` or a deploy config's args: strings are coerced to the field
        types; unknown or mistyped keys are a core.config.ConfigError."""
        return from_mapping(cls, args, "serve settings")

    def validate(self) -> None:
        if self.replicas != "auto" and (not str(self.replicas).isdigit() or int(self.replicas) < 1):
            raise ValueError(f"replicas must be a positive integer or 'auto', got {self.replicas!r}")
        if not 1 <= self.max_batch_size <= 1024:
            raise ValueError(f"max_batch_size must be in 1..1024, got {self.max_batch_size}")
        if self.batch_wait_ms < 0 or (self.gpus_per_replica or 0) < 0 or self.max_body_mb <= 0:
            raise ValueError("batch_wait_ms and gpus_per_replica must be >= 0 and max_body_mb > 0")
        if self.max_ongoing_requests < 0 or self.torch_threads < 0 or self.volume_budget_mb < 0:
            raise ValueError("max_ongoing_requests, torch_threads and volume_budget_mb must be >= 0 (0: derived)")

    def ongoing(self) -> int:
        """Requests a model replica takes at once: room for several batches, or @serve.batch never sees
        a full one (bench/serve_load.py --sweep measures other choices)."""
        return self.max_ongoing_requests or 2 * self.max_batch_size

    def autoscaling(self) -> dict[str, Any]:
        """Autoscale on queued requests: a replica is 'full' at about one batch in flight."""
        return {
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": max(1, self.max_replicas),
            "target_ongoing_requests": max(2, self.max_batch_size),
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 60.0,
        }


@dataclass
class LaunchOptions:
    """What `serve run` needs beyond the replicas' settings: where Ray and Serve's proxy come up."""

    host: str = field(default="127.0.0.1", metadata=meta("bind address (default loopback only)"))
    port: int = field(default=8000, metadata=meta("HTTP port"))
    address: str | None = field(default=None, metadata=meta("Ray cluster address (default: local or RAY_ADDRESS)"))
    haproxy: bool = field(default=False, metadata=meta(
        "HAProxy in front of the replicas' own HTTP servers instead of Serve's proxy actor, when serve run starts "
        "Ray itself (binds the replicas' ports and HAProxy's stats 8404 and metrics 9101 on all interfaces, "
        "whatever --host says: see serve/startup.py)"))
    dashboard: bool = field(default=False, metadata=meta(
        "also start Ray's dashboard when serve run starts Ray itself (costs CPU at start-up)"))
    start_timeout: float = field(default=DEFAULT_START_TIMEOUT_S, metadata=meta(
        "seconds for Serve and the model to come up before giving up with a message saying what did not"))


def _token_digest(settings: ServeSettings) -> str | None:
    """SHA-256 of the bearer token, so the secret itself never lands in the Serve config."""
    if not settings.token_env:
        return None
    token = os.environ.get(settings.token_env)
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def build_app(settings: ServeSettings) -> serve.Application:
    """Bind the deployments for ``settings`` (nothing starts until serve.run)."""
    settings.validate()
    actor = {"num_cpus": settings.cpus_per_replica}
    if settings.gpus_per_replica:  # None (not resolved against a cluster, e.g. `serve build`): no GPU
        actor["num_gpus"] = settings.gpus_per_replica
    scale: dict[str, Any] = (
        {"autoscaling_config": settings.autoscaling()} if settings.replicas == "auto"
        else {"num_replicas": int(settings.replicas)}
    )
    model_args = {
        "bundle": _bundle_location(settings.bundle),
        # "auto", not "cuda": a replica given a GPU share where CUDA is absent serves on the CPU with a
        # warning (core.runtime.resolve_device) instead of failing every restart.
        "device": "auto" if settings.gpus_per_replica else "cpu",
        "max_batch_size": settings.max_batch_size,
        "batch_wait_s": settings.batch_wait_ms / 1000.0,
        "threads": settings.torch_threads,
        "cpus": settings.cpus_per_replica,
    }
    ingress_settings = {**asdict(settings), "max_ongoing_requests": settings.ongoing(),
                        "token_sha256": _token_digest(settings)}
    if settings.colocate:
        # One deployment named for what it holds: the model's replica, answering HTTP itself.
        return Ingress.options(
            name="SegmentModel", ray_actor_options=actor, max_ongoing_requests=settings.ongoing(),
            health_check_period_s=10.0, health_check_timeout_s=30.0, **scale,
        ).bind(model_args, ingress_settings)
    model = SegmentModel.options(
        ray_actor_options=actor, max_ongoing_requests=settings.ongoing(), **scale,
    ).bind(*model_args.values())
    return Ingress.options(
        ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=max(64, 4 * settings.max_batch_size)
    ).bind(model, ingress_settings)


def _bundle_location(bundle: str) -> str:
    """What replicas receive: an s3:// URI as given (each replica fetches it), a local path made absolute."""
    return bundle if is_remote(bundle) else str(Path(bundle).resolve())


def check_bundle(bundle: str) -> None:
    """Fail early, in the driver, on a location that is not a bundle: reads config.json, never the weights
    (replicas fetch and check those); a local bundle's listed files must exist."""
    config = read_config(bundle)
    if is_remote(bundle):
        return
    # The files config.json lists; a bundle from before the hashes is one network with its weights.
    for name in listed_files(config, bundle) or {WEIGHTS: ""}:
        if not (Path(bundle) / name).is_file():
            raise FileNotFoundError(f"{Path(bundle) / name}: missing; --bundle must be a bundle directory "
                                    "or s3://bucket/prefix")


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run serve.app:app_builder bundle=DIR|s3://...`` and deploy configs."""
    import ray

    settings = ServeSettings.from_dict(dict(args))
    check_bundle(settings.bundle)
    if ray.is_initialized():  # `serve run`/`serve deploy` build inside the cluster; `serve build` does not
        resolve_resources(settings)
    return build_app(settings)


def __getattr__(name: str) -> Any:
    # `serve build serve.app:app` needs an Application attribute; build it only when asked for.
    if name == "app":
        return build_app(ServeSettings(bundle=os.environ.get("GLIOMASEG_BUNDLE", "bundle")))
    raise AttributeError(name)


def resolve_resources(settings: ServeSettings, gpus_per_replica: float | None = None) -> ServeSettings:
    """Fill GPU share (``gpus_per_replica``, else the settings', else derived) and autoscaling ceiling from the
    running cluster (call after ray.init)."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if gpus_per_replica is None:
        gpus_per_replica = settings.gpus_per_replica
    if gpus_per_replica is None:
        gpus_per_replica = 0.5 if gpus > 0 else 0.0
    if gpus_per_replica > 0 and gpus == 0:
        raise ValueError(f"--gpus-per-replica {gpus_per_replica} but the Ray cluster has no GPU")
    settings.gpus_per_replica = gpus_per_replica
    if settings.max_replicas <= 0:
        per = int(gpus / gpus_per_replica) if gpus_per_replica > 0 else int(cpus // 2)
        settings.max_replicas = max(1, per)
    return settings


def start(settings: ServeSettings, host: str = LaunchOptions.host, port: int = LaunchOptions.port,
          name: str = APP_NAME, route_prefix: str = "/", timeout_s: float = LaunchOptions.start_timeout) -> str:
    """Start Serve's HTTP proxy (if not yet running) and deploy the app; returns its base URL.

    Bounded by ``timeout_s``: ServeStartError names what did not come up (see serve.startup).
    """
    return bring_up(lambda: build_app(settings), host, port, name, route_prefix, timeout_s)


def _cmd_run(args: argparse.Namespace) -> int:
    import ray

    settings, launch = from_args(args, ServeSettings), from_args(args, LaunchOptions)
    check_bundle(settings.bundle)
    if settings.token_env and not os.environ.get(settings.token_env):
        raise ValueError(f"--token-env {settings.token_env}: that environment variable is empty or unset")
    started_ray = not ray.is_initialized()
    if started_ray:
        apply_env_defaults(haproxy=launch.haproxy)  # before Ray starts: its processes read them at start-up
        try:
            # No dashboard unless asked: its head starts ~10 Python processes, and on a machine whose cores
            # are busy they starve the node's own agents, which the raylet gives only seconds to start.
            init_local_ray(launch.address, launch.dashboard)
        except Exception as exc:  # Ray raises a bare Exception when its node does not come up
            print(f"error: serve run: Ray did not start ({type(exc).__name__}: {exc}); its logs are in "
                  "/tmp/ray/session_latest/logs (raylet.out, gcs_server.out)", file=sys.stderr, flush=True)
            return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        resolve_resources(settings)
        try:
            url = start(settings, launch.host, launch.port, timeout_s=launch.start_timeout)
        except ServeStartError as exc:
            print(f"error: serve run did not come up (start timeout {launch.start_timeout:g} s): {exc}",
                  file=sys.stderr, flush=True)
            return 1
        print(f"serving {settings.bundle} at {url}/ (Ctrl-C to stop)", flush=True)
        stop.wait()
    finally:
        print("shutting down", flush=True)
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="serve a bundle over HTTP with Ray Serve (blocks until Ctrl-C/SIGTERM)")
    add_arguments(p, ServeSettings)  # every option is a field of one of the two, and every field an option
    add_arguments(p, LaunchOptions)
    p.set_defaults(func=_cmd_run)
