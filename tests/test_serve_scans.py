"""Clinical scans over HTTP (a real Serve app on loopback) and through `python -m serve predict`: enhanced
DICOM, anonymised DICOM, NIfTI in metres or without orientation, a 3D NIfTI named by its file name, DICOM
folders zipped on the fly by the client. Each answer is compared with the server's own answer to the plain
file (single-frame series, NIfTI in mm, the bytes posted directly)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from bundle_factory import make_random_bundle, sample_images
from scan_support import dicom_study, nifti_scan, read_nifti_bytes, voxel_ml, zip_folder
from serve_support import serving
from volume_support import enhance_series, reorient, strip_attributes, write_nifti

from core.cli import dispatch
from serve.app import ServeSettings

CASE = "case_t1_flair_t1c"  # a 4D NIfTI whose name says its channels: pre-contrast, FLAIR, post-contrast
STRIPPED = ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("scans") / "bundle")


@pytest.fixture(scope="module")
def url(ray_session, bundle):
    with serving({"/": ServeSettings(bundle=str(bundle), max_slices=32)}) as urls:
        yield urls["/"]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return sample_images(12, seed=7)


def _post(url: str, body: bytes, kind: str, name: str | None = None, **params) -> httpx.Response:
    headers = {"Content-Type": kind, **({"Content-Disposition": f'attachment; filename="{name}"'} if name else {})}
    return httpx.post(f"{url}/v1/segment/volume", content=body, headers=headers, params=params, timeout=120)


def _mask(r: httpx.Response) -> np.ndarray:
    """A NIfTI answer's labels on the source grid; not all one value, so a wrong answer shows."""
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip", r.text
    mask = np.asanyarray(read_nifti_bytes(r.content).dataobj)
    assert 0 < mask.sum() < mask.size
    return mask


def _nifti_3d(images: np.ndarray, path: Path, unit: str = "mm") -> Path:
    import nibabel as nib

    source, affine = reorient(images[..., 1], ("R", "A", "S"))
    if unit == "mm":
        return write_nifti(path, source, affine)
    stored = affine.copy()
    stored[:3] /= 1000.0
    image = nib.Nifti1Image(source, stored)
    image.set_qform(stored, code=1)
    image.set_sform(stored, code=1)
    image.header.set_xyzt_units("meter")
    nib.save(image, str(path))
    return path


def test_clinical_dicom_over_http(url: str, images, tmp_path: Path) -> None:
    dicom_study(images, tmp_path / "single")
    single = zip_folder(tmp_path / "single")
    shutil.copytree(tmp_path / "single", tmp_path / "enhanced")
    enhanced_file = enhance_series(tmp_path / "enhanced" / "s1")
    enhanced = zip_folder(tmp_path / "enhanced")
    expected = _mask(_post(url, single, "application/zip"))  # (columns, rows, slices)
    np.testing.assert_array_equal(_mask(_post(url, enhanced, "application/zip")), expected)  # the same masks
    r = _post(url, enhanced, "application/zip", format="dicom-seg")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom", r.text
    seg = pydicom.dcmread(io.BytesIO(r.content))
    source = pydicom.dcmread(enhanced_file, stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    numbers = {int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
               for f in seg.PerFrameFunctionalGroupsSequence}
    depth = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in source.PerFrameFunctionalGroupsSequence]
    rank = np.argsort(np.argsort(depth))  # frame f is slice rank[f] of the (columns, rows, slices) grid
    assert numbers == {f + 1 for f in range(12) if expected[:, :, rank[f]].any()}  # the frames with tumour
    assert float(r.headers["X-Tumour-Volume-mL"]) == pytest.approx(expected.sum() * voxel_ml(), abs=1e-4)

    strip_attributes(tmp_path / "single", STRIPPED)
    anonymised = zip_folder(tmp_path / "single")
    r = _post(url, anonymised, "application/zip", format="dicom-seg")
    assert r.status_code == 200, r.text
    assert "PatientBirthDate" in r.headers["Warning"] and "empty" in r.headers["Warning"]
    seg = pydicom.dcmread(io.BytesIO(r.content))
    assert seg.Modality == "SEG" and all(not str(seg[k].value or "") for k in STRIPPED)
    notes = _post(url, anonymised, "application/zip", format="json").json()["scan"]["notes"]
    assert any("anonymiser" in n and "PatientSex" in n for n in notes)


def test_clinical_nifti_over_http(url: str, images, tmp_path: Path) -> None:
    mm = _nifti_3d(images, tmp_path / "scan_flair.nii.gz").read_bytes()
    metres = _nifti_3d(images, tmp_path / "metres.nii.gz", unit="meter").read_bytes()
    expected = _mask(_post(url, mm, "application/gzip"))
    np.testing.assert_array_equal(_mask(_post(url, metres, "application/gzip")), expected)
    got = _post(url, metres, "application/gzip", format="json").json()
    assert got["volume_ml"] == pytest.approx(expected.sum() * voxel_ml(), rel=1e-5)
    assert got["spacing_mm"] == pytest.approx([3.0, 0.9, 0.8]) and got["volume_ml"] > 1e-3

    bare = tmp_path / "bare.nii.gz"
    import nibabel as nib

    image = nib.load(tmp_path / "scan_flair.nii.gz")
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    nib.save(image, str(bare))
    r = _post(url, bare.read_bytes(), "application/gzip")
    assert r.status_code == 422 and r.json()["error"] == "no_orientation", r.text
    assert "left and right" in r.json()["detail"]

    r = _post(url, mm, "application/gzip", name="patient_t1.nii.gz")
    assert r.status_code == 422 and r.json()["error"] == "not_flair", r.text
    assert "'t1'" in r.json()["detail"]
    r = _post(url, mm, "application/gzip", name="patient_t1.nii.gz", sequences="flair", format="json")
    assert r.status_code == 200 and any("given sequence names" in n for n in r.json()["scan"]["notes"])
    r = _post(url, mm, "application/gzip", name="patient_t1.nii.gz", sequences="flair")
    assert r.headers["content-disposition"].endswith('"patient_t1_mask.nii.gz"')
    notes = _post(url, mm, "application/gzip", format="json").json()["scan"]["notes"]  # nameless: FLAIR
    assert any(n.startswith("sequences from the default") for n in notes)


def test_client_sends_scans(url: str, images, tmp_path: Path) -> None:
    scans = tmp_path / "in"
    scans.mkdir()
    nifti = nifti_scan(images, scans / f"{CASE}.nii.gz")  # its name names its three channels
    dicom_study(images, scans / "study")  # a DICOM folder: the client zips it
    archive = tmp_path / "zipped.zip"
    archive.write_bytes(zip_folder(scans / "study"))
    t1 = _nifti_3d(images, tmp_path / "patient_t1.nii.gz")
    out = tmp_path / "out"
    argv = ["predict", "--url", url, str(scans), str(archive), str(t1), "--out", str(out)]
    assert dispatch("python -m serve", "", ["serve.client"], argv) == 1  # the T1 file is refused alone
    summary = {s["name"]: s for s in json.loads((out / "summary.json").read_text())}
    assert set(summary) == {CASE, "study", "zipped", "patient_t1"}
    assert "not_flair" in summary["patient_t1"]["error"]
    direct = {CASE: (nifti.read_bytes(), "application/gzip"), "zipped": (archive.read_bytes(), "application/zip")}
    direct["study"] = direct["zipped"]
    for name, (body, kind) in direct.items():
        expected = _mask(_post(url, body, kind, name=nifti.name))  # the name a zip's reader ignores
        ml = _post(url, body, kind, name=nifti.name, format="json").json()["volume_ml"]
        mask = read_nifti_bytes((out / f"{name}_mask.nii.gz").read_bytes())
        np.testing.assert_array_equal(np.asanyarray(mask.dataobj), expected)
        assert summary[name]["volume_ml"] == pytest.approx(ml, rel=1e-9)
        assert ml == pytest.approx(expected.sum() * voxel_ml(), rel=1e-6)
        answer = json.loads((out / f"{name}.json").read_text())
        assert answer["volume_ml"] == pytest.approx(ml, rel=1e-9) and answer["scan"]["sources"]["flair"]
    for name in ("study", "zipped"):
        assert pydicom.dcmread(out / f"{name}_seg.dcm").Modality == "SEG"
    assert not (out / f"{CASE}_seg.dcm").exists()
    argv = ["predict", "--url", url, str(t1), "--sequences", "flair", "--out", str(tmp_path / "told")]
    assert dispatch("python -m serve", "", ["serve.client"], argv) == 0
    assert (tmp_path / "told" / "patient_t1_mask.nii.gz").is_file()
