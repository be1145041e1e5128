"""The model replica and the ingress's error paths without a running Serve: CUDA out-of-memory answered
and survived, a lost device failing the health check, slices taking turns with a volume's chunks, a 500
without exception text, the body drained before an early answer, hop timings, and no AWS key in
`serve batch`'s runtime_env."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_random_bundle, sample_images
from starlette.requests import Request

from serve import ingress, timing
from serve.app import ServeSettings
from serve.model import FairGate, LocalHandle, ModelOutOfMemory, SegmentModelCore, replica_threads


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> SegmentModelCore:
    bundle = make_random_bundle(tmp_path_factory.mktemp("replica") / "bundle")
    return SegmentModelCore(str(bundle), "cpu", max_batch_size=4, batch_wait_s=0.0)


def _request(chunks: list[bytes], path: str = "/v1/segment") -> Request:
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    return Request(scope, receive)


def test_out_of_memory_is_a_503_and_the_replica_stays_healthy(core: SegmentModelCore, monkeypatch) -> None:
    import torch

    volume = sample_images(6, seed=2)

    def out_of_memory(*_: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(core.predictor, "segment", out_of_memory)
        with pytest.raises(ModelOutOfMemory):
            asyncio.run(core.segment_volume(volume))
        core.check_health()  # recoverable: not unhealthy
        with pytest.raises(ingress.ApiError) as caught:  # what the client gets
            asyncio.run(ingress._call_model(LocalHandle(core).segment_volume, volume))
    assert caught.value.status == 503 and caught.value.error == "out_of_memory"
    assert caught.value.headers == {"Retry-After": "2"}
    answer = asyncio.run(ingress._api_error(_request([b""]), caught.value))
    assert answer.status_code == 503 and json.loads(answer.body)["error"] == "out_of_memory"
    # The next request, with memory free again, is served.
    assert asyncio.run(core.segment_volume(volume)).masks.shape == (6, 64, 64)
    core.check_health()


def test_a_lost_device_fails_the_health_check(tmp_path: Path, monkeypatch) -> None:
    fresh = SegmentModelCore(str(make_random_bundle(tmp_path / "b")), "cpu", 4, 0.0)

    def lost(*_: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(fresh.predictor, "segment", lost)
    with pytest.raises(RuntimeError, match="illegal memory"):
        asyncio.run(fresh.segment_volume(sample_images(2, seed=3)))
    with pytest.raises(RuntimeError, match="unusable"):
        fresh.check_health()


def test_a_waiting_slice_goes_between_a_volumes_chunks() -> None:
    """FairGate hands the device to whoever waits first: a slice batch arriving during a volume's first
    chunk runs before the volume's second, not after its last."""
    gate, order = FairGate(), []
    slice_wants = threading.Event()

    def volume() -> None:
        for chunk in range(5):
            with gate.hold():
                order.append(f"volume {chunk}")
                if chunk == 0:
                    slice_wants.set()
                    deadline = time.monotonic() + 10
                    while not gate._waiting and time.monotonic() < deadline:  # the slice is queued
                        time.sleep(0.001)

    def one_slice() -> None:
        slice_wants.wait(10)
        with gate.hold():
            order.append("slice")

    threads = [threading.Thread(target=volume), threading.Thread(target=one_slice)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert order == ["volume 0", "slice", "volume 1", "volume 2", "volume 3", "volume 4"]


def test_volumes_run_chunk_by_chunk_through_the_gate(core: SegmentModelCore) -> None:
    """The replica's forward passes take the gate per chunk of max_batch_size slices, not per request."""
    entered = []
    hold = core.predictor.device_gate
    assert hold.__self__.__class__ is FairGate  # the replica's predictor takes turns through a FairGate

    def counting():
        entered.append(1)
        return hold()

    core.predictor.device_gate = counting
    try:
        asyncio.run(core.segment_volume(sample_images(10, seed=4)))
    finally:
        core.predictor.device_gate = hold
    assert len(entered) == 3  # 10 slices in chunks of 4


def test_an_internal_error_answers_without_its_text(caplog) -> None:
    secret = "/data/TCGA_CS_4941/scan.nii.gz: token s3cret"
    answer = asyncio.run(ingress._internal_error(_request([b""]), RuntimeError(secret)))
    body = json.loads(answer.body)
    assert answer.status_code == 500 and set(body) == {"error", "detail"} and body["error"] == "internal"
    assert "TCGA" not in answer.body.decode() and "s3cret" not in answer.body.decode()
    assert "RuntimeError" not in body["detail"]
    assert any("TCGA" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)  # kept for the operator


def test_the_rest_of_the_body_is_drained_up_to_the_limit() -> None:
    assert asyncio.run(ingress.drain(_request([b"a" * 10, b"b" * 10, b"c" * 10]))) == 30
    assert asyncio.run(ingress.drain(_request([b"a" * 10] * 100), limit=25)) == 30  # stops past the limit
    assert asyncio.run(ingress.drain(_request([]))) == 0  # a client gone away: nothing to read, no error


def test_hop_breakdown_from_the_headers() -> None:
    hops = timing.Hops(enabled=True)
    hops.mark("read")
    hops.mark("decode")
    hops.split("handle", {"wait": 0.0, "model": 0.0})
    hops.mark("encode")
    headers = hops.headers()
    parsed = timing.parse(headers["Server-Timing"])
    assert set(parsed) == {"read", "decode", "handle", "wait", "model", "encode", "app"}
    begin, end = (float(v) for v in headers["X-Timing-Window"].split(","))
    out = timing.breakdown(headers["Server-Timing"], headers["X-Timing-Window"], begin - 0.002, end + 0.001)
    assert set(timing.HOPS) <= set(out) and out["proxy"] == pytest.approx(2.0, abs=0.01)
    assert out["response"] == pytest.approx(1.0, abs=0.01)
    assert timing.Hops(enabled=False).headers() == {}


def test_replica_threads_leave_the_proxy_a_core(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert replica_threads(0, 1.0) == 1 and replica_threads(0, 2.0) == 1 and replica_threads(3, 1.0) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert replica_threads(0, 4.0) == 4 and replica_threads(0, 32.0) == 15


def test_settings_parse_the_new_options() -> None:
    s = ServeSettings.from_dict({"bundle": "b", "colocate": "false", "max_ongoing_requests": "24"})
    assert s.colocate is False and s.ongoing() == 24
    assert ServeSettings(bundle="b", max_batch_size=8).ongoing() == 16 and ServeSettings(bundle="b").colocate
    with pytest.raises(ValueError):
        ServeSettings.from_dict({"bundle": "b", "max_ongoing_requests": "-1"})


def test_batch_runtime_env_carries_no_aws_secret(monkeypatch) -> None:
    from serve.batch.store import SECRET_ENV, worker_runtime_env

    secrets = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID0001", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCY",
               "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLETOKEN"}
    for key, value in {**secrets, "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_PROFILE": "cohort"}.items():
        monkeypatch.setenv(key, value)
    remote_args = worker_runtime_env()
    env = remote_args["runtime_env"]["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["AWS_PROFILE"] == "cohort"
    text = json.dumps(remote_args)
    assert not any(k in env for k in SECRET_ENV) and not any(v in text for v in secrets.values())


def test_decoded_npy_is_a_view_on_the_body() -> None:
    from core.formats import codecs

    volume = sample_images(3, seed=5)
    body = codecs.encode_npy(volume)
    decoded = codecs.decode(body, codecs.NPY, volume=True)
    np.testing.assert_array_equal(decoded, volume)
    assert np.shares_memory(decoded, np.frombuffer(body, np.uint8)) and not decoded.flags.writeable
