"""Memory under a burst of volumes: the budget's accounting (held, given back on every path, refused with a 503
and Retry-After or a 413), and the real Serve app with a small budget answering a burst of volumes beside
single slices; the SageMaker handlers apply the same budget."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from bundle_factory import make_random_bundle, sample_images
from serve_support import serving

from core.config import ConfigError
from core.formats import codecs
from core.formats.media import Busy, DecodeError, error_answer, error_headers
from core.inference.budget import MB, MemoryBudget, budget_from_mb, default_budget, volume_bytes
from serve.app import ServeSettings

# 96 slices of 64x64x3: 1.2 MB decoded, about 4.7 MB to answer; one fits the budget below, two do not.
BURST_SLICES, BUDGET_MB = 96, 6


# ------------------------------------------------------------------------------------- the accounting


def test_a_hold_is_given_back_when_its_block_ends() -> None:
    budget = MemoryBudget(1000)
    with budget.hold(100) as held:
        assert budget.held == 100
        held.resize(700)  # the decoded size, once known
        assert budget.held == 700
        held.resize(300)  # shrinking always succeeds
        assert budget.held == 300
    assert budget.held == 0


def test_a_volume_that_does_not_fit_beside_others_is_busy_with_retry_after() -> None:
    budget = MemoryBudget(1000, retry_after=3)
    with budget.hold(600):
        with pytest.raises(Busy) as caught, budget.hold(500):
            pass
        assert budget.held == 600  # the refused one holds nothing
        status, body = error_answer(caught.value)
        assert (status, body["error"]) == (503, "busy") and "retry" in body["detail"]
        assert error_headers(caught.value) == {"Retry-After": "3"}
        with budget.hold(400):  # what is left still fits
            assert budget.held == 1000
    with budget.hold(1000):  # and after both ended, all of it
        pass
    assert budget.held == 0


def test_a_volume_over_the_whole_budget_is_too_large_not_busy() -> None:
    """No wait would let it in, so no Retry-After: a 413 naming the setting."""
    budget = MemoryBudget(1000)
    with pytest.raises(DecodeError) as caught:
        budget.check(1001)
    assert not isinstance(caught.value, Busy) and error_headers(caught.value) == {}
    assert error_answer(caught.value)[0] == 413 and "volume_budget_mb" in caught.value.detail
    assert budget.held == 0


def test_errors_inside_and_refused_growth_give_everything_back() -> None:
    budget = MemoryBudget(1000)
    with pytest.raises(RuntimeError), budget.hold(800):
        raise RuntimeError("the model failed")
    assert budget.held == 0
    with pytest.raises(DecodeError), budget.hold(100) as held:
        held.resize(2000)  # refused: the 100 already held stay held until the block ends
    assert budget.held == 0
    with budget.hold(900), pytest.raises(Busy), budget.hold(50) as other:
        other.resize(200)
    assert budget.held == 0


def test_memory_free_now_is_checked_where_neighbours_take_it_unseen() -> None:
    """A SageMaker worker cannot see the container's other workers: memory free now refuses with a 503."""
    free = [10_000]
    budget = MemoryBudget(5000, available=lambda: free[0])
    budget.check(4000)
    free[0] = 1000
    with pytest.raises(Busy):
        budget.check(4000)
    assert budget.held == 0


def test_concurrent_holds_never_exceed_the_budget() -> None:
    budget, peak, lock = MemoryBudget(1000), [0], threading.Lock()
    start = threading.Barrier(16)
    outcomes: list[str] = []

    def worker() -> None:
        start.wait()
        for _ in range(50):
            try:
                with budget.hold(300), lock:
                    peak[0] = max(peak[0], budget.held)
                outcomes.append("held")
            except Busy:
                outcomes.append("busy")

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 1000 and budget.held == 0 and "held" in outcomes


def test_the_budget_setting_is_typed_and_derived_when_zero() -> None:
    assert ServeSettings.from_dict({"bundle": "b", "volume_budget_mb": "512"}).volume_budget_mb == 512.0
    with pytest.raises(ConfigError, match="volume_budget_mb"):
        ServeSettings.from_dict({"bundle": "b", "volume_budget_mb": -1})
    assert budget_from_mb(6) == 6 * MB
    assert budget_from_mb(0) >= MB and default_budget() >= MB  # half of what this machine has free
    assert volume_bytes(1000) > 1000  # the working copies count, not only the decoded slices


# ------------------------------------------------------------------------------------- the Serve app


@pytest.fixture(scope="module")
def url(ray_session, tmp_path_factory) -> str:
    bundle = make_random_bundle(tmp_path_factory.mktemp("memory") / "bundle")
    with serving({"/": ServeSettings(bundle=str(bundle), volume_budget_mb=BUDGET_MB)}) as running:
        yield running["/"]


async def _burst(url: str, volume: bytes, slice_body: bytes, volumes: int, slices: int) -> tuple[list, list]:
    """``volumes`` volume requests and ``slices`` slice requests sent at once; their answers."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        def send(path: str, body: bytes) -> Any:
            return client.post(path, content=body, headers={"Content-Type": "application/x-npy"},
                               params={"format": "npy"})

        sent = [send("/v1/segment/volume", volume) for _ in range(volumes)]
        sent += [send("/v1/segment", slice_body) for _ in range(slices)]
        answers = await asyncio.gather(*sent)
    return answers[:volumes], answers[volumes:]


def test_a_burst_of_volumes_is_refused_with_retry_after_while_slices_flow(url: str) -> None:
    serving_info = httpx.get(f"{url}/v1/model").json()["serving"]
    assert serving_info["volume_budget_mb"] == BUDGET_MB
    volume = codecs.encode_npy(sample_images(BURST_SLICES, seed=1))
    slice_body = codecs.encode_npy(sample_images(1, seed=2)[0])
    refused = []
    for _ in range(3):  # a burst whose requests happened to arrive one after another refuses none: send again
        volume_answers, slice_answers = asyncio.run(_burst(url, volume, slice_body, volumes=8, slices=8))
        assert all(r.status_code == 200 for r in slice_answers), [r.text for r in slice_answers]
        assert {r.status_code for r in volume_answers} <= {200, 503}, [r.text for r in volume_answers]
        assert any(r.status_code == 200 for r in volume_answers)  # the budget takes one volume at a time
        refused = [r for r in volume_answers if r.status_code == 503]
        if refused:
            break
    assert refused, "no volume of three bursts was refused"
    for r in refused:
        assert r.json()["error"] == "busy" and set(r.json()) == {"error", "detail"}
        assert int(r.headers["Retry-After"]) > 0
    # The replica is alive and every byte was given back: a volume and a slice succeed after the burst.
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    after = httpx.post(f"{url}/v1/segment/volume", content=volume, params={"format": "npy"},
                       headers={"Content-Type": "application/x-npy"}, timeout=120)
    assert after.status_code == 200, after.text
    assert np.load(io.BytesIO(after.content)).shape == (BURST_SLICES, 64, 64)
    assert httpx.post(f"{url}/v1/segment", content=slice_body, headers={"Content-Type": "application/x-npy"},
                      timeout=60).status_code == 200


def test_a_volume_over_the_whole_budget_is_a_413_and_the_next_one_is_answered(url: str) -> None:
    big = codecs.encode_npy(sample_images(4 * BURST_SLICES, seed=3))
    r = httpx.post(f"{url}/v1/segment/volume", content=big, headers={"Content-Type": "application/x-npy"},
                   timeout=120)
    assert r.status_code == 413 and r.json()["error"] == "too_large" and "Retry-After" not in r.headers
    small = codecs.encode_npy(sample_images(8, seed=4))
    r = httpx.post(f"{url}/v1/segment/volume", content=small, headers={"Content-Type": "application/x-npy"},
                   params={"format": "json"}, timeout=120)
    assert r.status_code == 200 and r.json()["slices"] == 8


# ------------------------------------------------------------------------------------- SageMaker


def test_sagemaker_handlers_check_volumes_against_the_same_budget(tmp_path: Path) -> None:
    from sagemaker_sim import run_handlers

    bundle = make_random_bundle(tmp_path / "bundle")
    npy = "application/x-npy"
    cases = {
        "big_volume": (codecs.encode_npy(sample_images(4 * BURST_SLICES, seed=3)), npy, "application/json", {}),
        "one_slice": (codecs.encode_npy(sample_images(1, seed=2)[0]), npy, npy, {}),
        "small_volume": (codecs.encode_npy(sample_images(8, seed=4)), npy, npy, {}),
    }
    res = run_handlers(bundle, cases, tmp_path / "sm", {"GLIOMASEG_VOLUME_BUDGET_MB": str(BUDGET_MB)})
    status, body = res["big_volume"]
    assert status["status"] == 413, body[:300]
    assert json.loads(body.split(b"\n", 1)[0])["error"] == "too_large"
    assert res["one_slice"][0]["status"] == 200 and res["small_volume"][0]["status"] == 200


def test_sagemaker_handlers_answer_busy_with_retry_after_while_memory_is_taken(tmp_path: Path) -> None:
    """The container's other workers hold the memory (free now: 0 bytes): a volume is a 503 whose Retry-After
    reaches the response headers, as Serve answers it; a single slice never counts and is answered."""
    from sagemaker_sim import run_handlers

    bundle = make_random_bundle(tmp_path / "bundle")
    npy = "application/x-npy"
    cases = {
        "volume": (codecs.encode_npy(sample_images(8, seed=4)), npy, npy, {}),
        "one_slice": (codecs.encode_npy(sample_images(1, seed=2)[0]), npy, npy, {}),
    }
    taken = "import inference; inference.VOLUME_BUDGET._available = lambda: 0"
    res = run_handlers(bundle, cases, tmp_path / "sm", {"GLIOMASEG_VOLUME_BUDGET_MB": str(BUDGET_MB),
                                                        "SIM_AFTER_LOAD": taken})
    status, body = res["volume"]
    assert status["status"] == 503, body[:300]
    assert json.loads(body.split(b"\n", 1)[0])["error"] == "busy"
    assert int(status["headers"]["Retry-After"]) > 0
    assert res["one_slice"][0]["status"] == 200
