"""Malformed and hostile requests against a real Serve app and the SageMaker handlers: only 4xx
answers, no replica crashes, the server healthy afterwards; and fuzzing of every decoder in core.formats.codecs."""

from __future__ import annotations

import io
import json
import os
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from bundle_factory import make_random_bundle, sample_images
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import NPY, PNG, TIFF, corpus, replica_names, volume_corpus
from sagemaker_sim import run_container
from serve_support import serving

from core.formats import codecs
from core.formats.codecs import DecodeError
from serve.app import ServeSettings

MAX_BODY_MB = 4  # above the 10k-page TIFF (2.3 MB), so that one reaches the decoder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("bad_input") / "bundle")


@pytest.fixture(scope="module")
def urls(ray_session, bundle) -> Iterator[dict[str, str]]:
    # Split (model behind a handle): the corpus also crosses the ingress -> model hop there.
    app = ServeSettings(bundle=str(bundle), max_body_mb=MAX_BODY_MB, max_slices=32, max_batch_size=8, colocate=False)
    big = ServeSettings(bundle=str(bundle))  # the defaults (64 MB bodies, model in the ingress replica)
    with serving({"/": app, "/big": big}) as running:
        yield running


@pytest.fixture(scope="module")
def url(urls) -> str:
    return urls["/"]


def _post(url: str, path: str, body: bytes, kind: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=body, headers={"Content-Type": kind, **kw.pop("headers", {})},
                      timeout=30, **kw)


def _assert_json_error(r: httpx.Response, status: int, name: str) -> None:
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error", "detail"}, (name, body)


def test_corpus_gets_4xx_and_no_replica_crashes(url: str, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    replicas = replica_names("test0", "SegmentModel") | replica_names("test0", "Ingress")
    assert len(replicas) == 2
    seen: dict[str, int] = {}
    for name, (body, kind, status) in corpus(marker).items():
        r = _post(url, "/v1/segment", body, kind)
        seen[name] = r.status_code
        _assert_json_error(r, status, name)
    for name, (body, kind, status) in volume_corpus().items():
        r = _post(url, "/v1/segment/volume", body, kind)
        seen[name] = r.status_code
        _assert_json_error(r, status, name)

    # Oversize bodies: declared (Content-Length) and chunked (no length: counted while streaming).
    big = b"II*\x00" + bytes((MAX_BODY_MB << 20) + 1000)
    _assert_json_error(_post(url, "/v1/segment", big, TIFF), 413, "oversize")

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY_MB + 2):
            yield bytes(1 << 20)

    r = httpx.post(f"{url}/v1/segment", content=chunks(), headers={"Content-Type": NPY}, timeout=30)
    _assert_json_error(r, 413, "oversize_chunked")
    # Path-like names and odd parameters the API does not use, or refuses, never reach a file system.
    good = codecs.encode_png(sample_images(1, seed=9)[0])
    evil = {"Content-Disposition": 'attachment; filename="../../../etc/passwd"'}
    assert _post(url, "/v1/segment", good, PNG, headers=evil, params={"name": "../../x.tif"}).status_code == 200
    _assert_json_error(_post(url, "/v1/segment", good, PNG, params={"format": "../../etc/passwd"}), 400, "format")
    _assert_json_error(httpx.get(f"{url}/static/..%2F..%2Fcore%2Fcodecs.py"), 404, "static")

    assert not any(s >= 500 for s in seen.values()), seen
    assert not marker.exists(), "an object-dtype .npy was unpickled"
    assert replica_names("test0", "SegmentModel") | replica_names("test0", "Ingress") == replicas
    assert httpx.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
    r = _post(url, "/v1/segment", good, PNG, params={"format": "npy"})
    assert r.status_code == 200 and np.load(io.BytesIO(r.content), allow_pickle=False).shape == (64, 64)


def test_an_early_4xx_reaches_a_urllib_client_still_uploading(urls: dict[str, str]) -> None:
    """format=bogus is refused before the body is read; the 15 MB body is drained first, so a client that
    sends all of it before reading (urllib, requests) gets the JSON 400, not a reset connection."""
    body = os.urandom(15 << 20)
    for path in ("/v1/segment/volume?format=bogus", "/v1/segment?format=bogus") * 3:
        request = urllib.request.Request(f"{urls['/big']}{path}", data=body, method="POST",
                                         headers={"Content-Type": NPY})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == 400, path
        answer = json.loads(caught.value.read())
        assert answer["error"] == "bad_request" and "bogus" in answer["detail"], answer
    assert httpx.get(f"{urls['/big']}/healthz", timeout=10).json()["status"] == "ok"


# Where the handlers answer differently from the HTTP app: they read every body as a volume, so 10k
# pages, or (64,64,C) as 64 slices of 64xC, are past GLIOMASEG_MAX_PAGES rather than one slice of the
# wrong shape; JSON is a request type there (an S3 URI), so a JSON body without one is a 400; and they read a
# body as the volume endpoint does (core.formats.media.body_kind), where an empty body is a 400 before its type.
SAGEMAKER_STATUS = {"pages_10k_tiff": 413, "five_channels": 413, "two_channels": 413, "json_type": 400,
                    "zero_byte_untyped": 400}


def test_corpus_against_sagemaker_handlers(bundle: Path, tmp_path: Path) -> None:
    """The archive's inference.py, run by the inference toolkit in a fresh process: 4xx, never 5xx."""
    from serve.sagemaker.export import build_archive

    archive = build_archive(bundle, tmp_path / "model.tar.gz")
    model_dir = tmp_path / "opt_ml_model"
    with tarfile.open(archive) as tar:
        tar.extractall(model_dir, filter="data")
    marker = tmp_path / "unpickled"
    cases = {**corpus(marker), **volume_corpus()}
    # SageMaker caps bodies at 6 MB before the handler; past the pixel limit is the handler's own 413.
    cases["oversize_pixels"] = (codecs.encode_npy(np.zeros((600, 256, 256, 3), np.uint8)), NPY, 413)
    cases["zero_byte_json"] = (b"", "application/json", 400)
    cases["after_errors"] = (codecs.encode_npy(sample_images(1)[0]), NPY, 200)
    spec = []
    for i, (body, kind, _) in enumerate(cases.values()):
        (tmp_path / f"req{i}").write_bytes(body)
        spec.append({"body": str(tmp_path / f"req{i}"), "content_type": kind, "accept": NPY})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {"GLIOMASEG_MAX_PAGES": "32", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # no S3 call expected
    results = json.loads(run_container(model_dir, tmp_path / "spec.json", tmp_path, env).split("RESULTS", 1)[1])
    statuses = {name: r["status"] for name, r in zip(cases, results, strict=False)}
    for name, (_, _, expected) in cases.items():
        got = statuses[name]
        assert got == SAGEMAKER_STATUS.get(name, expected), (name, got)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- fuzzing

SEEDS = {
    "tiff_rgb": (codecs.encode_volume_tiff(sample_images(2, 40, 40, seed=1)), TIFF),
    "tiff_grey_zlib": (codecs.encode_tiff(np.ones((2, 40, 40), np.uint8)), TIFF),
    "png_rgb": (codecs.encode_png(sample_images(1, 40, 40, seed=2)[0]), PNG),
    "png_grey": (codecs.encode_png(sample_images(1, 40, 40, seed=3)[0, ..., 0]), PNG),
    "npy_u8": (codecs.encode_npy(sample_images(1, 40, 40, seed=4)[0]), NPY),
    "npy_u16_volume": (codecs.encode_npy(np.arange(2 * 40 * 40, dtype=np.uint16).reshape(2, 40, 40)), NPY),
}
TYPES = [TIFF, PNG, NPY, "", "application/octet-stream", "image/x-tiff; q=1", "text/plain", None]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A valid file with bytes flipped, cut or spliced: reaches far deeper into the parsers than noise."""
    body, kind = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    data = bytearray(body)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "header"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "header":  # the first 200 bytes hold the tags and sizes: hit them harder
            data[pos % min(200, len(data))] = draw(st.sampled_from([0, 1, 0x7F, 0xFF]))
        elif op == "cut":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data), draw(st.sampled_from(TYPES + [kind, kind]))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.booleans())
def test_fuzz_decode_raises_only_decode_error(case: tuple[bytes, str | None], volume: bool) -> None:
    data, kind = case
    try:
        out = codecs.decode(data, kind, volume=volume, max_pages=8, max_pixels=8 * 64 * 64, max_size=512)
    except DecodeError as exc:
        assert exc.status in (400, 413, 415, 422)
    else:
        assert out.dtype == np.uint8 and out.ndim == 4 and out.shape[-1] == 3
        assert volume or len(out) == 1


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=40)), st.binary(max_size=16))
def test_fuzz_media_type_and_sniff(content_type: str | None, data: bytes) -> None:
    assert codecs.sniff(data) in (None, TIFF, PNG, NPY)
    try:
        assert codecs.media_type(content_type, data) in (TIFF, PNG, NPY)
    except DecodeError as exc:
        assert exc.status == 415


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    JSONISH,
    st.fixed_dictionaries({"size": JSONISH, "counts": JSONISH}),
    st.fixed_dictionaries({"size": st.lists(st.integers(-3, 40), max_size=3),
                           "counts": st.lists(st.integers(-5, 100), max_size=12)}),
))
def test_fuzz_rle_decode(rle: object) -> None:
    try:
        mask = codecs.rle_decode(rle)  # type: ignore[arg-type]
    except DecodeError as exc:
        assert exc.status in (400, 413)
    else:
        assert mask.dtype == np.uint8 and mask.ndim == 2 and set(np.unique(mask)) <= {0, 1}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated(), st.sampled_from([".tif", ".png", ".npy", ".bin", ""]))
def test_fuzz_read_file(tmp_path: Path, case: tuple[bytes, str | None], suffix: str) -> None:
    path = tmp_path / f"slice{suffix}"
    path.write_bytes(case[0])
    try:
        codecs.read_file(str(path), volume=True, max_pages=8)
    except DecodeError as exc:
        assert exc.status in (400, 413, 415, 422)
