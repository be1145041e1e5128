"""SageMaker path: archive layout and the archive's handlers in a fresh process through the inference
toolkit (S3 on a local moto server). The boto3 deployment commands are tests/test_sagemaker_deploy.py."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from bundle_factory import make_random_bundle, sample_images
from PIL import Image
from sagemaker_sim import BUCKET, run_container
from scan_support import KAGGLE, KAGGLE_TEXT

from core.formats import codecs
from core.inference.predictor import Predictor
from serve.sagemaker.export import build_archive, core_closure, core_dir, module_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("sm") / "bundle")


@pytest.fixture(scope="module")
def archive(bundle, tmp_path_factory) -> Path:
    return build_archive(bundle, tmp_path_factory.mktemp("sm_archive") / "model.tar.gz")


@pytest.fixture(scope="module")
def predictor(bundle) -> Predictor:
    return Predictor.from_bundle(bundle, "cpu")




def run_cases(archive: Path, cases: dict[str, tuple], tmp_path: Path, env: dict[str, str]) -> str:
    """The extracted archive's handlers on each (body, content type, accept[, request headers]) in a fresh
    process; the answers land in ``tmp_path/<name>.out``; returns the driver's stdout."""
    spec = []
    for name, (body, ctype, accept, *headers) in cases.items():
        (tmp_path / name).write_bytes(body)
        spec.append({"body": str(tmp_path / name), "content_type": ctype, "accept": accept,
                     "headers": headers[0] if headers else {}})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    model_dir = tmp_path / "opt_ml_model"
    with tarfile.open(archive) as tar:
        tar.extractall(model_dir, filter="data")
    return run_container(model_dir, tmp_path / "spec.json", tmp_path, env)

def test_archive_layout_is_self_contained_and_reproducible(bundle, archive, tmp_path):
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        code = {n: tar.extractfile(n).read().decode() for n in names if n.startswith("code/") and n.endswith(".py")}
        reqs = tar.extractfile("code/requirements.txt").read().decode()
        manifest = json.loads(tar.extractfile("code/MANIFEST.json").read())
    assert {"model.safetensors", "config.json", "metrics.json", "code/inference.py", "code/requirements.txt"} <= names
    root = core_dir()
    vendored = {f"code/gliomaseg_core/{module_path(m, root).relative_to(root).as_posix()}" for m in core_closure()}
    assert vendored <= names and "code/gliomaseg_core/formats/codecs.py" in names
    for name, text in code.items():  # only the vendored package, never gliomaseg's own, and no pickle
        assert "from core" not in text and "import core" not in text, name
        assert "import pickle" not in text and "allow_pickle=True" not in text and "torch.load(" not in text, name
    pins = [ln for ln in reqs.splitlines() if ln and not ln.startswith("#")]
    assert pins and all("==" in ln for ln in pins) and any(ln.startswith("monai==") for ln in pins)
    assert manifest["model_version"] == json.loads((bundle / "config.json").read_text())["version"]
    assert build_archive(bundle, tmp_path / "again.tar.gz").read_bytes() == archive.read_bytes()


_npy, _tiff, _png = codecs.encode_npy, codecs.encode_volume_tiff, codecs.encode_png


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # the attack, not our code
    return buf.getvalue()


def test_archive_handlers_in_fresh_process_match_predictor(archive, predictor, aws, tmp_path):
    import boto3

    vol = sample_images(6, seed=3)
    one = vol[2]
    odd = sample_images(1, 80, 96, seed=5)[0]  # not the model size: resize path
    s3 = boto3.client("s3")
    s3.put_object(Bucket=BUCKET, Key="in/patient_vol.tif", Body=_tiff(vol))
    s3.put_object(Bucket=BUCKET, Key="in/slice.png", Body=_png(one))
    cases = {
        "npy_one": (_npy(one), "application/x-npy", "application/x-npy"),
        "npy_vol": (_npy(vol), "application/x-npy", "application/x-npy"),
        "npy_slices": (_npy(vol), "application/x-npy; volume=false", "application/x-npy"),
        "tiff_one_odd": (_tiff(odd[None]), "image/tiff", "image/png"),
        "tiff_vol": (_tiff(vol), "image/tiff", "image/tiff"),
        "png_json": (_png(one), "image/png", "application/json"),
        "png_any": (_png(one), "image/png", "*/*"),
        "s3_vol": (json.dumps({"s3_uri": f"s3://{BUCKET}/in/patient_vol.tif", "output_prefix": f"s3://{BUCKET}/out/"})
                   .encode(), "application/json", "application/json"),
        "s3_next_to_input": (json.dumps({"s3_uri": f"s3://{BUCKET}/in/slice.png"}).encode(), "application/json", None),
        # bad requests: the toolkit must answer 4xx with our message, and keep serving
        "garbage_png": (b"\x89PNG\r\n\x1a\nnot really", "image/png", "application/json"),
        "csv": (b"1,2,3", "text/csv", "application/json"),
        "pickle": (_pickled_npy(), "application/x-npy", "application/json"),
        "tiny": (_npy(one[:16, :16]), "application/x-npy", "application/json"),
        "png_for_volume": (_npy(vol), "application/x-npy", "image/png"),
        "html": (_npy(one), "application/x-npy", "text/html"),
        "json_no_uri": (b'{"bucket": "x"}', "application/json", None),
        "s3_missing": (json.dumps({"s3_uri": f"s3://{BUCKET}/in/nope.tif"}).encode(), "application/json", None),
        "after_errors": (_npy(one), "application/x-npy", "application/x-npy"),
    }
    stdout = run_cases(archive, cases, tmp_path, aws["env"])
    results = json.loads(stdout.split("RESULTS", 1)[1])
    origin = results.pop()
    assert origin["vendored"].startswith(str(tmp_path / "opt_ml_model" / "code" / "gliomaseg_core"))
    assert origin["inference"] == str(tmp_path / "opt_ml_model" / "code" / "inference.py")
    assert not origin["core_loaded"] and not origin["serve_loaded"]
    res = {name: (r, (tmp_path / f"{name}.out").read_bytes()) for name, r in zip(cases, results, strict=True)}

    def ok(name: str, ctype: str) -> bytes:
        r, body = res[name]
        assert (r["status"], r["content_type"]) == (200, ctype), (name, r, body[:300])
        return body

    def load_npy(b: bytes) -> np.ndarray:
        return np.load(io.BytesIO(b), allow_pickle=False)

    np.testing.assert_array_equal(load_npy(ok("npy_one", "application/x-npy")), predictor.predict(one))
    expected_vol = predictor.predict(vol, volume=True)
    assert not np.array_equal(expected_vol, predictor.predict(vol, volume=False))  # the flag matters here
    np.testing.assert_array_equal(load_npy(ok("npy_vol", "application/x-npy")), expected_vol)
    np.testing.assert_array_equal(load_npy(ok("npy_slices", "application/x-npy")), predictor.predict(vol))
    png = np.asarray(Image.open(io.BytesIO(ok("tiff_one_odd", "image/png"))))
    np.testing.assert_array_equal(png, predictor.predict(odd)[0] * 255)
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(ok("tiff_vol", "image/tiff"))), expected_vol * 255)
    for name in ("png_json", "png_any"):  # */* falls back to the container's default accept (JSON)
        summary = json.loads(ok(name, "application/json"))
        mask = predictor.predict(one)[0]
        np.testing.assert_array_equal(codecs.rle_decode(summary["masks_rle"][0]), mask)
        assert summary["tumour_pixels"] == int(mask.sum()) and summary["slices"] == 1 and summary["volume"] is False

    s3_out = json.loads(ok("s3_vol", "application/json"))
    assert s3_out["mask_uri"] == f"s3://{BUCKET}/out/patient_vol_mask.tiff" and s3_out["volume"] is True
    written = s3.get_object(Bucket=BUCKET, Key="out/patient_vol_mask.tiff")["Body"].read()
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(written)), expected_vol * 255)
    assert s3_out["slice_tumour_pixels"] == [int(m.sum()) for m in expected_vol] and s3_out["masks_rle"] is None
    nxt = json.loads(ok("s3_next_to_input", "application/json"))
    assert nxt["mask_uri"] == f"s3://{BUCKET}/in/slice_mask.png"
    written = s3.get_object(Bucket=BUCKET, Key="in/slice_mask.png")["Body"].read()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(written))), predictor.predict(one)[0] * 255)

    expected_status = {"garbage_png": 400, "csv": 415, "pickle": 422, "tiny": 422, "png_for_volume": 406,
                       "html": 406, "json_no_uri": 400, "s3_missing": 404}
    for name, status in expected_status.items():
        r, body = res[name]
        assert r["status"] == status, (name, r, body[:500])
        assert body.strip() and b"Traceback" not in body.split(b"\n", 1)[0], name  # message first
    np.testing.assert_array_equal(load_npy(ok("after_errors", "application/x-npy")), predictor.predict(one))


def test_repo_root_not_needed_for_template():
    """The template imports only the vendored package (checked textually; it is not importable here)."""
    text = (REPO / "serve" / "sagemaker" / "inference.py").read_text()
    assert "from gliomaseg_core" in text and "from core" not in text and "import serve" not in text


def test_archive_handlers_take_nifti_and_dicom_scans(archive, predictor, aws, tmp_path):
    """NIfTI and zipped DICOM bodies (by type and by bytes) and S3 URIs through the archive's handlers in a
    fresh process: the masks of `core predict` (segment_volume) as NIfTI on the source grid, DICOM SEG, NPY
    and JSON with the volume in mL; bad scans answered with their 4xx; the endpoint keeps serving."""
    import boto3
    import highdicom as hd
    import nibabel as nib
    import pydicom
    from scan_support import bad_bodies, dicom_study, flair_headers, nifti_scan, read_nifti_bytes, voxel_ml, zip_folder
    from volume_support import reorient, write_nifti

    from core.formats.load import load_volume
    from core.inference.results import segment_volume

    vol = sample_images(10, seed=9)
    nii_path = nifti_scan(vol, tmp_path / "case.nii.gz")
    nii = nii_path.read_bytes()
    info = dicom_study(vol, tmp_path / "study")
    dcm = zip_folder(tmp_path / "study")
    from_nifti = segment_volume(predictor, load_volume(nii, sequences=KAGGLE))
    from_dicom = segment_volume(predictor, load_volume(dcm))
    assert 0 < from_nifti.masks.sum() < from_nifti.masks.size
    s3 = boto3.client("s3")
    s3.put_object(Bucket=BUCKET, Key="scans/case.nii.gz", Body=nii)
    s3.put_object(Bucket=BUCKET, Key="scans/study.zip", Body=dcm)
    t1 = write_nifti(tmp_path / "t1.nii.gz", *reorient(vol[..., 1], ("R", "A", "S")))  # one sequence, named T1 on S3
    s3.put_object(Bucket=BUCKET, Key="scans/patient_t1.nii.gz", Body=t1.read_bytes())
    json_type = "application/json"
    named = {"X-Amzn-SageMaker-Custom-Attributes": f"sequences={KAGGLE_TEXT}"}  # the 4D file's three channels
    cases = {
        "nifti_json": (nii, "application/gzip", json_type, named),
        "nifti_mask": (nii, "application/x-nifti", "application/gzip", named),
        "nifti_sniffed": (nii, "application/octet-stream", "application/x-npy", named),
        "dicom_seg": (dcm, "application/zip", "application/dicom"),
        "dicom_nifti": (dcm, "application/dicom+zip", "application/x-nifti"),
        "s3_nifti": (json.dumps({"s3_uri": f"s3://{BUCKET}/scans/case.nii.gz", "output_prefix": f"s3://{BUCKET}/o/",
                                 "sequences": KAGGLE_TEXT}).encode(), json_type, json_type),
        "s3_seg": (json.dumps({"s3_uri": f"s3://{BUCKET}/scans/study.zip", "format": "dicom-seg"}).encode(),
                   json_type, json_type),
        "s3_t1": (json.dumps({"s3_uri": f"s3://{BUCKET}/scans/patient_t1.nii.gz"}).encode(), json_type, json_type),
        "seg_of_nifti": (nii, "application/gzip", "application/dicom", named),
        "nifti_of_slices": (_npy(vol), "application/x-npy", "application/gzip"),
    }
    bad = bad_bodies(vol, tmp_path / "bad")
    cases.update({name: (body, kind, json_type) for name, (body, kind, _, _) in bad.items()})
    cases["after_errors"] = (nii, "application/gzip", "application/x-npy", named)
    results = json.loads(run_cases(archive, cases, tmp_path, aws["env"]).split("RESULTS", 1)[1])
    res = {name: (r, (tmp_path / f"{name}.out").read_bytes()) for name, r in zip(cases, results, strict=False)}

    def ok(name: str, ctype: str) -> bytes:
        r, body = res[name]
        assert (r["status"], r["content_type"]) == (200, ctype), (name, r, body[:300])
        return body

    ml = from_nifti.masks.sum() * voxel_ml()
    got = json.loads(ok("nifti_json", json_type))
    assert got["input"] == "nifti" and got["volume_ml"] == pytest.approx(ml, rel=1e-6)
    assert got["spacing_mm"] == pytest.approx([3.0, 0.9, 0.8]) and got["scan"]["source_shape"] == [64, 64, 10]
    np.testing.assert_array_equal(np.stack([codecs.rle_decode(m) for m in got["masks_rle"]]), from_nifti.masks)
    source = nib.load(nii_path)
    for name, result in (("nifti_mask", from_nifti), ("dicom_nifti", from_dicom)):
        mask = read_nifti_bytes(ok(name, "application/gzip"))
        np.testing.assert_array_equal(np.asanyarray(mask.dataobj), result.volume.to_source(result.masks))
    np.testing.assert_array_equal(read_nifti_bytes(res["nifti_mask"][1]).affine, source.affine)
    np.testing.assert_array_equal(np.load(io.BytesIO(ok("nifti_sniffed", "application/x-npy")), allow_pickle=False),
                                  from_nifti.masks)
    flair = flair_headers(tmp_path / "study")
    uids = [d.SOPInstanceUID for d in flair]
    for seg_bytes in (ok("dicom_seg", "application/dicom"),
                      s3.get_object(Bucket=BUCKET, Key="scans/study_seg.dcm")["Body"].read()):
        ds = pydicom.dcmread(io.BytesIO(seg_bytes))
        assert ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == flair[0].SeriesInstanceUID
        assert ds.StudyInstanceUID == info["study"]["StudyInstanceUID"]
        frames = hd.seg.segread(io.BytesIO(seg_bytes)).get_pixels_by_source_instance(
            uids, segment_numbers=[1], combine_segments=True, assert_missing_frames_are_empty=True)
        np.testing.assert_array_equal(frames, from_dicom.volume.to_source(from_dicom.masks).transpose(2, 1, 0))
    out = json.loads(ok("s3_nifti", json_type))
    assert out["mask_uri"] == f"s3://{BUCKET}/o/case_mask.nii.gz" and out["volume_ml"] == pytest.approx(ml, rel=1e-6)
    written = read_nifti_bytes(s3.get_object(Bucket=BUCKET, Key="o/case_mask.nii.gz")["Body"].read())
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), from_nifti.volume.to_source(from_nifti.masks))
    assert json.loads(ok("s3_seg", json_type))["mask_content_type"] == "application/dicom"

    expected = {"seg_of_nifti": (406, "not_acceptable"), "nifti_of_slices": (406, "not_acceptable"),
                "s3_t1": (422, "not_flair"),
                **{name: (status, code) for name, (_, _, status, code) in bad.items()}}
    for name, (status, code) in expected.items():
        r, body = res[name]
        assert r["status"] == status and code.encode() in body, (name, r, body[:400])
    np.testing.assert_array_equal(np.load(io.BytesIO(ok("after_errors", "application/x-npy")), allow_pickle=False),
                                  from_nifti.masks)
