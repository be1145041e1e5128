"""Clinical files as scanners and anonymisers write them (core.formats): enhanced (multi-frame) MR, DICOM
without Type 2 patient/study attributes, MONOCHROME1, NIfTI in metres or without orientation, and a 3D
NIfTI whose file name says which sequence it is; through the readers, the SEG writer and `core predict`."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from volume_support import (
    SPACING,
    dcm_files,
    enhance_series,
    reorient,
    strip_attributes,
    write_dicom_series,
    write_nifti,
    write_study,
)

from core.formats.dicom import read_dicom
from core.formats.dicom_seg import dicom_seg_bytes
from core.formats.nifti import nifti_mask_bytes, read_nifti
from core.formats.volume import MissingSequenceError, NoOrientationError, NotFlairError, VolumeError

KAGGLE = ["pre", "flair", "post"]  # the synthetic scans' channels, named: three volumes are never guessed

TYPE2 = ("PatientName", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from core.data.prepare import read_patients
    from core.data.synth import synthesize

    src = synthesize(tmp_path_factory.mktemp("synth"), patients=1, slices=8, size=64, seed=7)
    return next(read_patients(src))


def _zip_bytes(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in dcm_files(folder):
            zf.write(f, f.relative_to(folder).as_posix())
    return buffer.getvalue()


def _frame_depths(ds: pydicom.Dataset) -> np.ndarray:
    """Each frame's position along the slice normal (LPS z for these axial series), in frame order."""
    return np.array([float(f.PlanePositionSequence[0].ImagePositionPatient[2])
                     for f in ds.PerFrameFunctionalGroupsSequence])


def test_an_enhanced_image_reads_like_its_series_and_its_seg_references_its_frames(case, tmp_path):
    write_study(tmp_path / "single", case.images)
    shutil.copytree(tmp_path / "single", tmp_path / "enhanced")
    enhanced_file = enhance_series(tmp_path / "enhanced" / "s1")  # the FLAIR series as one multi-frame image
    single, enhanced = read_dicom(tmp_path / "single"), read_dicom(tmp_path / "enhanced")
    source = pydicom.dcmread(enhanced_file, stop_before_pixels=True)
    depths = _frame_depths(source)
    assert source.NumberOfFrames == 8 and not np.all(np.diff(depths) > 0)  # frames not in slice order
    assert np.array_equal(enhanced.images, single.images) and np.array_equal(enhanced.images, case.images)
    assert np.allclose(enhanced.affine, single.affine) and enhanced.source_shape == single.source_shape
    assert np.array_equal(read_dicom(_zip_bytes(tmp_path / "enhanced")).images, case.images)
    assert any("multi-frame" in n for n in enhanced.notes)

    data = dicom_seg_bytes(enhanced, case.masks, ["background", "tumour"], model="unit-test", version="1")
    ds = pydicom.dcmread(io.BytesIO(data))
    referenced = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert [r.ReferencedSOPInstanceUID for r in referenced] == [source.SOPInstanceUID]
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID and ds.StudyInstanceUID == source.StudyInstanceUID
    mask_source = enhanced.to_source(case.masks)  # (columns, rows, slices), slices in position order
    rank = np.argsort(np.argsort(depths))  # frame f is slice rank[f]
    seg = hd.seg.Segmentation.from_dataset(ds)
    frames = seg.get_pixels_by_source_frame(source.SOPInstanceUID, source_frame_numbers=list(range(1, 9)),
                                            segment_numbers=[1], combine_segments=True,
                                            assert_missing_frames_are_empty=True)
    for f in range(8):
        assert np.array_equal(frames[f], mask_source[:, :, rank[f]].T), f
    for item in ds.PerFrameFunctionalGroupsSequence:  # each SEG frame sits where the frame it names sits
        number = int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        assert float(item.PlanePositionSequence[0].ImagePositionPatient[2]) == pytest.approx(depths[number - 1])
    assert np.array_equal(enhanced.to_source(case.masks), single.to_source(case.masks))


def test_an_enhanced_image_beside_other_images_of_its_series_is_refused(case, tmp_path):
    write_study(tmp_path / "study", case.images)
    keep = sorted(dcm_files(tmp_path / "study" / "s1"))[0].read_bytes()
    enhance_series(tmp_path / "study" / "s1")
    (tmp_path / "study" / "s1" / "extra.dcm").write_bytes(keep)
    with pytest.raises(VolumeError, match="multi-frame") as err:
        read_dicom(tmp_path / "study")
    assert err.value.status == 422


def test_a_study_without_type2_attributes_gives_a_seg_with_them_empty(case, tmp_path):
    write_study(tmp_path / "study", case.images)
    strip_attributes(tmp_path / "study", TYPE2)
    volume = read_dicom(tmp_path / "study")
    note = next(n for n in volume.notes if "anonymiser" in n)
    assert all(k in note for k in TYPE2)
    ds = pydicom.dcmread(io.BytesIO(dicom_seg_bytes(volume, case.masks)))
    assert ds.Modality == "SEG" and ds.PatientID == "SYNTH001"
    for keyword in TYPE2:
        assert keyword in ds and not str(ds[keyword].value or ""), keyword
    assert all(k not in volume.datasets[0] for k in TYPE2)  # the source headers themselves stay as read


@pytest.mark.parametrize("bits", [8, 12])
def test_monochrome1_is_turned_round_once_for_the_whole_series(case, tmp_path, bits):
    source, affine = reorient(case.images[..., 1], ("L", "P", "S"))
    step = 10 if bits == 8 else 100  # each slice brighter than the last: no slice has the series' minimum
    values = source.astype(np.int64) * (1 if bits == 8 else 10) + step * np.arange(source.shape[2])
    values = np.clip(values, 0, (1 << bits) - 1).astype(np.uint16)
    write_dicom_series(tmp_path / "m2", values, affine, "AX FLAIR", bits_stored=bits)
    write_dicom_series(tmp_path / "m1", ((1 << bits) - 1 - values).astype(np.uint16), affine, "AX FLAIR",
                       bits_stored=bits)
    for path in dcm_files(tmp_path / "m1"):
        ds = pydicom.dcmread(path)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(path)
    twin, inverted = read_dicom(tmp_path / "m2"), read_dicom(tmp_path / "m1")
    assert np.array_equal(inverted.images, twin.images)
    assert len({int(s.min()) for s in inverted.images[..., 1]}) > 1  # the slices' own minima differ


def _nifti_in(path: Path, source: np.ndarray, affine: np.ndarray, unit: str) -> Path:
    scale = {"meter": 1e-3, "micron": 1e3, "mm": 1.0}[unit]
    stored = affine.copy()
    stored[:3] *= scale
    image = nib.Nifti1Image(source, stored)
    image.set_qform(stored, code=1)
    image.set_sform(stored, code=1)
    image.header.set_xyzt_units(unit)
    nib.save(image, str(path))
    return path


@pytest.mark.parametrize("unit", ["meter", "micron"])
def test_units_in_the_header_give_mm_and_ml(case, tmp_path, unit):
    source, affine = reorient(case.images, ("R", "A", "S"))
    mm = read_nifti(_nifti_in(tmp_path / "mm.nii.gz", source, affine, "mm"), sequences=KAGGLE)
    path = _nifti_in(tmp_path / "scan.nii.gz", source, affine, unit)
    volume = read_nifti(path, sequences=KAGGLE)
    expected = np.count_nonzero(case.masks) * np.prod(SPACING) / 1000
    assert volume.volume_ml(case.masks) == pytest.approx(expected, rel=1e-5) == mm.volume_ml(case.masks)
    assert np.allclose(volume.spacing, SPACING, rtol=1e-5) and np.array_equal(volume.images, mm.images)
    assert any(unit in n and "mm" in n for n in volume.notes)
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(nifti_mask_bytes(volume, case.masks)))
    stored = nib.load(path)
    assert mask.header.get_xyzt_units()[0] == unit and np.allclose(mask.affine, stored.affine)  # as the scan's
    assert np.array_equal(np.asanyarray(mask.dataobj), volume.to_source(case.masks))


def test_a_nifti_without_qform_or_sform_is_refused(case, tmp_path):
    source, affine = reorient(case.images, ("R", "A", "S"))
    image = nib.Nifti1Image(source, affine)
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    nib.save(image, str(tmp_path / "bare.nii.gz"))
    assert int(nib.load(tmp_path / "bare.nii.gz").header["sform_code"]) == 0
    for body in (tmp_path / "bare.nii.gz", (tmp_path / "bare.nii.gz").read_bytes()):
        with pytest.raises(NoOrientationError, match="no orientation.*left and right") as err:
            read_nifti(body, sequences=KAGGLE)
        assert err.value.status == 422 and err.value.error == "no_orientation"


@pytest.mark.parametrize("name, said", [
    ("patient_flair.nii.gz", "flair"), ("BraTS-GLI-0001-t2f.nii.gz", "t2f"), ("sub-01_T2_FLAIR.nii.gz", "flair"),
    ("t1.nii.gz", "t1"), ("patient_t1c.nii.gz", "t1c"), ("BraTS2021_00001_t1ce.nii.gz", "t1ce"),
    ("sub-01_T1w.nii.gz", "t1w"), ("case7_t2.nii.gz", "t2"), ("postop_scan.nii.gz", None), ("patient01.nii", None),
])
def test_a_3d_file_takes_its_sequence_from_its_name(case, tmp_path, name, said):
    source, affine = reorient(case.images[..., 1], ("R", "A", "S"))
    path = write_nifti(tmp_path / name, source, affine)
    if said in (None, "flair", "t2f"):
        volume = read_nifti(path)
        assert np.array_equal(volume.images[..., 1], case.images[..., 1])
        how = next(n for n in volume.notes if n.startswith("sequences from"))
        assert ("the file name (" in how) == (said is not None) and ("default" in how) == (said is None)
        return
    with pytest.raises(NotFlairError, match=f"says '{said}'.*not FLAIR.*--sequences flair") as err:
        read_nifti(path)
    assert err.value.status == 422
    told = read_nifti(path, sequences=["flair"])  # the user knows better than the name
    assert np.array_equal(told.images[..., 1], case.images[..., 1])
    assert any("given sequence names" in n for n in told.notes)
    with pytest.raises(NotFlairError):
        read_nifti(path.read_bytes(), name=path.name)  # a body named by its sender
    assert read_nifti(path.read_bytes()).sources == {"flair": "request body"}  # a nameless body: the default


def test_a_channel_file_takes_its_sequence_from_dataset_json(case, tmp_path):
    source, affine = reorient(case.images[..., 1], ("R", "A", "S"))
    for names, ok in (({"0": "FLAIR"}, True), ({"0": "T1"}, False)):
        dataset = tmp_path / f"Dataset_{ok}"
        (dataset / "imagesTs").mkdir(parents=True)
        (dataset / "dataset.json").write_text(json.dumps({"channel_names": names, "labels": {"background": 0}}))
        path = write_nifti(dataset / "imagesTs" / "brain_0000.nii.gz", source, affine)
        if ok:
            assert any("dataset.json" in n for n in read_nifti(path).notes)
        else:
            with pytest.raises(MissingSequenceError, match="no FLAIR"):
                read_nifti(path)


def test_core_predict_on_clinical_files(case, tmp_path):
    from bundle_factory import make_random_bundle

    from core.inference.jobs import ScanOptions
    from core.inference.predict import run
    from core.inference.predictor import Predictor

    predictor = Predictor.from_bundle(make_random_bundle(tmp_path / "bundle", size=(64, 64), foreground=0.3),
                                      device="cpu")
    write_study(tmp_path / "enhanced", case.images)
    enhanced_file = enhance_series(tmp_path / "enhanced" / "s1")
    write_study(tmp_path / "anon", case.images)
    strip_attributes(tmp_path / "anon", TYPE2)
    source, affine = reorient(case.images[..., 1], ("R", "A", "S"))
    t1 = write_nifti(tmp_path / "patient_t1.nii.gz", source, affine)
    metres = _nifti_in(tmp_path / "metres.nii.gz", source, affine, "meter")
    rows = run(predictor, [tmp_path / "enhanced", tmp_path / "anon", metres], tmp_path / "out")
    assert [float(r["volume_ml"]) for r in rows] == [  # metres too: voxels of SPACING mm
        pytest.approx(int(r["tumour_pixels"]) * np.prod(SPACING) / 1000, abs=1e-4) for r in rows]
    assert all(int(r["tumour_pixels"]) > 0 for r in rows)
    seg = pydicom.dcmread(tmp_path / "out" / "enhanced_seg.dcm")
    uid = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert uid == pydicom.dcmread(enhanced_file, stop_before_pixels=True).SOPInstanceUID
    assert (tmp_path / "out" / "anon_seg.dcm").is_file() and "anonymiser" in rows[1]["notes"]
    anon_json = json.loads((tmp_path / "out" / "anon_volume.json").read_text())  # the result JSON
    assert any("anonymiser" in n for n in anon_json["scan"]["notes"])
    metres_json = json.loads((tmp_path / "out" / "metres_volume.json").read_text())
    assert np.allclose(metres_json["spacing_mm"], SPACING)
    with pytest.raises(NotFlairError, match="patient_t1.nii.gz"):
        run(predictor, [t1], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    run(predictor, [t1], tmp_path / "told", ScanOptions(sequences=["flair"]))
    notes = json.loads((tmp_path / "told" / "patient_t1_volume.json").read_text())["scan"]["notes"]  # result JSON
    assert any("given sequence names" in n for n in notes)
