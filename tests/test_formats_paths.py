"""Scans through `core predict` and `core evaluate --src`: one case gives the same masks as TIFF slices,
as NIfTI and as DICOM; volumes in mL in the CSVs; a bad scan is a clear error that writes nothing."""

from __future__ import annotations

import csv
import gzip
import io
import json
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from bundle_factory import make_random_bundle
from PIL import Image
from volume_support import SPACING, canonical_affine, dcm_files, reorient, write_nifti, write_study

from core.cli import dispatch
from core.data.prepare import DataError, read_patients
from core.evaluation.evaluate import arrays_from_src, scans_from_src, write_report
from core.formats.volume import VolumeError
from core.inference.jobs import ScanOptions
from core.inference.postprocess import KAGGLE_SPACING_MM
from core.inference.predict import run

COMMANDS = ("core.evaluation.cli", "core.inference.cli")


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    from core.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth"), patients=2, slices=8, size=64, seed=11)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("bundle") / "b", size=(64, 64), foreground=0.3)


@pytest.fixture(scope="module")
def predictor(bundle):
    from core.inference.predictor import Predictor

    return Predictor.from_bundle(bundle, device="cpu")


def _zip(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*.dcm")):
            zf.write(f, f.relative_to(folder).as_posix())
    return target


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_one_case_gives_the_same_masks_as_tiff_as_nifti_and_as_dicom(kaggle, predictor, tmp_path):
    folder = sorted(p for p in kaggle.iterdir() if p.is_dir())[0]
    patient = next(read_patients(kaggle))
    run(predictor, [folder], tmp_path / "tiff")
    pngs = sorted((tmp_path / "tiff" / folder.name).glob("*_mask.png"), key=lambda p: int(p.stem.split("_")[-2]))
    tiff_masks = np.stack([np.asarray(Image.open(p)) // 255 for p in pngs]).astype(np.uint8)
    assert tiff_masks.shape == (8, 64, 64) and 0 < tiff_masks.mean() < 0.9  # a test that can tell masks apart

    axcodes = ("R", "A", "S")  # stored unlike the display orientation, so a wrong turn would show
    # On the Kaggle grid's spacing (which the TIFF slices are assumed to have), the post-processing's mm
    # rules remove exactly what they remove from the slices: the same masks on every path.
    source, affine = reorient(patient.images, axcodes, canonical_affine(KAGGLE_SPACING_MM))
    scan = write_nifti(tmp_path / "case.nii.gz", source, affine)
    write_study(tmp_path / "study", patient.images, axcodes, spacing=KAGGLE_SPACING_MM)
    archive = _zip(tmp_path / "study", tmp_path / "case_dicom.zip")
    rows = run(predictor, [scan, archive], tmp_path / "scans", ScanOptions(sequences=["pre", "flair", "post"]))
    expected_source, _ = reorient(tiff_masks, axcodes)
    for name in ("case", "case_dicom"):
        image = nib.Nifti1Image.from_bytes(gzip.decompress((tmp_path / "scans" / f"{name}_mask.nii.gz").read_bytes()))
        assert np.array_equal(np.asanyarray(image.dataobj), expected_source), name
    seg = hd.seg.segread(tmp_path / "scans" / "case_dicom_seg.dcm")
    flair = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in dcm_files(tmp_path / "study" / "s1")),
                   key=lambda d: float(d.ImagePositionPatient[2]))
    frames = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in flair], segment_numbers=[1],
                                               combine_segments=True)
    assert np.array_equal(frames, expected_source.transpose(2, 1, 0))
    expected_ml = np.count_nonzero(tiff_masks) * np.prod(KAGGLE_SPACING_MM) / 1000
    assert [r["volume_ml"] for r in rows] == [pytest.approx(expected_ml, abs=1e-4)] * 2
    written = _rows(tmp_path / "scans" / "predictions.csv")
    assert [float(r["volume_ml"]) for r in written] == [pytest.approx(expected_ml, abs=1e-4)] * 2
    assert written[1]["dicom_seg"] == "case_dicom_seg.dcm" and written[0]["dicom_seg"] == ""
    assert {int(r["tumour_pixels"]) for r in written} == {int(tiff_masks.sum())}


def _by_position(folder: Path) -> list[Path]:
    return sorted(dcm_files(folder), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                         .ImagePositionPatient[2]))


def _bad_scans(patient, root: Path) -> dict[str, Path]:
    root.mkdir(parents=True)
    source, affine = reorient(patient.images, ("R", "A", "S"))
    nan = source.astype(np.float32)
    nan[1, 2, 3, 0] = np.nan
    bad = {"nan": write_nifti(root / "nan_t1_flair_t1c.nii.gz", nan, affine),  # its name names its channels
           "5d": write_nifti(root / "fived.nii.gz", source[..., None, :], affine)}
    huge = bytearray(gzip.decompress(bad["5d"].read_bytes()))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(huge[:352])))
    header["dim"] = [4, 8192, 8192, 4096, 3, 1, 1, 1]
    huge[:348] = header.binaryblock
    bad["huge"] = root / "huge.nii.gz"
    bad["huge"].write_bytes(gzip.compress(bytes(huge)))
    write_study(root / "gap", patient.images)
    _by_position(root / "gap" / "s1")[3].unlink()
    bad["gap"] = root / "gap"
    for name, change in (("mixed", {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}), ("nopixels", {}),
                         ("uneven", {"ImagePositionPatient": [0.0, 0.0, 1.7]})):
        write_study(root / name, patient.images)
        ds = pydicom.dcmread(_by_position(root / name / "s1")[2])
        if name == "nopixels":
            del ds.PixelData
        for key, value in change.items():
            setattr(ds, key, [float(v) + d for v, d in zip(ds.ImagePositionPatient, value, strict=True)]
                    if key == "ImagePositionPatient" else value)
        ds.save_as(_by_position(root / name / "s1")[2])
        bad[name] = root / name
    write_study(root / "two_flair", patient.images, descriptions=("FLAIR", "AX FLAIR", "T1 POST"))
    bad["two_flair"] = root / "two_flair"
    bad["bomb"] = root / "bomb.zip"
    with zipfile.ZipFile(bad["bomb"], "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", bytes(8 << 20))
    return bad


def test_a_bad_scan_is_a_clear_error_and_writes_nothing(kaggle, predictor, bundle, tmp_path, capsys):
    patient = next(read_patients(kaggle))
    bad = _bad_scans(patient, tmp_path / "in")
    # name -> (what the error says, its HTTP status: 413 too large, 422 readable but unusable)
    expected = {"nan": ("NaN", 422), "5d": ("5 dimensions", 422), "huge": ("voxels", 413),
                "gap": ("gap in slice positions", 422), "two_flair": ("2 series look like FLAIR", 422),
                "bomb": ("expands", 413), "mixed": ("ImageOrientationPatient", 422),
                "nopixels": ("no pixel data", 422), "uneven": ("inconsistent slice spacing", 422)}
    for name, path in bad.items():
        out = tmp_path / "out" / name
        with pytest.raises(VolumeError, match=expected[name][0]) as err:
            run(predictor, [path], out)
        assert err.value.status == expected[name][1], (name, err.value.status)
        assert not out.exists(), sorted(out.rglob("*"))
    code = dispatch("core", "", COMMANDS, ["predict", "--bundle", str(bundle), "--device", "cpu",
                                           str(bad["gap"]), "--out", str(tmp_path / "cli")])
    assert code == 2 and "gap in slice positions" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_predict_cli_writes_mask_seg_and_ml(kaggle, bundle, tmp_path, capsys):
    patient = next(read_patients(kaggle))
    write_study(tmp_path / "study", patient.images, descriptions=("one", "two", "three"))
    args = ["predict", "--bundle", str(bundle), "--device", "cpu", str(tmp_path / "study"), "--out",
            str(tmp_path / "out"), "--series", "flair=2", "--series", "pre=1"]
    assert dispatch("core", "", COMMANDS, args) == 0
    printed = capsys.readouterr().out
    assert " mL" in printed and "copy of FLAIR" in printed  # no post-contrast series named
    for name in ("study_mask.nii.gz", "study_seg.dcm", "study_volume.json", "predictions.csv"):
        assert (tmp_path / "out" / name).is_file(), name
    assert dispatch("core", "", COMMANDS, [*args[:-4], "--series", "flair"]) == 2
    assert "SEQUENCE=SERIES" in capsys.readouterr().err


def test_evaluate_src_reads_nifti_scans_with_masks_beside_them(kaggle, predictor, bundle, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    names = {"channel_names": {"0": "pre", "1": "FLAIR", "2": "post"}}  # three volumes are never guessed
    (tmp_path / "dataset.json").write_text(json.dumps(names))
    for i, p in enumerate(read_patients(kaggle)):
        axcodes = [("R", "A", "S"), ("L", "P", "I")][i]
        write_nifti(scans / f"{p.id}.nii.gz", *reorient(p.images, axcodes))
        write_nifti(scans / f"{p.id}_mask.nii.gz", *reorient(p.masks, axcodes))
    arrays, voxel_ml, notes = scans_from_src(scans)
    reference = arrays_from_src(kaggle)
    for field in ("images", "masks", "patients"):
        assert np.array_equal(getattr(arrays, field), getattr(reference, field)), field
    assert notes == {"resized": {}} and list(voxel_ml.values()) == [pytest.approx(np.prod(SPACING) / 1000)] * 2
    summary = write_report(predictor, arrays, tmp_path / "report", {"src": str(scans)}, voxel_ml)
    assert summary["metrics"] == write_report(predictor, reference, tmp_path / "ref", {})["metrics"]
    for row in _rows(tmp_path / "report" / "per_patient.csv"):
        assert float(row["truth_ml"]) == pytest.approx(int(row["truth_pixels"]) * np.prod(SPACING) / 1000, abs=1e-4)
    assert "volume_ml" in summary
    assert dispatch("core", "", COMMANDS, ["evaluate", "--bundle", str(bundle), "--device", "cpu", "--src",
                                           str(scans), "--out", str(tmp_path / "cli")]) == 0
    assert _rows(tmp_path / "cli" / "per_patient.csv") == _rows(tmp_path / "report" / "per_patient.csv")
    (scans / f"{reference.patients[0]}_mask.nii.gz").unlink()
    with pytest.raises(DataError, match="missing mask"):
        scans_from_src(scans)
