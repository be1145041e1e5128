"""Stand-ins for the SageMaker side in tests: the container's handler service in a fresh interpreter,
and a runtime endpoint that records binary invocations (moto's invoke_endpoint cannot decode them)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# The container's side, in a fresh interpreter: the archive's code dir on PYTHONPATH (as TorchServe
# sets it), gliomaseg's editable install removed, the toolkit's handler service driving the handlers.
DRIVER = r'''
import importlib.util, json, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
for name in ("core", "serve", "tune"):
    assert importlib.util.find_spec(name) is None, f"{name} importable in the container simulation"
from sagemaker_inference.default_handler_service import DefaultHandlerService
from sagemaker_inference.transformer import Transformer

model_dir, spec = sys.argv[1], json.load(open(sys.argv[2]))

class RequestProcessor:
    def __init__(self, headers): self.headers = headers
    def get_request_properties(self): return self.headers

class Context:
    def __init__(self):
        self.system_properties = {"model_dir": model_dir, "gpu_id": None}
        self.request_processor = [RequestProcessor({})]
        self.status, self.content_type, self.headers = 200, None, {}
    def set_response_status(self, code=200, phrase=""): self.status = code
    def set_response_content_type(self, idx, value): self.content_type = value
    def set_response_header(self, idx, key, value): self.headers[key] = value  # as TorchServe's Context

ctx = Context()
service = DefaultHandlerService(Transformer())
service.initialize(ctx)
exec(os.environ.get("SIM_AFTER_LOAD", ""))  # a test's stand-in for the container's state, e.g. memory taken
results = []
for i, req in enumerate(spec):
    headers = {"Content-Type": req["content_type"], **req.get("headers", {})}  # e.g. the custom attributes
    if req.get("accept"):
        headers["Accept"] = req["accept"]
    ctx.request_processor = [RequestProcessor(headers)]
    ctx.status, ctx.content_type, ctx.headers = 200, None, {}
    body = open(req["body"], "rb").read()
    out = service.handle([{"body": body}], ctx)[0]
    out = out.encode() if isinstance(out, str) else bytes(out)
    open(f"{req['body']}.out", "wb").write(out)
    results.append({"status": ctx.status, "content_type": ctx.content_type, "headers": ctx.headers})
mods = sys.modules
results.append({"vendored": mods["gliomaseg_core"].__file__, "inference": mods["inference"].__file__,
                 "core_loaded": "core" in mods, "serve_loaded": "serve" in mods})
print("RESULTS" + json.dumps(results))
'''


def run_container(model_dir: Path, spec_path: Path, workdir: Path, env_extra: dict[str, str]) -> str:
    """Run DRIVER on the extracted archive with only its code dir on the path; returns stdout."""
    (workdir / "driver.py").write_text(DRIVER)
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
    env.update(env_extra, PYTHONPATH=str(model_dir / "code"), SAGEMAKER_PROGRAM="inference.py",
               PYTHONNOUSERSITE="1", OMP_NUM_THREADS="2")
    argv = [sys.executable, "-s", str(workdir / "driver.py"), str(model_dir), str(spec_path)]
    proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


class FakeRuntime(BaseHTTPRequestHandler):
    """Stands in for the SageMaker runtime for binary bodies, which moto's invoke cannot decode."""

    seen: list[dict] = []
    reply: bytes = b""
    reply_type: str = "application/x-npy"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        self.send_response(200)
        self.send_header("Content-Type", self.reply_type)
        self.send_header("Content-Length", str(len(self.reply)))
        self.end_headers()
        self.wfile.write(self.reply)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def fake_runtime(reply: bytes, content_type: str = "application/x-npy") -> Iterator[str]:
    FakeRuntime.seen, FakeRuntime.reply, FakeRuntime.reply_type = [], reply, content_type
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRuntime)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


BUCKET = "gliomaseg-test"
ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"  # an invocation's CustomAttributes, request and response


def run_handlers(bundle: Path, cases: dict[str, tuple], tmp_path: Path, env: dict[str, str] | None = None
                 ) -> dict[str, tuple[dict, bytes]]:
    """The archive's handlers in a fresh process on each (body, content type, accept, headers); name ->
    (status, content type, response headers; the body)."""
    import json
    import tarfile

    from serve.sagemaker.export import build_archive

    tmp_path.mkdir(parents=True, exist_ok=True)
    archive = build_archive(bundle, tmp_path / "model.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "opt_ml_model", filter="data")
    spec = []
    for name, (body, kind, accept, headers) in cases.items():
        (tmp_path / name).write_bytes(body)
        spec.append({"body": str(tmp_path / name), "content_type": kind, "accept": accept, "headers": headers})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = run_container(tmp_path / "opt_ml_model", tmp_path / "spec.json", tmp_path, env or {})
    results = json.loads(out.split("RESULTS", 1)[1])
    return {name: (r, (tmp_path / f"{name}.out").read_bytes()) for name, r in zip(cases, results, strict=False)}


@contextlib.contextmanager
def moto_aws(bucket: str) -> Iterator[dict]:
    """A moto server on 127.0.0.1 with boto3 pointed at it through AWS_ENDPOINT_URL and ``bucket``
    created; yields its URL and the environment (for the container simulation too)."""
    import boto3
    import pytest
    from moto.server import ThreadedMotoServer

    from serve.demo import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            boto3.client("s3").create_bucket(Bucket=bucket)
            yield {"url": url, "env": env}
    finally:
        server.stop()
