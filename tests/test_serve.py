"""Ray Serve app on loopback: every endpoint and format, every error, batching, auth, client and CLI."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from bundle_factory import make_random_bundle, sample_images
from PIL import Image
from reliability_support import bomb_tiff
from serve_support import serving, slice_files

from core.cli import dispatch
from core.formats import codecs
from serve.app import ServeSettings

TOKEN = "s3cret-token-for-tests"
MY_COMMANDS = ("serve.app", "serve.client")  # serve/__main__ also lists issue 6's modules


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("serve") / "bundle",
                              postprocess={"min_area": 3, "largest_component": True})


@pytest.fixture(scope="module")
def predictor(bundle):
    from core.inference.predictor import Predictor

    return Predictor.from_bundle(bundle, device="cpu")


@pytest.fixture(scope="module")
def urls(ray_session, bundle):
    apps = {
        # A long batch window so concurrent requests reliably share batches on a 2-core machine.
        "/": ServeSettings(bundle=str(bundle), max_batch_size=16, batch_wait_ms=50, max_body_mb=1, max_slices=32),
        # Split (the model behind a handle), so both layouts answer every test that uses it.
        "/secure": ServeSettings(bundle=str(bundle), token_env="GLIOMASEG_TEST_TOKEN", colocate=False),
    }
    with serving(apps, env={"GLIOMASEG_TEST_TOKEN": TOKEN}) as running:
        yield running


@pytest.fixture(scope="module")
def url(urls) -> str:
    return urls["/"]


def post(url: str, path: str, data: bytes, kind: str, **params) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=data, headers={"Content-Type": kind}, params=params, timeout=60)


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] and body["detail"]
    return body


def mask_from(r: httpx.Response, fmt: str) -> np.ndarray:
    if fmt == "png":
        return np.asarray(Image.open(io.BytesIO(r.content))) // 255
    if fmt == "tiff":
        return tifffile.imread(io.BytesIO(r.content)) // 255
    if fmt == "npy":
        return np.load(io.BytesIO(r.content), allow_pickle=False)
    return codecs.rle_decode(r.json()["masks_rle"][0])


def test_health_model_and_page(url: str) -> None:
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    info = httpx.get(f"{url}/v1/model").json()
    assert info["arch"] == "lite" and info["metrics"]["dsc_volume"] == 0.5
    assert info["serving"]["max_batch_size"] == 16 and info["serving"]["auth"] is False
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "gliomaseg" in page.text and "v1/segment" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    assert_error(httpx.get(f"{url}/static/..%2Fapp.py"), 404)
    assert_error(httpx.get(f"{url}/no/such/route"), 404)


SLICES = {  # (body, content type) of inputs at other sizes, dtypes and layouts than the model's 64x64x3
    "tiff-rgb-64": lambda: (codecs.encode_volume_tiff(sample_images(1, seed=3)), "image/tiff"),
    "png-rgb-96x80": lambda: (codecs.encode_png(sample_images(1, 96, 80, seed=4)[0]), "image/png"),
    "npy-grey-u16-48": lambda: (codecs.encode_npy(sample_images(1, 48, 48, seed=5)[0, ..., 1].astype(np.uint16) * 40),
                                "application/x-npy"),
}


@pytest.mark.parametrize("fmt", ["png", "tiff", "npy", "json"])
@pytest.mark.parametrize("name", list(SLICES))
def test_segment_matches_predictor(url: str, predictor, name: str, fmt: str) -> None:
    data, kind = SLICES[name]()
    image = codecs.decode(data, kind, volume=False)
    expected = predictor.predict(image)[0]
    assert 0 < expected.sum() < expected.size  # the check means something
    r = post(url, "/v1/segment", data, kind, format=fmt)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(mask_from(r, fmt), expected)
    assert int(r.headers["X-Tumour-Pixels"]) == int(expected.sum())
    assert r.headers["X-Model-Version"] == predictor.version and int(r.headers["X-Batch-Size"]) >= 1
    if fmt == "json":
        assert r.json()["tumour_pixels"] == int(expected.sum()) and r.json()["size"] == list(expected.shape)


def test_overlay(url: str, predictor) -> None:
    image = sample_images(1, 72, 72, seed=6)[0]
    expected = predictor.predict(image)[0]
    r = post(url, "/v1/segment", codecs.encode_png(image), "image/png", overlay="true")
    assert r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), codecs.overlay(image, expected))
    body = post(url, "/v1/segment", codecs.encode_png(image), "image/png", format="json", overlay="true").json()
    assert body["overlay"].startswith("data:image/png;base64,")


def test_volume(url: str, predictor) -> None:
    vol = sample_images(12, seed=7)
    expected = predictor.predict(vol, volume=True)  # 3D largest component applies
    assert not np.array_equal(expected, predictor.predict(vol))  # and makes a difference here
    for data, kind in [(codecs.encode_npy(vol), "application/x-npy"), (codecs.encode_volume_tiff(vol), "image/tiff")]:
        r = post(url, "/v1/segment/volume", data, kind)  # default: multi-page TIFF
        assert r.status_code == 200 and r.headers["X-Slices"] == "12"
        np.testing.assert_array_equal(tifffile.imread(io.BytesIO(r.content)) // 255, expected)
    r = post(url, "/v1/segment/volume", codecs.encode_npy(vol), "application/x-npy", format="npy")
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content), allow_pickle=False), expected)
    body = post(url, "/v1/segment/volume", codecs.encode_npy(vol), "application/x-npy", format="json").json()
    assert body["slice_tumour_pixels"] == [int(m.sum()) for m in expected]
    assert body["tumour_pixels"] == int(expected.sum()) and body["slices"] == 12
    r = post(url, "/v1/segment/volume", codecs.encode_npy(vol), "application/x-npy", overlay="true")
    anim = Image.open(io.BytesIO(r.content))
    assert anim.is_animated and anim.n_frames == 12 and int(r.headers["X-Tumour-Pixels"]) == int(expected.sum())
    body = post(url, "/v1/segment/volume", codecs.encode_npy(vol[:3]), "application/x-npy", format="json",
                overlay="1").json()
    assert len(body["overlays"]) == 3


def test_errors_are_json_and_the_server_keeps_serving(url: str, bundle: Path) -> None:
    ok = codecs.encode_png(sample_images(1, seed=1)[0])
    cases = [
        (post(url, "/v1/segment", b"not a tiff", "image/tiff"), 400),
        (post(url, "/v1/segment", codecs.encode_npy(sample_images(1))[:300], "application/x-npy"), 400),
        (post(url, "/v1/segment", ok, "image/png", format="bmp"), 400),
        (post(url, "/v1/segment", ok, "image/png", overlay="maybe"), 400),
        (post(url, "/v1/segment/volume", codecs.encode_npy(sample_images(2)), "application/x-npy", format="png"), 400),
        (post(url, "/v1/segment", ok, "text/plain"), 415),
        (post(url, "/v1/segment", ok, "image/jpeg"), 415),
        (post(url, "/v1/segment", os.urandom(1_200_000), "image/tiff"), 413),  # over --max-body-mb 1
        (post(url, "/v1/segment", bomb_tiff(), "image/tiff"), 413),  # header claims 100000 x 100000
        (post(url, "/v1/segment", codecs.encode_npy(np.zeros((2048, 40), np.uint8)), "application/x-npy"), 413),
        (post(url, "/v1/segment/volume", codecs.encode_npy(sample_images(33)), "application/x-npy"), 413),
        (post(url, "/v1/segment", codecs.encode_npy(sample_images(1).astype(np.float32)), "application/x-npy"), 422),
        (post(url, "/v1/segment", codecs.encode_npy(np.zeros((64, 64, 4), np.uint8)), "application/x-npy"), 422),
        (post(url, "/v1/segment", codecs.encode_npy(np.zeros((16, 16), np.uint8)), "application/x-npy"), 422),
        (post(url, "/v1/segment", codecs.encode_volume_tiff(sample_images(2)), "image/tiff"), 422),
        (httpx.get(f"{url}/v1/segment"), 405),
    ]
    for response, status in cases:
        assert_error(response, status)
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    assert post(url, "/v1/segment", ok, "image/png").status_code == 200


def test_concurrent_slices_are_batched(url: str, predictor) -> None:
    images = sample_images(24, seed=8)
    bodies = [codecs.encode_npy(i) for i in images]

    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/segment", content=b, params={"format": "npy"},
                                                      headers={"Content-Type": "application/x-npy"}) for b in bodies))

    responses = asyncio.run(send())
    sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    assert max(sizes) > 1, sizes
    expected = predictor.predict(images)
    for r, e in zip(responses, expected, strict=True):  # batching never mixes up or alters results
        np.testing.assert_array_equal(np.load(io.BytesIO(r.content), allow_pickle=False), e)


def test_token_protected_app(urls: dict[str, str]) -> None:
    secure, data = urls["/secure"], codecs.encode_png(sample_images(1)[0])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        r = httpx.post(f"{secure}/v1/segment", content=data, headers={"Content-Type": "image/png", **headers})
        assert_error(r, 401)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(httpx.get(f"{secure}/v1/model"), 401)
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{secure}/v1/model", headers=good).json()["serving"]["auth"] is True
    r = httpx.post(f"{secure}/v1/segment", content=data, headers={"Content-Type": "image/png", **good})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert httpx.get(f"{secure}/healthz").status_code == 200  # probes need no token
    assert httpx.get(f"{secure}/").status_code == 200


def test_client_cli(url: str, predictor, synth_src: Path, tmp_path: Path) -> None:
    files = slice_files(synth_src)
    odd = tmp_path / "in" / "..;odd name .tif"
    odd.parent.mkdir()
    odd.write_bytes(files[5].read_bytes())
    bad = tmp_path / "in2" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnope")
    patient = files[0].parent
    out = tmp_path / "out"
    argv = ["predict", "--url", url, str(files[3]), str(odd), str(patient), "--out", str(out), "--concurrency", "4"]
    assert dispatch("python -m serve", "", MY_COMMANDS, argv) == 0
    summary = {Path(s["input"]).name: s for s in json.loads((out / "summary.json").read_text())}
    assert summary[odd.name]["name"] == "odd_name"
    assert all(p.parent == out for p in out.rglob("*"))  # nothing outside --out, no sub-folders
    mask = np.asarray(Image.open(out / f"{files[3].stem}_mask.png")) // 255
    np.testing.assert_array_equal(mask, predictor.predict(tifffile.imread(files[3]))[0])
    assert (out / f"{files[3].stem}_overlay.png").is_file()
    volume = np.stack([tifffile.imread(f) for f in files])
    masks = tifffile.imread(out / f"{patient.name}_masks.tif") // 255
    np.testing.assert_array_equal(masks, predictor.predict(volume, volume=True))
    assert Image.open(out / f"{patient.name}_overlay.png").n_frames > 1
    assert json.loads((out / f"{patient.name}.json").read_text())["slices"] == len(files)
    # A broken file fails alone (exit 1); the others are still written, with the server's mask and its count.
    busy = next(f for f in files if predictor.predict(tifffile.imread(f))[0].any())  # a slice with tumour
    expected = predictor.predict(tifffile.imread(busy))[0]
    assert dispatch("python -m serve", "", MY_COMMANDS, ["predict", "--url", url, str(bad), str(busy),
                                                          "--out", str(tmp_path / "out2")]) == 1
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert "error" in summary[0] and summary[1]["tumour_pixels"] == int(expected.sum()) > 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out2" / f"{busy.stem}_mask.png")) // 255,
                                  expected)


def test_client_onnx_needs_no_server(url: str, bundle: Path, synth_src: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from serve.onnx_export import export_onnx

    model = export_onnx(bundle, tmp_path / "model.onnx")["onnx"]
    inputs = [str(slice_files(synth_src)[2]), str(slice_files(synth_src, 1)[0].parent)]
    for args in (["--onnx", model], ["--url", url]):
        out = str(tmp_path / args[0].strip("-"))
        assert dispatch("python -m serve", "", MY_COMMANDS, ["predict", *args, *inputs, "--out", out]) == 0
    names = sorted(p.name for p in (tmp_path / "url").iterdir() if p.suffix in (".png", ".tif"))
    assert len(names) == 4
    for name in names:
        a, b = Image.open(tmp_path / "onnx" / name), Image.open(tmp_path / "url" / name)
        assert getattr(a, "n_frames", 1) == getattr(b, "n_frames", 1)
        # ONNX Runtime and torch differ by ~1e-6 in probability: allow a rare pixel on the threshold.
        assert np.mean(np.asarray(a) != np.asarray(b)) < 1e-3, name


# ------------------------------------------------------------------------------------- scans (NIfTI, DICOM)


@pytest.fixture(scope="module")
def scan_images() -> np.ndarray:
    return sample_images(12, seed=7)  # the random bundle finds tumour on some slices, not all


def _expected(predictor, body: bytes, sequences: list[str] | None = None):
    """What `core predict` does with the same file: core.inference.results.segment_volume."""
    from core.formats.load import load_volume
    from core.inference.results import segment_volume

    result = segment_volume(predictor, load_volume(body, sequences=sequences))
    assert 0 < result.masks.sum() < result.masks.size
    return result


def test_nifti_body_gives_the_mask_on_the_source_grid_and_its_volume(url: str, predictor, scan_images,
                                                                       tmp_path: Path) -> None:
    import nibabel as nib
    from scan_support import KAGGLE_TEXT, nifti_scan, read_nifti_bytes, voxel_ml

    from serve.volumes import mask_rgba

    path = nifti_scan(scan_images, tmp_path / "case.nii.gz")
    body = path.read_bytes()
    expected = _expected(predictor, body, KAGGLE_TEXT.split(","))
    source = nib.load(path)
    ml = np.count_nonzero(expected.masks) * voxel_ml()
    assert expected.volume_ml == pytest.approx(ml, rel=1e-6)
    # The Content-Type, the bytes alone, and the bare .nii all say NIfTI; NIfTI is a scan's default answer.
    for kind, data in [("application/gzip", body), ("application/octet-stream", body),
                       ("application/x-nifti", read_nifti_bytes(body).to_bytes())]:
        r = post(url, "/v1/segment/volume", data, kind, sequences=KAGGLE_TEXT)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/gzip" and "_mask.nii.gz" in r.headers["content-disposition"]
        mask = read_nifti_bytes(r.content)
        np.testing.assert_array_equal(np.asanyarray(mask.dataobj), expected.volume.to_source(expected.masks))
        assert mask.shape == source.shape[:3] and mask.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(mask.affine, source.affine)
        np.testing.assert_array_equal(mask.header.get_sform(), source.header.get_sform())
        assert float(r.headers["X-Tumour-Volume-mL"]) == pytest.approx(ml, abs=1e-4)
        assert r.headers["X-Slices"] == "12" and int(r.headers["X-Tumour-Pixels"]) == int(expected.masks.sum())
    # Canonical slice order for the array formats, chosen by format= or by Accept.
    r = httpx.post(f"{url}/v1/segment/volume", content=body, timeout=60, params={"sequences": KAGGLE_TEXT},
                   headers={"Content-Type": "application/gzip", "Accept": "application/x-npy"})
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content), allow_pickle=False), expected.masks)
    r = post(url, "/v1/segment/volume", body, "application/gzip", sequences=KAGGLE_TEXT, format="tiff")
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(r.content)) // 255, expected.masks)
    assert float(r.headers["X-Tumour-Volume-mL"]) == pytest.approx(ml, abs=1e-4)
    # JSON: per-slice areas, the volume in mL from the spacing, and the FLAIR slices + mask layers as PNGs.
    r = post(url, "/v1/segment/volume", body, "application/gzip", sequences=KAGGLE_TEXT, format="json", layers="flair",
             overlay="true", sequence="flair")
    got = r.json()
    assert got["input"] == "nifti" and got["volume_ml"] == pytest.approx(ml, rel=1e-6)
    assert got["voxel_ml"] == pytest.approx(voxel_ml()) and got["spacing_mm"] == pytest.approx([3.0, 0.9, 0.8])
    assert got["slice_tumour_pixels"] == [int(m.sum()) for m in expected.masks]
    assert got["scan"]["source_shape"] == list(source.shape[:3]) and "inferior" in got["slice_order"]
    assert set(got["layers"]) == {"flair", "mask"} and len(got["layers"]["mask"]) == 12

    def png(url_: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(url_.split(",", 1)[1]))))

    for k in (0, int(np.argmax(expected.masks.sum((1, 2))))):
        np.testing.assert_array_equal(png(got["layers"]["flair"][k]), scan_images[k, ..., 1])
        np.testing.assert_array_equal(png(got["layers"]["mask"][k]), mask_rgba(expected.masks[k]))
        grey = np.repeat(scan_images[k, ..., 1:2], 3, axis=-1)
        np.testing.assert_array_equal(png(got["overlays"][k]), codecs.overlay(grey, expected.masks[k]))
    # A DICOM SEG needs a DICOM source: a clear 406, before the model runs.
    refused = post(url, "/v1/segment/volume", body, "application/gzip", sequences=KAGGLE_TEXT, format="dicom-seg")
    assert "DICOM" in assert_error(refused, 406)["detail"]
    r = httpx.post(f"{url}/v1/segment/volume", content=body, timeout=60, params={"sequences": KAGGLE_TEXT},
                   headers={"Content-Type": "application/gzip", "Accept": "application/dicom"})
    assert_error(r, 406)


def test_zipped_dicom_study_gives_a_seg_referencing_the_series(url: str, predictor, scan_images,
                                                                tmp_path: Path) -> None:
    import highdicom as hd
    import pydicom
    from scan_support import dicom_study, flair_headers, read_nifti_bytes, voxel_ml, zip_folder

    info = dicom_study(scan_images, tmp_path / "study")
    body = zip_folder(tmp_path / "study")
    expected = _expected(predictor, body)
    np.testing.assert_array_equal(expected.volume.images, scan_images)
    source_mask = expected.volume.to_source(expected.masks)  # (columns, rows, slices)
    flair = flair_headers(tmp_path / "study")
    for kind, params, accept in [("application/zip", {"format": "dicom-seg"}, None),
                                 ("application/dicom+zip", {}, "application/dicom"),
                                 ("application/octet-stream", {}, "application/dicom, application/json;q=0.5")]:
        r = httpx.post(f"{url}/v1/segment/volume", content=body, params=params, timeout=60,
                       headers={"Content-Type": kind, **({"Accept": accept} if accept else {})})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/dicom"
        ds = pydicom.dcmread(io.BytesIO(r.content))
        assert ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == flair[0].SeriesInstanceUID
        assert ds.StudyInstanceUID == info["study"]["StudyInstanceUID"]
        assert ds.FrameOfReferenceUID == info["study"]["FrameOfReferenceUID"]
        seg = hd.seg.segread(io.BytesIO(r.content))
        frames = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in flair], segment_numbers=[1],
                                                   combine_segments=True, assert_missing_frames_are_empty=True)
        np.testing.assert_array_equal(frames, source_mask.transpose(2, 1, 0))
        assert float(r.headers["X-Tumour-Volume-mL"]) == pytest.approx(expected.masks.sum() * voxel_ml(), abs=1e-4)
    r = post(url, "/v1/segment/volume", body, "application/zip")  # default for a scan: NIfTI in scanner space
    mask = read_nifti_bytes(r.content)
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), source_mask)
    np.testing.assert_allclose(mask.affine, info["affine"], atol=1e-4)
    got = post(url, "/v1/segment/volume", body, "application/zip", format="json").json()
    assert got["input"] == "dicom" and got["volume_ml"] == pytest.approx(expected.masks.sum() * voxel_ml(), rel=1e-5)


def test_slice_stacks_have_no_volume_in_ml_and_no_scan_formats(url: str, scan_images) -> None:
    data = codecs.encode_npy(scan_images)
    r = post(url, "/v1/segment/volume", data, "application/x-npy", format="json")
    got = r.json()
    assert got["input"] == "slices" and got["volume_ml"] is None and got["spacing_mm"] is None
    assert "X-Tumour-Volume-mL" not in r.headers
    assert "X-Tumour-Volume-mL" not in post(url, "/v1/segment/volume", data, "application/x-npy").headers
    assert "geometry" in assert_error(post(url, "/v1/segment/volume", data, "application/x-npy", format="nifti"),
                                      406)["detail"]
    assert_error(post(url, "/v1/segment/volume", codecs.encode_volume_tiff(scan_images), "image/tiff",
                      format="dicom-seg"), 406)
    r = httpx.post(f"{url}/v1/segment/volume", content=data, timeout=60,
                   headers={"Content-Type": "application/x-npy", "Accept": "text/html"})
    assert_error(r, 406)


def test_bad_scans_are_json_errors_and_the_server_keeps_serving(url: str, scan_images, tmp_path: Path) -> None:
    from scan_support import bad_bodies

    for name, (body, kind, status, code) in bad_bodies(scan_images, tmp_path).items():
        r = post(url, "/v1/segment/volume", body, kind, format="json")
        assert assert_error(r, status)["error"] == code, (name, r.text)
    assert_error(post(url, "/v1/segment/volume", b"%PDF-1.4", "application/pdf"), 415)
    assert_error(post(url, "/v1/segment/volume", b"%PDF-1.4 not a scan", "application/octet-stream"), 415)
    assert_error(post(url, "/v1/segment/volume", b"PK\x03\x04 broken zip", "application/zip"), 400)
    assert_error(post(url, "/v1/segment/volume", b"", "application/gzip"), 400)
    assert_error(post(url, "/v1/segment/volume", b"x", "application/gzip", format="dicom"), 400)
    assert_error(post(url, "/v1/segment/volume", b"x", "application/gzip", sequence="t2"), 400)
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    r = post(url, "/v1/segment/volume", codecs.encode_npy(scan_images), "application/x-npy", format="json")
    assert r.status_code == 200 and r.json()["slices"] == 12
