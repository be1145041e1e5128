"""Which DICOM series is which sequence, the same on every path: a study with two FLAIR-like series is refused
with a 422 listing both, and ``--series``/``series=`` (a SeriesNumber, a description or a UID, or
SEQUENCE=SERIES pairs) picks one, through core.formats, the HTTP API, the SageMaker handlers in a fresh
process, and the CLIs (`core predict`, `serve predict`, `serve batch`)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_random_bundle, sample_images
from sagemaker_sim import ATTRIBUTES, run_handlers
from serve_support import npy_answer, post_volume

from core.cli import dispatch
from core.formats import codecs
from core.inference.predictor import Predictor

NPY = codecs.NPY


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("series") / "bundle")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return sample_images(12, seed=7)


@pytest.fixture(scope="module")
def url(ray_session, bundle):
    from serve_support import serving

    from serve.app import ServeSettings

    with serving({"/": ServeSettings(bundle=str(bundle), max_slices=32)}) as urls:
        yield urls["/"]


@pytest.fixture(scope="module")
def two_flair(images, tmp_path_factory) -> dict:
    """The two-FLAIR study zipped, its series UIDs, and the same study without the sagittal series."""
    from scan_support import two_flair_study, zip_folder

    root = tmp_path_factory.mktemp("two_flair")
    uids = two_flair_study(images, root / "study")
    plain = root / "plain"
    shutil.copytree(root / "study", plain, ignore=lambda d, names: names if d.endswith("s3") else [])
    return {"zip": zip_folder(root / "study", root / "study.zip"), "path": root / "study.zip", "uids": uids,
            "plain": zip_folder(plain)}


def _lists_candidates(detail: str, uids: dict) -> None:
    """The 422 names both FLAIR-like series by UID, number, description, plane and slices."""
    for number, plane, slices in ((2, "axial", 12), (4, "sagittal", 64)):
        assert uids[number] in detail and f"series {number}" in detail, detail
        assert f"{plane}, {slices} slices" in detail, detail
    assert "'AX T2 FLAIR'" in detail and "'SAG 3D FLAIR'" in detail and "series=" in detail


def test_series_selectors_are_parsed_once() -> None:
    from core.inference.jobs import parse_series

    assert parse_series("2") == {"flair": "2"} and parse_series(["1.2.840.1"]) == {"flair": "1.2.840.1"}
    assert parse_series("flair=2,pre=1") == {"flair": "2", "pre": "1"} and parse_series(None) is None
    assert parse_series(["flair=AX T2, FLAIR"]) == {"flair": "AX T2, FLAIR"}  # a CLI value is never split
    with pytest.raises(codecs.DecodeError, match="SEQUENCE=SERIES") as err:
        parse_series("flair")
    assert err.value.status == 400 and err.value.error == "bad_series"


def test_choosing_a_series_in_core(two_flair) -> None:
    from core.formats.dicom import read_dicom
    from core.formats.volume import SeveralSeriesError

    with pytest.raises(SeveralSeriesError) as err:
        read_dicom(two_flair["zip"])
    assert err.value.status == 422
    _lists_candidates(err.value.detail, two_flair["uids"])
    plain = read_dicom(two_flair["plain"])
    for selector in ({"flair": "2"}, {"flair": two_flair["uids"][2]}):
        picked = read_dicom(two_flair["zip"], series=selector)
        np.testing.assert_array_equal(picked.images, plain.images)  # pre and post still found by description
        assert picked.filled == () and any("'SAG 3D FLAIR'" in n and "ignored" in n for n in picked.notes)


def test_choosing_a_series_over_http(url, two_flair, tmp_path) -> None:
    from scan_support import nifti_scan

    r = post_volume(url, two_flair["zip"], "application/zip")
    assert r.status_code == 422 and r.json()["error"] == "several_series", r.text
    _lists_candidates(r.json()["detail"], two_flair["uids"])
    expected = npy_answer(post_volume(url, two_flair["plain"], "application/zip", format="npy"))
    assert expected.any()
    for selector in ("2", two_flair["uids"][2], "flair=2,pre=1,post=3"):
        np.testing.assert_array_equal(npy_answer(post_volume(url, two_flair["zip"], "application/zip", format="npy",
                                                 series=selector)), expected)
    r = post_volume(url, two_flair["zip"], "application/zip", series="flair")
    assert r.status_code == 400 and r.json()["error"] == "bad_series", r.text
    scan = nifti_scan(sample_images(4), tmp_path / "case.nii.gz").read_bytes()
    r = post_volume(url, scan, "application/gzip", series="2", sequences="pre,flair,post")
    assert r.status_code == 400 and r.json()["error"] == "bad_series" and "NIfTI" in r.json()["detail"], r.text


def test_choosing_a_series_through_sagemaker(bundle, two_flair, aws, tmp_path) -> None:
    import boto3
    from sagemaker_sim import BUCKET

    boto3.client("s3").put_object(Bucket=BUCKET, Key="studies/two.zip", Body=two_flair["zip"])
    zipped, js = "application/zip", codecs.JSON
    s3 = {"s3_uri": f"s3://{BUCKET}/studies/two.zip", "format": "npy", "series": two_flair["uids"][2]}
    res = run_handlers(bundle, {
        "plain": (two_flair["plain"], zipped, NPY, {}), "refused": (two_flair["zip"], zipped, js, {}),
        "number": (two_flair["zip"], zipped, NPY, {ATTRIBUTES: "series=2"}),
        "s3": (json.dumps(s3).encode(), js, js, {}),
        "slices": (codecs.encode_npy(sample_images(3)), NPY, NPY, {ATTRIBUTES: "series=2"}),
    }, tmp_path, aws["env"])
    r, out = res["refused"]
    refusal = json.loads(out.decode().split("\n", 1)[0])  # the error JSON Serve answers
    assert r["status"] == 422 and refusal["error"] == "several_series", out[:300]
    _lists_candidates(refusal["detail"], two_flair["uids"])
    expected = np.load(io.BytesIO(res["plain"][1]))
    np.testing.assert_array_equal(np.load(io.BytesIO(res["number"][1])), expected)
    written = boto3.client("s3").get_object(Bucket=BUCKET, Key="studies/two_mask.npy")["Body"].read()
    assert res["s3"][0]["status"] == 200, res["s3"][1][:300]
    np.testing.assert_array_equal(np.load(io.BytesIO(written)), expected)
    assert res["slices"][0]["status"] == 400 and b"bad_series" in res["slices"][1]


def test_choosing_a_series_in_the_clis(url, bundle, two_flair, tmp_path) -> None:
    from core.formats.load import load_volume
    from core.inference.results import segment_volume

    expected = segment_volume(Predictor.from_bundle(bundle, "cpu"), load_volume(two_flair["plain"]))
    study = str(two_flair["path"])
    core = ["predict", "--bundle", str(bundle), "--device", "cpu", study]
    assert dispatch("core", "", ["core.inference.cli"], [*core, "--out", str(tmp_path / "refused")]) == 2
    assert dispatch("core", "", ["core.inference.cli"], [*core, "--out", str(tmp_path / "core"), "--series", "2"]) == 0
    assert json.loads((tmp_path / "core" / "study_volume.json").read_text())["tumour_pixels"] == expected.masks.sum()
    argv = ["predict", "--url", url, study, "--out", str(tmp_path / "serve")]
    assert dispatch("python -m serve", "", ["serve.client"], argv) == 1
    assert "several_series" in json.loads((tmp_path / "serve" / "summary.json").read_text())[0]["error"]
    assert dispatch("python -m serve", "", ["serve.client"], [*argv, "--series", two_flair["uids"][2]]) == 0
    assert json.loads((tmp_path / "serve" / "study.json").read_text())["tumour_pixels"] == expected.masks.sum()


def test_choosing_a_series_in_serve_batch(ray_session, bundle, two_flair, tmp_path) -> None:
    from serve.batch.run import BatchOptions, run_batch

    (tmp_path / "cohort").mkdir()
    shutil.copy(two_flair["path"], tmp_path / "cohort" / "study.zip")
    for name, series in (("refused", None), ("picked", {"flair": "2"})):
        summary = run_batch(BatchOptions(bundle=str(bundle), src=str(tmp_path / "cohort"), out=str(tmp_path / name),
                                         workers=1, batch_size=8, progress=False, series=series))
        if series is None:
            failed = summary["failed"][0]
            assert failed["error_code"] == "several_series" and "SAG 3D FLAIR" in failed["error"]
        else:
            assert summary["segmented"] == ["study"], summary
