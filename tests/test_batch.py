"""`python -m serve batch`: a cohort segmented with Ray Data, patient by patient, locally and on S3.

Checks the masks against the Predictor run on each ordered volume, the metrics against
`python -m core evaluate --src` on the same data, a rerun that skips finished patients, an unreadable
slice that fails only its patient (named by file), and S3 in and out against a local moto server.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from bundle_factory import make_random_bundle
from s3_support import moto_s3

from core.cli import dispatch
from core.data.prepare import patient_id
from core.inference.jobs import ScanOptions
from serve.batch.run import BatchOptions, run_batch

PATIENTS, SLICES = 4, 12  # 12 slices: numeric order (1, 2, ..., 10) differs from name order (1, 10, 11, 2)
BUCKET = "gliomaseg-batch"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("bundle") / "b", foreground=0.1,
                              postprocess={"min_area": 3, "largest_component": True})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, bundle) -> Path:
    """Synthetic patients whose masks partly agree with the random bundle, so no metric is trivially 0 or 1:
    its own masks grown by a pixel, some slices emptied, small lesions it misses added on others."""
    from scipy import ndimage

    from core.data.synth import synthesize

    src = synthesize(tmp_path_factory.mktemp("cohort"), patients=PATIENTS, slices=SLICES, size=64, seed=5)
    rng = np.random.default_rng(0)
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        for stem, mask in zip(*expected_masks(bundle, folder), strict=True):
            truth = ndimage.binary_dilation(mask > 0)
            draw = rng.random()
            if draw < 0.25:
                truth[:] = False
            elif draw > 0.8:
                truth[10:14, 20:26] = True
            tifffile.imwrite(folder / f"{stem}_mask.tif", truth.astype(np.uint8) * 255)
    return src


@pytest.fixture(scope="module")
def batch_run(ray_session, cohort, bundle, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("batch") / "out"
    summary = run_batch(BatchOptions(bundle=str(bundle), src=str(cohort), out=str(out), workers=2, batch_size=8,
                                     progress=False))
    return out, summary


def expected_masks(bundle: Path, folder: Path) -> tuple[list[str], np.ndarray]:
    """(slice stems in numeric order, the Predictor's masks for that ordered volume)."""
    from core.inference.predictor import Predictor

    stems = sorted((p.stem for p in folder.glob("*.tif") if not p.stem.endswith("_mask")),
                   key=lambda s: int(s.rsplit("_", 1)[1]))
    images = np.stack([tifffile.imread(folder / f"{s}.tif") for s in stems])
    return stems, Predictor.from_bundle(str(bundle), "cpu", 8).predict(images, volume=True)


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_masks_written_per_patient_in_order(batch_run, cohort, bundle):
    out, summary = batch_run
    folders = sorted(p.name for p in cohort.iterdir() if p.is_dir())
    assert summary["segmented"] == folders and not summary["failed"] and not summary["skipped"]
    for name in folders:
        stems, want = expected_masks(bundle, cohort / name)
        record = json.loads((out / name / "patient.json").read_text())
        assert record["masks"] == [f"{s}_mask.tif" for s in stems]
        got = np.stack([tifffile.imread(out / name / f"{s}_mask.tif") for s in stems])
        assert set(np.unique(got).tolist()) <= {0, 255}
        np.testing.assert_array_equal(got > 0, want > 0)  # same volume, same order, same 3D post-processing


def test_patients_csv_and_summary(batch_run, cohort):
    out, summary = batch_run
    rows = read_csv((out / "patients.csv").read_text())
    assert [r["patient"] for r in rows] == summary["segmented"]
    total = 0
    for row in rows:
        masks = np.stack([tifffile.imread(p) > 0 for p in sorted((out / row["patient"]).glob("*_mask.tif"))])
        area = masks.reshape(len(masks), -1).sum(1)
        assert int(row["slices"]) == SLICES == len(masks)
        assert int(row["tumour_slices"]) == int((area > 0).sum())
        assert int(row["tumour_voxels"]) == int(area.sum())
        assert int(row["largest_slice_area"]) == int(area.max())
        assert row["status"] == "segmented" and row["dsc_volume"] != ""
        total += int(area.sum())
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["patients"] == on_disk["written"] == PATIENTS and on_disk["slices"] == PATIENTS * SLICES
    assert on_disk["tumour_voxels"] == total and on_disk["metrics_patients"] == PATIENTS
    assert on_disk["settings"]["workers"] == 2 and on_disk["bundle"]["postprocess"]["largest_component"]


def test_metrics_equal_core_evaluate(batch_run, cohort, bundle, tmp_path):
    from core.__main__ import COMMANDS

    out, summary = batch_run
    rc = dispatch("python -m core", "", COMMANDS, ["evaluate", "--bundle", str(bundle), "--src", str(cohort),
                                                   "--out", str(tmp_path / "eval"), "--device", "cpu",
                                                   "--batch-size", "8"])
    assert rc == 0
    reference = json.loads((tmp_path / "eval" / "summary.json").read_text())["metrics"]
    assert all(0.05 < reference[k] < 0.95 for k in ("dsc_volume", "dice_tumour", "dice_all", "fp_slice_rate"))
    assert set(summary["metrics"]) == set(reference)
    for key, value in reference.items():
        assert summary["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key
    evaluated = read_csv((tmp_path / "eval" / "per_patient.csv").read_text())
    per_patient = {r["patient"]: float(r["dice"]) for r in evaluated}
    ours = {patient_id(r["patient"]): float(r["dsc_volume"]) for r in read_csv((out / "patients.csv").read_text())}
    assert ours == pytest.approx(per_patient, abs=1e-6)


def test_unreadable_slice_fails_only_its_patient_and_a_rerun_skips_finished_ones(
        ray_session, cohort, bundle, tmp_path, caplog):
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(cohort, src)
    folders = sorted(p.name for p in src.iterdir() if p.is_dir())
    broken = src / folders[1] / f"{folders[1]}_3.tif"
    broken.write_bytes(b"II*\x00 this is not a TIFF any more")
    caplog.set_level(logging.INFO, logger="serve.batch")
    summary = run_batch(BatchOptions(bundle=str(bundle), src=str(src), out=str(out), workers=1, batch_size=8,
                                     progress=False))
    assert [f["patient"] for f in summary["failed"]] == [folders[1]]
    assert summary["unreadable"] == [str(broken)] and str(broken) in summary["failed"][0]["error"]
    assert str(broken) in caplog.text
    assert summary["segmented"] == [f for f in folders if f != folders[1]]
    assert not (out / folders[1]).exists()  # nothing half-written for the failed patient
    assert [r["patient"] for r in read_csv((out / "patients.csv").read_text())] == summary["segmented"]

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*")}
    shutil.copy(cohort / folders[1] / broken.name, broken)  # the file is fixed; rerun through the CLI
    caplog.clear()
    rc = dispatch("python -m serve", "", ("serve.batch.cli",), ["batch", "--bundle", str(bundle), "--src", str(src),
                                                           "--out", str(out), "--workers", "1", "--batch-size", "8"])
    assert rc == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["segmented"] == [folders[1]] and again["skipped"] == summary["segmented"] and not again["failed"]
    assert "3 already written" in caplog.text and "(skipped)" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # finished patients untouched
    rows = read_csv((out / "patients.csv").read_text())
    assert [r["patient"] for r in rows] == folders
    assert [r["status"] for r in rows] == ["segmented" if f == folders[1] else "skipped" for f in folders]
    assert again["written"] == PATIENTS and again["metrics_patients"] == PATIENTS


# ---------------------------------------------------------------------------------------------- S3




@pytest.fixture
def s3(monkeypatch):
    with moto_s3(monkeypatch, BUCKET) as client:
        yield client


def test_s3_source_and_output(ray_session, cohort, bundle, batch_run, s3):
    local_out, _ = batch_run
    folders = sorted(p.name for p in cohort.iterdir() if p.is_dir())[:2]
    for name in folders:
        for f in (cohort / name).iterdir():
            s3.put_object(Bucket=BUCKET, Key=f"cohort/{name}/{f.name}", Body=f.read_bytes())
    opts = BatchOptions(bundle=str(bundle), src=f"s3://{BUCKET}/cohort", out=f"s3://{BUCKET}/results/run1",
                        workers=1, batch_size=8, progress=False)
    summary = run_batch(opts)
    assert summary["segmented"] == folders and not summary["failed"]
    for name in folders:  # the same masks as the local run, under the output prefix
        for mask in sorted((local_out / name).glob("*_mask.tif")):
            body = s3.get_object(Bucket=BUCKET, Key=f"results/run1/{name}/{mask.name}")["Body"].read()
            np.testing.assert_array_equal(tifffile.imread(io.BytesIO(body)), tifffile.imread(mask))
    stored = json.loads(s3.get_object(Bucket=BUCKET, Key="results/run1/summary.json")["Body"].read())
    assert stored["metrics_patients"] == 2 and stored["metrics"]["dsc_volume"] == summary["metrics"]["dsc_volume"]
    rows = read_csv(s3.get_object(Bucket=BUCKET, Key="results/run1/patients.csv")["Body"].read().decode())
    assert [r["patient"] for r in rows] == folders

    again = run_batch(opts)  # everything written: nothing for Ray to do
    assert again["skipped"] == folders and not again["segmented"]
    assert again["metrics"] == pytest.approx(summary["metrics"])


# -------------------------------------------------------------------------------------- NIfTI and DICOM


@pytest.fixture(scope="module")
def scan_cohort(tmp_path_factory, cohort) -> Path:
    """One Kaggle folder beside a 4D NIfTI case, nnU-Net channel files, a DICOM study folder and a zipped one."""
    from scan_support import dicom_study, nifti_scan, zip_folder
    from volume_support import reorient, write_nifti

    from core.data.prepare import read_patients

    root = tmp_path_factory.mktemp("scans") / "cohort"
    root.mkdir()
    # The channels' names, as an nnU-Net dataset.json gives them (three volumes are never guessed)
    names = {"channel_names": {"0": "pre", "1": "FLAIR", "2": "post"}}
    (root.parent / "dataset.json").write_text(json.dumps(names))
    patients = list(read_patients(cohort))
    first = sorted(p for p in cohort.iterdir() if p.is_dir())[0]
    shutil.copytree(first, root / first.name)
    nifti_scan(patients[1].images, root / "caseA.nii.gz")
    for c in range(3):  # one file per sequence, as nnU-Net names them, stored in another orientation
        write_nifti(root / f"caseB_{c:04d}.nii.gz", *reorient(patients[2].images[..., c], ("L", "A", "I")))
    dicom_study(patients[3].images, root / "studyC")
    zipped = tmp_path_factory.mktemp("zipped") / "studyD"
    dicom_study(patients[1].images[::-1].copy(), zipped)
    zip_folder(zipped, root / "studyD.zip")
    (root / "data.csv").write_text("not a patient\n")  # top-level files that are no scans are left alone
    return root


SCANS = ["caseA", "caseB", "studyC", "studyD"]


def test_nifti_and_dicom_patients_get_masks_on_their_grid_and_volumes_in_ml(ray_session, scan_cohort, bundle,
                                                                             tmp_path):
    import highdicom as hd
    import nibabel as nib
    import pydicom
    from scan_support import flair_headers, read_nifti_bytes, voxel_ml

    from core.formats.load import load_volume
    from core.inference.predict import run
    from core.inference.predictor import Predictor

    out = tmp_path / "out"
    summary = run_batch(BatchOptions(bundle=str(bundle), src=str(scan_cohort), out=str(out), workers=1, batch_size=8,
                                     progress=False))
    kaggle = next(p.name for p in scan_cohort.iterdir() if p.is_dir() and p.name.startswith("TCGA"))
    assert summary["segmented"] == [kaggle, "studyC", "caseA", "caseB", "studyD"] and not summary["failed"]
    # `core predict` on the same files is the reference: the same masks, on the same grid.
    predictor = Predictor.from_bundle(str(bundle), "cpu", 8)
    inputs = [scan_cohort / "caseA.nii.gz", scan_cohort / "caseB_0000.nii.gz", scan_cohort / "studyC",
              scan_cohort / "studyD.zip"]
    reference = {Path(r["mask"]).name.removesuffix("_mask.nii.gz"): r for r in run(predictor, inputs, tmp_path / "ref")}
    assert sorted(reference) == SCANS
    rows = {r["patient"]: r for r in read_csv((out / "patients.csv").read_text())}
    assert rows[kaggle]["volume_ml"] == "" and (out / kaggle / f"{kaggle}_1_mask.tif").is_file()
    total = 0
    for name in SCANS:
        written = read_nifti_bytes((out / name / f"{name}_mask.nii.gz").read_bytes())
        expected = nib.load(tmp_path / "ref" / f"{name}_mask.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(expected.dataobj))
        np.testing.assert_array_equal(written.affine, expected.affine)
        voxels = int(np.count_nonzero(np.asanyarray(written.dataobj)))
        total += voxels
        record = json.loads((out / name / "patient.json").read_text())
        assert record["tumour_voxels"] == voxels and record["slices"] == SLICES
        assert record["volume_ml"] == pytest.approx(voxels * voxel_ml(), rel=1e-6)
        assert float(rows[name]["volume_ml"]) == pytest.approx(voxels * voxel_ml(), rel=1e-6)
        assert float(rows[name]["volume_ml"]) == pytest.approx(float(reference[name]["volume_ml"]), abs=1e-4)
    assert total > 0  # the comparisons above saw tumour
    source = nib.load(scan_cohort / "caseA.nii.gz")
    np.testing.assert_array_equal(read_nifti_bytes((out / "caseA" / "caseA_mask.nii.gz").read_bytes()).affine,
                                  source.affine)
    flair = flair_headers(scan_cohort / "studyC")
    seg_path = out / "studyC" / "studyC_seg.dcm"
    ds = pydicom.dcmread(seg_path)
    assert ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == flair[0].SeriesInstanceUID
    volume = load_volume(scan_cohort / "studyC")
    frames = hd.seg.segread(seg_path).get_pixels_by_source_instance(
        [d.SOPInstanceUID for d in flair], segment_numbers=[1], combine_segments=True,
        assert_missing_frames_are_empty=True)
    mask = np.asanyarray(read_nifti_bytes((out / "studyC" / "studyC_mask.nii.gz").read_bytes()).dataobj)
    np.testing.assert_array_equal(frames, mask.transpose(2, 1, 0))
    assert volume.source_shape == mask.shape and (out / "studyD" / "studyD_seg.dcm").is_file()
    assert not (out / "caseA" / "caseA_seg.dcm").exists()  # a SEG only where there is a DICOM series

    again = run_batch(BatchOptions(bundle=str(bundle), src=str(scan_cohort), out=str(out), workers=1,
                                   progress=False))
    assert not again["segmented"] and len(again["skipped"]) == 5
    assert read_csv((out / "patients.csv").read_text())[1]["volume_ml"] == rows["studyC"]["volume_ml"]


def test_a_bad_scan_fails_only_its_patient(ray_session, scan_cohort, bundle, tmp_path):
    from bundle_factory import sample_images
    from scan_support import bad_bodies

    src = tmp_path / "dataset" / "src"
    src.mkdir(parents=True)
    shutil.copy(scan_cohort.parent / "dataset.json", src.parent)  # names good.nii.gz's three channels
    shutil.copy(scan_cohort / "caseA.nii.gz", src / "good.nii.gz")
    bad = bad_bodies(sample_images(SLICES), tmp_path / "bad")
    (src / "broken.nii.gz").write_bytes(bad["nan_nifti"][0])
    (src / "bomb.zip").write_bytes(bad["zip_bomb"][0])
    for c in (0, 2):  # a case with a channel file missing
        shutil.copy(scan_cohort / f"caseB_{c:04d}.nii.gz", src / f"gap_{c:04d}.nii.gz")
    summary = run_batch(BatchOptions(bundle=str(bundle), src=str(src), out=str(tmp_path / "out"), workers=1,
                                     progress=False))
    assert summary["segmented"] == ["good"]
    errors = {f["patient"]: f["error"] for f in summary["failed"]}
    assert set(errors) == {"broken", "gap", "bomb"}
    assert "NaN" in errors["broken"] and "expands" in errors["bomb"] and "[1] missing" in errors["gap"]
    named = [str(src / n) for n in ("broken.nii.gz", "gap_0000.nii.gz", "gap_0002.nii.gz", "bomb.zip")]
    assert sorted(summary["unreadable"]) == sorted(named)
    assert all(n in errors[p] for n, p in zip(named, ("broken", "gap", "gap", "bomb"), strict=True))
    assert not (tmp_path / "out" / "broken").exists() and (tmp_path / "out" / "good" / "good_mask.nii.gz").is_file()


def test_s3_scans_are_read_and_written_like_local_ones(ray_session, scan_cohort, bundle, s3, tmp_path):
    from scan_support import read_nifti_bytes, voxel_ml

    from core.inference.predict import run
    from core.inference.predictor import Predictor

    files = [p for p in scan_cohort.rglob("*") if p.is_file() and (p.name.startswith("caseB")
                                                                   or "studyC" in p.parts)]
    for f in files:
        s3.put_object(Bucket=BUCKET, Key=f"scans/{f.relative_to(scan_cohort).as_posix()}", Body=f.read_bytes())
    kaggle = ["pre", "flair", "post"]  # caseB's channels: an S3 prefix has no dataset.json beside it
    summary = run_batch(BatchOptions(bundle=str(bundle), src=f"s3://{BUCKET}/scans", out=f"s3://{BUCKET}/scan-out",
                                     workers=1, progress=False, sequences=kaggle))
    assert summary["segmented"] == ["studyC", "caseB"] and not summary["failed"]
    predictor = Predictor.from_bundle(str(bundle), "cpu", 8)
    run(predictor, [scan_cohort / "caseB_0000.nii.gz", scan_cohort / "studyC"], tmp_path / "ref",
        ScanOptions(sequences=kaggle))
    voxels = {}
    for name in ("caseB", "studyC"):
        body = s3.get_object(Bucket=BUCKET, Key=f"scan-out/{name}/{name}_mask.nii.gz")["Body"].read()
        got, want = read_nifti_bytes(body), read_nifti_bytes((tmp_path / "ref" / f"{name}_mask.nii.gz").read_bytes())
        np.testing.assert_array_equal(np.asanyarray(got.dataobj), np.asanyarray(want.dataobj))
        np.testing.assert_array_equal(got.affine, want.affine)
        voxels[name] = int(np.count_nonzero(np.asanyarray(got.dataobj)))
    assert s3.head_object(Bucket=BUCKET, Key="scan-out/studyC/studyC_seg.dcm")["ContentLength"] > 0
    rows = read_csv(s3.get_object(Bucket=BUCKET, Key="scan-out/patients.csv")["Body"].read().decode())
    assert [r["patient"] for r in rows] == ["studyC", "caseB"]
    # Each patient's mL is its written mask's voxels times the voxel volume; some tumour was found.
    for r in rows:
        assert float(r["volume_ml"]) == pytest.approx(voxels[r["patient"]] * voxel_ml(), rel=1e-6)
    assert sum(voxels.values()) > 0


def test_a_scan_keeps_its_geometry_between_the_stages(tmp_path):
    """pack/unpack carry every Volume field but the pixels from the read stage to the write stage (as JSON):
    an enhanced image's frame order too, without which its DICOM SEG cannot be written."""
    from dataclasses import fields

    from bundle_factory import sample_images
    from scan_support import dicom_study
    from volume_support import enhance_series

    from core.formats.dicom import read_dicom
    from serve.batch.scans import pack, unpack

    dicom_study(sample_images(4), tmp_path / "study")
    enhance_series(tmp_path / "study" / "s1")
    volume = read_dicom(tmp_path / "study")
    back = unpack(json.loads(json.dumps(pack(volume))))
    assert volume.frames and back.images.shape == volume.images.shape
    for f in fields(volume):
        if f.name in ("images", "header", "datasets"):  # stand-in pixels; headers re-read from their bytes
            continue
        np.testing.assert_equal(getattr(back, f.name), getattr(volume, f.name), err_msg=f.name)
    assert [d.SOPInstanceUID for d in back.datasets] == [d.SOPInstanceUID for d in volume.datasets]
