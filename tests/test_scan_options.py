"""What a client says about its scan, the same on every path: a slice stack's spacing (``spacing=z,y,x``,
``--spacing``, a SageMaker custom attribute or JSON field) and a NIfTI's sequence names (``sequences=``, a
dataset.json or the file name; never guessed), with the answer's notes beside binary answers (NIfTI, DICOM
SEG). Each is checked through the HTTP API, the SageMaker handlers in a fresh process, and the CLIs
(`core predict`, `serve predict`, `serve batch`). Choosing a DICOM series is tests/test_scan_series.py."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from bundle_factory import make_random_bundle, sample_images
from PIL import Image
from sagemaker_sim import ATTRIBUTES, run_handlers
from serve_support import npy_answer, post_volume
from volume_support import strip_attributes

from core.cli import dispatch
from core.formats import codecs
from core.inference.predictor import Predictor
from core.inference.results import result_json
from core.inference.spacing import parse_spacing, scan_spacing, stack_spacing

FINE = (1.0, 0.5, 0.5)  # a 1 mm, 0.5 mm in-plane stack: 1/17 of a Kaggle voxel's volume
FINE_TEXT = "1,0.5,0.5"
KAGGLE_TEXT = "5,0.9375,0.9375"
# 40 mm3: on the Kaggle grid (4.4 mm3 a voxel) the network's small components stay, at FINE (0.25 mm3) they go;
# 2 mm2 does the same for a slice posted alone (0.88 mm2 a Kaggle pixel, 0.25 mm2 at FINE)
RULES = {"min_volume_mm3": 40.0, "min_area_slice_mm2": 2.0}
NPY = codecs.NPY


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("options") / "bundle", postprocess=RULES)


@pytest.fixture(scope="module")
def predictor(bundle) -> Predictor:
    return Predictor.from_bundle(bundle, "cpu")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return sample_images(12, seed=7)


@pytest.fixture(scope="module")
def expected(predictor, images) -> dict[str, np.ndarray]:
    """The Predictor's masks at the fine spacing and at the assumed (Kaggle) one: different, so a path that
    ignores the spacing shows."""
    out = {"fine": predictor.segment(images, spacing=FINE).masks, "assumed": predictor.segment(images).masks}
    assert out["fine"].sum() > 0 and not np.array_equal(out["fine"], out["assumed"])
    return out


@pytest.fixture(scope="module")
def url(ray_session, bundle):
    from serve_support import serving

    from serve.app import ServeSettings

    with serving({"/": ServeSettings(bundle=str(bundle), max_slices=32)}) as urls:
        yield urls["/"]


# ------------------------------------------------------------------------------------------------ core


def test_spacing_is_parsed_once_and_refused_clearly() -> None:
    assert parse_spacing(" 1, 0.5,0.5") == FINE and parse_spacing([1, 0.5, 0.5]) == FINE
    assert parse_spacing(None) is None and parse_spacing("") is None
    for bad in ("1,2", "a,b,c", "0,1,1", "-1,1,1", "1,1,nan", "1,1,500", [1, 2]):
        with pytest.raises(codecs.DecodeError) as err:
            parse_spacing(bad)
        assert err.value.status == 400 and err.value.error == "bad_spacing" and "z,y,x" in err.value.detail
    assumed, given = stack_spacing(None), stack_spacing(FINE)
    assert not assumed.known and assumed.text() == KAGGLE_TEXT and "assumed" in assumed.note()
    assert assumed.headers() == {"X-Spacing-mm": KAGGLE_TEXT, "X-Spacing-Assumed": KAGGLE_TEXT}
    assert given.known and given.note() is None and given.headers() == {"X-Spacing-mm": FINE_TEXT}


def test_result_json_gives_ml_only_where_the_spacing_is_known() -> None:
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[1, :2, :3] = 1
    names = ["background", "tumour"]
    known = result_json(masks, "v", names, spacing=stack_spacing(FINE))
    assert known["volume_ml"] == pytest.approx(6 * 0.25 / 1000) and known["spacing_mm"] == list(FINE)
    assert known["class_ml"] == {"tumour": pytest.approx(6 * 0.25 / 1000)} and known["notes"] == []
    assumed = result_json(masks, "v", names, spacing=stack_spacing(None))
    assert assumed["volume_ml"] is None and assumed["spacing_mm"] is None and assumed["voxel_ml"] is None
    assert len(assumed["notes"]) == 1 and KAGGLE_TEXT in assumed["notes"][0]


def test_a_scan_keeps_its_header_spacing(tmp_path) -> None:
    from scan_support import nifti_scan

    from core.formats.load import load_volume

    volume = load_volume(nifti_scan(sample_images(4), tmp_path / "case.nii.gz"), sequences=["pre", "flair", "post"])
    assert scan_spacing(volume).mm == pytest.approx((3.0, 0.9, 0.8)) and scan_spacing(volume).known
    assert scan_spacing(volume, (3.0, 0.9, 0.8)).source == "scan"
    with pytest.raises(codecs.DecodeError) as err:
        scan_spacing(volume, FINE)
    assert err.value.status == 422 and err.value.error == "spacing_conflict" and "3,0.9,0.8" in err.value.detail


# ------------------------------------------------------------------------------------------------ HTTP


def test_slice_stack_spacing_over_http(url, images, expected, tmp_path) -> None:
    from scan_support import nifti_scan

    body = codecs.encode_npy(images)
    r = post_volume(url, body, NPY, format="npy", spacing=FINE_TEXT)
    np.testing.assert_array_equal(npy_answer(r), expected["fine"])  # the mm3 rule at the real spacing
    assert r.headers["X-Spacing-mm"] == FINE_TEXT and "X-Spacing-Assumed" not in r.headers
    assert float(r.headers["X-Tumour-Volume-mL"]) == pytest.approx(expected["fine"].sum() * 0.25e-3, abs=1e-4)
    r = post_volume(url, body, NPY, format="npy")
    np.testing.assert_array_equal(npy_answer(r), expected["assumed"])
    assert r.headers["X-Spacing-Assumed"] == KAGGLE_TEXT and "X-Tumour-Volume-mL" not in r.headers
    assert any("assumed" in n for n in json.loads(r.headers["X-Notes"]))  # the binary answer says it too
    told = post_volume(url, body, NPY, format="json", spacing=FINE_TEXT).json()
    assert told["volume_ml"] == pytest.approx(expected["fine"].sum() * 0.25e-3) and told["notes"] == []
    assert told["spacing_mm"] == list(FINE)
    untold = post_volume(url, body, NPY, format="json").json()
    assert untold["volume_ml"] is None and any(KAGGLE_TEXT in n for n in untold["notes"])
    r = post_volume(url, body, NPY, spacing="1,2")
    assert r.status_code == 400 and r.json()["error"] == "bad_spacing", r.text
    scan = nifti_scan(images, tmp_path / "case.nii.gz").read_bytes()
    r = post_volume(url, scan, "application/gzip", sequences="pre,flair,post", spacing=FINE_TEXT)
    assert r.status_code == 422 and r.json()["error"] == "spacing_conflict", r.text
    r = post_volume(url, scan, "application/gzip", sequences="pre,flair,post", spacing="3,0.9,0.8", format="json")
    assert r.status_code == 200 and r.headers["X-Spacing-mm"] == "3,0.9,0.8", r.text


# ------------------------------------------------------------------------------------------- SageMaker


def test_slice_stack_spacing_through_sagemaker(bundle, images, expected, aws, tmp_path) -> None:
    import boto3
    from sagemaker_sim import BUCKET

    body = codecs.encode_npy(images)
    boto3.client("s3").put_object(Bucket=BUCKET, Key="stacks/p.npy", Body=body)
    fine = {ATTRIBUTES: f"spacing={FINE_TEXT}"}
    s3 = {"s3_uri": f"s3://{BUCKET}/stacks/p.npy", "format": "npy", "spacing": list(FINE)}
    res = run_handlers(bundle, {
        "fine": (body, NPY, NPY, fine), "assumed": (body, NPY, NPY, {}),
        "fine_json": (body, NPY, codecs.JSON, fine), "assumed_json": (body, NPY, codecs.JSON, {}),
        "s3": (json.dumps(s3).encode(), codecs.JSON, codecs.JSON, {}),
        "bad": (body, NPY, NPY, {ATTRIBUTES: "spacing=1,2"}),
    }, tmp_path, aws["env"])
    r, out = res["fine"]
    assert r["status"] == 200, out[:300]
    np.testing.assert_array_equal(np.load(io.BytesIO(out)), expected["fine"])
    attributes = r["headers"][ATTRIBUTES]
    assert f"spacing_mm={FINE_TEXT}" in attributes and "volume_ml=" in attributes and "notes=" not in attributes
    r, out = res["assumed"]
    np.testing.assert_array_equal(np.load(io.BytesIO(out)), expected["assumed"])
    attributes = r["headers"][ATTRIBUTES]
    assert f"spacing_assumed={KAGGLE_TEXT}" in attributes and "volume_ml" not in attributes
    assert "assumed" in json.loads(attributes.split("notes=", 1)[1])[0]
    told = json.loads(res["fine_json"][1])
    assert told["volume_ml"] == pytest.approx(expected["fine"].sum() * 0.25e-3) and told["notes"] == []
    untold = json.loads(res["assumed_json"][1])
    assert untold["volume_ml"] is None and any(KAGGLE_TEXT in n for n in untold["notes"])
    from_s3 = json.loads(res["s3"][1])
    assert from_s3["volume_ml"] == pytest.approx(told["volume_ml"]) and from_s3["spacing_mm"] == list(FINE)
    r, out = res["bad"]
    assert r["status"] == 400 and b"bad_spacing" in out, out[:300]


# ------------------------------------------------------------------------------------------------ CLIs


def _patient_folder(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for k, image in enumerate(images):
        tifffile.imwrite(folder / f"p_{k + 1}.tif", image)
    return folder


def test_core_predict_spacing(bundle, images, expected, tmp_path) -> None:
    folder = _patient_folder(images, tmp_path / "p")
    base = ["predict", "--bundle", str(bundle), "--device", "cpu", str(folder)]
    assert dispatch("core", "", ["core.inference.cli"], [*base, "--out", str(tmp_path / "fine"),
                                                         "--spacing", FINE_TEXT]) == 0
    assert dispatch("core", "", ["core.inference.cli"], [*base, "--out", str(tmp_path / "assumed")]) == 0
    for name, ml in (("fine", expected["fine"].sum() * 0.25e-3), ("assumed", None)):
        summary = json.loads((tmp_path / name / "p_volume.json").read_text())
        rows = list(csv.DictReader(io.StringIO((tmp_path / name / "predictions.csv").read_text())))
        assert summary["tumour_pixels"] == int(expected[name].sum())
        if ml is None:
            assert summary["volume_ml"] is None and "assumed" in summary["notes"][0]
            assert all(r["volume_ml"] == "" and "assumed" in r["notes"] for r in rows)
        else:
            assert summary["volume_ml"] == pytest.approx(ml) and summary["notes"] == []
            assert sum(float(r["volume_ml"]) for r in rows) == pytest.approx(ml, abs=1e-5)
    assert dispatch("core", "", ["core.inference.cli"], [*base, "--out", str(tmp_path / "x"), "--spacing", "1"]) == 2


def test_serve_predict_spacing(url, images, expected, tmp_path) -> None:
    folder = _patient_folder(images, tmp_path / "p")
    for name, extra in (("fine", ["--spacing", FINE_TEXT]), ("assumed", [])):
        argv = ["predict", "--url", url, str(folder), "--out", str(tmp_path / name), *extra]
        assert dispatch("python -m serve", "", ["serve.client"], argv) == 0
        said = json.loads((tmp_path / name / "p.json").read_text())
        assert said["tumour_pixels"] == int(expected[name].sum())
        if name == "fine":
            assert said["volume_ml"] == pytest.approx(expected["fine"].sum() * 0.25e-3, abs=1e-4)
            assert said["spacing_mm"] == list(FINE) and said["notes"] == []
        else:
            assert said["volume_ml"] is None and said["spacing_assumed"] and "assumed" in said["notes"][0]


def test_serve_batch_spacing(ray_session, bundle, images, expected, tmp_path) -> None:
    from serve.batch.run import BatchOptions, run_batch

    _patient_folder(images, tmp_path / "cohort" / "p")
    for name, spacing in (("fine", FINE), ("assumed", None)):
        out = tmp_path / name
        summary = run_batch(BatchOptions(bundle=str(bundle), src=str(tmp_path / "cohort"), out=str(out), workers=1,
                                         batch_size=8, progress=False, spacing=spacing))
        assert summary["segmented"] == ["p"], summary
        record = json.loads((out / "p" / "patient.json").read_text())
        row = next(csv.DictReader(io.StringIO((out / "patients.csv").read_text())))
        assert record["tumour_pixels"] == int(expected[name].sum())
        if spacing:
            assert record["volume_ml"] == pytest.approx(expected["fine"].sum() * 0.25e-3)
            assert float(row["volume_ml"]) == pytest.approx(record["volume_ml"])
        else:
            assert record["volume_ml"] is None and row["volume_ml"] == "" and "assumed" in record["notes"][0]


# ------------------------------------------------------------------------------- unnamed sequences (item 6)

NAMED = "case_t1_flair_t1ce"  # a 4D NIfTI whose file name names its three channels in order


def _unnamed_refused(error: str, detail: str) -> None:
    assert error == "unnamed_sequences" and "sequences=" in detail and "dataset.json" in detail, detail
    assert "file name" in detail and "3 channels" in detail


def test_unnamed_sequences_over_http(url, images, tmp_path) -> None:
    from scan_support import dicom_study, nifti_scan, zip_folder

    scan = nifti_scan(images, tmp_path / "case.nii.gz").read_bytes()
    r = post_volume(url, scan, "application/gzip")
    assert r.status_code == 422, r.text
    _unnamed_refused(r.json()["error"], r.json()["detail"])
    named = httpx.post(f"{url}/v1/segment/volume", content=scan, params={"format": "json"}, timeout=120,
                       headers={"Content-Type": "application/gzip",
                                "Content-Disposition": f'attachment; filename="{NAMED}.nii.gz"'}).json()
    told = post_volume(url, scan, "application/gzip", sequences="pre,flair,post", format="json").json()
    assert named["masks_rle"] == told["masks_rle"] and named["tumour_pixels"] > 0
    assert any("the file name" in n for n in named["notes"]) and any("given sequence" in n for n in told["notes"])
    r = post_volume(url, scan, "application/gzip", sequences="pre,flair,post", format="nifti")
    assert r.status_code == 200 and json.loads(r.headers["X-Notes"]) == told["notes"], r.text
    dicom_study(images, tmp_path / "study")
    strip_attributes(tmp_path / "study", ("PatientSex",))  # anonymised: the answer notes it
    study = zip_folder(tmp_path / "study")
    answer = post_volume(url, study, "application/zip", format="json").json()
    for fmt in ("dicom-seg", "nifti"):  # the notes of the JSON answer beside each binary one
        r = post_volume(url, study, "application/zip", format=fmt)
        assert r.status_code == 200 and json.loads(r.headers["X-Notes"]) == answer["notes"], r.text
    assert answer["notes"] == answer["scan"]["notes"] and answer["notes"]


def test_unnamed_sequences_through_sagemaker(bundle, images, aws, tmp_path) -> None:
    import boto3
    from sagemaker_sim import BUCKET
    from scan_support import dicom_study, nifti_scan, zip_folder

    scan = nifti_scan(images, tmp_path / "case.nii.gz").read_bytes()
    dicom_study(images, tmp_path / "study")
    strip_attributes(tmp_path / "study", ("PatientSex",))  # anonymised: the answer notes it
    study = zip_folder(tmp_path / "study")
    boto3.client("s3").put_object(Bucket=BUCKET, Key="scans/case.nii.gz", Body=scan)
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"scans/{NAMED}.nii.gz", Body=scan)
    named = {ATTRIBUTES: "sequences=pre,flair,post"}
    gz, js = "application/gzip", codecs.JSON
    res = run_handlers(bundle, {
        "unnamed": (scan, gz, js, {}), "named_json": (scan, gz, js, named), "named_nifti": (scan, gz, gz, named),
        "s3_unnamed": (json.dumps({"s3_uri": f"s3://{BUCKET}/scans/case.nii.gz"}).encode(), js, js, {}),
        "s3_file_name": (json.dumps({"s3_uri": f"s3://{BUCKET}/scans/{NAMED}.nii.gz"}).encode(), js, js, {}),
        "dicom_json": (study, "application/zip", js, {}),
        "dicom_seg": (study, "application/zip", "application/dicom", {}),
    }, tmp_path, aws["env"])
    for name in ("unnamed", "s3_unnamed"):
        r, out = res[name]
        assert r["status"] == 422, out[:300]
        refusal = json.loads(out.decode().split("\n", 1)[0])  # the error JSON Serve answers
        _unnamed_refused(refusal["error"], refusal["detail"])
    for json_case, binary_case in (("named_json", "named_nifti"), ("dicom_json", "dicom_seg")):
        r, out = res[binary_case]
        assert r["status"] == 200, out[:300]
        notes = json.loads(res[json_case][1])["notes"]
        assert notes and json.loads(r["headers"][ATTRIBUTES].split("notes=", 1)[1]) == notes
    assert any("the file name" in n for n in json.loads(res["s3_file_name"][1])["notes"])


def test_unnamed_sequences_in_the_clis(url, bundle, images, tmp_path) -> None:
    from scan_support import nifti_scan

    scans = tmp_path / "in"
    scans.mkdir()
    nifti_scan(images, scans / "case.nii.gz")
    core = ["predict", "--bundle", str(bundle), "--device", "cpu", str(scans / "case.nii.gz")]
    assert dispatch("core", "", ["core.inference.cli"], [*core, "--out", str(tmp_path / "refused")]) == 2
    assert dispatch("core", "", ["core.inference.cli"], [*core, "--out", str(tmp_path / "core"),
                                                         "--sequences", "pre,flair,post"]) == 0
    side = json.loads((tmp_path / "core" / "case_volume.json").read_text())  # the notes beside the NIfTI mask
    assert any("given sequence names" in n for n in side["notes"])
    assert (tmp_path / "core" / "case_mask.nii.gz").is_file()
    argv = ["predict", "--url", url, str(scans / "case.nii.gz"), "--out", str(tmp_path / "serve")]
    assert dispatch("python -m serve", "", ["serve.client"], argv) == 1
    assert "unnamed_sequences" in json.loads((tmp_path / "serve" / "summary.json").read_text())[0]["error"]
    assert dispatch("python -m serve", "", ["serve.client"], [*argv, "--sequences", "pre,flair,post"]) == 0
    served = json.loads((tmp_path / "serve" / "case.json").read_text())
    assert served["tumour_pixels"] == side["tumour_pixels"] and len(served["notes"]) == len(side["notes"])
    assert any("given sequence names" in n for n in served["notes"])  # the side file beside the NIfTI mask


def test_unnamed_sequences_in_serve_batch(ray_session, bundle, images, tmp_path) -> None:
    from scan_support import nifti_scan

    from serve.batch.run import BatchOptions, run_batch

    (tmp_path / "cohort").mkdir()
    nifti_scan(images, tmp_path / "cohort" / "case.nii.gz")
    summary = run_batch(BatchOptions(bundle=str(bundle), src=str(tmp_path / "cohort"), out=str(tmp_path / "out"),
                                     workers=1, batch_size=8, progress=False))
    assert [f["patient"] for f in summary["failed"]] == ["case"]
    assert "unnamed_sequences" in summary["failed"][0]["error"]
    assert summary["failed"][0]["error_code"] == "unnamed_sequences"  # the code Serve and SageMaker answer


def test_a_slice_posted_alone_is_post_processed_at_its_spacing_on_every_path(url, bundle, predictor, images, aws,
                                                                             tmp_path) -> None:
    """The one-slice mm2 rules at the given pixel size: /v1/segment, SageMaker, `core predict`, `serve predict`."""
    image = images[3]
    fine, assumed = (predictor.predict(image[None], spacing=s)[0] for s in (FINE, None))
    assert fine.sum() > 0 and not np.array_equal(fine, assumed)  # a path that ignores the spacing shows
    body = io.BytesIO()
    tifffile.imwrite(body, image)
    tiff = body.getvalue()
    got = {"http": npy_answer(httpx.post(f"{url}/v1/segment", content=tiff, headers={"Content-Type": "image/tiff"},
                                   params={"format": "npy", "spacing": FINE_TEXT}, timeout=120))}
    res = run_handlers(bundle, {"fine": (tiff, "image/tiff", NPY, {ATTRIBUTES: f"spacing={FINE_TEXT}"})}, tmp_path,
                       aws["env"])
    got["sagemaker"] = np.load(io.BytesIO(res["fine"][1])).reshape(fine.shape)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "s.tif").write_bytes(tiff)
    assert dispatch("core", "", ["core.inference.cli"], ["predict", "--bundle", str(bundle), "--device", "cpu",
                    str(tmp_path / "in" / "s.tif"), "--out", str(tmp_path / "core"), "--spacing", FINE_TEXT]) == 0
    assert dispatch("python -m serve", "", ["serve.client"], ["predict", "--url", url, str(tmp_path / "in" / "s.tif"),
                    "--out", str(tmp_path / "client"), "--spacing", FINE_TEXT]) == 0
    for name in ("core", "client"):
        got[name] = np.asarray(Image.open(tmp_path / name / "s_mask.png"))
    for name, mask in got.items():
        np.testing.assert_array_equal(np.asarray(mask) > 0, fine > 0, err_msg=name)

