"""DICOM in and DICOM SEG out (core.formats.dicom, core.formats.dicom_seg): series in shuffled files give
the Kaggle slices in any orientation, masks go back as a SEG on the source instances (read back by
highdicom and pydicom) and as NIfTI in scanner coordinates, and broken studies fail clearly."""

from __future__ import annotations

import gzip
import io
import shutil
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from volume_support import SPACING, dcm_files, reorient, rotation, write_dicom_series, write_study

from core.formats.dicom import iter_series, read_dicom
from core.formats.dicom_seg import dicom_seg_bytes
from core.formats.nifti import nifti_mask_bytes
from core.formats.volume import (
    DuplicateSliceError,
    Limits,
    MissingSequenceError,
    MixedOrientationError,
    NoPixelDataError,
    SeveralSeriesError,
    SliceGapError,
    SpacingError,
    VolumeTooLarge,
    ZipBombError,
    sequence_name,
)

ORIENTATIONS = {
    "axial display": (("L", "P", "S"), None),
    "rows anterior, columns right": (("R", "A", "S"), None),
    "slices toward the feet": (("L", "P", "I"), None),
    "oblique": (("L", "P", "S"), rotation(12, 0) @ rotation(-8, 2)),
    "coronal acquisition": (("L", "I", "P"), None),
}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from core.data.prepare import read_patients
    from core.data.synth import synthesize

    src = synthesize(tmp_path_factory.mktemp("synth"), patients=1, slices=8, size=64, seed=5)
    return next(read_patients(src))


@pytest.fixture
def study(case, tmp_path):
    info = write_study(tmp_path / "study", case.images)
    return tmp_path / "study", info


@pytest.mark.parametrize("description, sequence", [
    ("AX T2 FLAIR", "flair"), ("COR FLAIR", "flair"), ("t2f", "flair"), ("3D T2 SPACE FLAIR", "flair"),
    ("T1 PRE", "pre"), ("sag T1 MPRAGE", "pre"), ("T1w", "pre"), ("t1n", "pre"), ("T1 FLAIR", "pre"),
    ("T1 POST GAD", "post"), ("AX T1 +C", "post"), ("t1gd", "post"), ("t1ce", "post"), ("T1_MPRAGE_GD", "post"),
    ("T2w", None), ("DWI", None), ("ADC", None), ("Localizer", None), ("T2 TSE", None),
])
def test_sequences_are_recognised_from_series_descriptions(description, sequence):
    assert sequence_name(description) == sequence


def _zip(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
    return target


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_shuffled_series_give_the_kaggle_slices_in_any_orientation(case, tmp_path, orientation):
    axcodes, rotate = ORIENTATIONS[orientation]
    info = write_study(tmp_path / "study", case.images, axcodes, rotate)
    volume = read_dicom(tmp_path / "study")
    assert np.array_equal(volume.images, case.images)
    assert np.allclose(volume.spacing, SPACING, atol=1e-5)
    mask_source, affine = reorient(case.masks, axcodes, rotate=rotate)
    if orientation == "slices toward the feet":  # a DICOM grid runs along its normal, whatever the file order
        mask_source, affine = mask_source[:, :, ::-1], affine @ nib.orientations.inv_ornt_aff(
            [[0, 1], [1, 1], [2, -1]], mask_source.shape)
    assert np.allclose(volume.affine, affine, atol=1e-4) and info["source"].shape[:3] == volume.source_shape
    assert [volume.sources[s].split("'")[1] for s in ("pre", "flair", "post")] == ["T1 PRE", "AX T2 FLAIR",
                                                                                  "T1 POST GAD"]
    assert (volume.plane == "coronal") == (orientation == "coronal acquisition")
    assert np.array_equal(volume.to_source(case.masks), mask_source)


def test_the_seg_references_the_source_series_and_reads_back(case, study):
    folder, info = study
    volume = read_dicom(folder)
    data = dicom_seg_bytes(volume, case.masks, ["background", "tumour"], model="unit-test", version="9")
    seg = hd.seg.segread(io.BytesIO(data))
    flair = [pydicom.dcmread(p, stop_before_pixels=True) for p in dcm_files(folder / "s1")]
    source_uids = [ds.SOPInstanceUID for ds in flair]
    frames = seg.get_pixels_by_source_instance(source_uids, segment_numbers=[1], combine_segments=True)
    by_uid = {ds.SOPInstanceUID: ds for ds in flair}
    mask_source = volume.to_source(case.masks)  # (columns, rows, slices) in slice-position order
    positions = [float(np.dot(by_uid[u].ImagePositionPatient, [0, 0, 1])) for u in source_uids]
    rank = np.argsort(np.argsort(positions))
    for i, uid in enumerate(source_uids):
        assert np.array_equal(frames[i], mask_source[:, :, rank[i]].T), uid
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == flair[0].SeriesInstanceUID
    assert ds.FrameOfReferenceUID == info["study"]["FrameOfReferenceUID"]
    assert ds.StudyInstanceUID == info["study"]["StudyInstanceUID"] and ds.PatientID == "SYNTH001"
    assert ds.SegmentSequence[0].SegmentLabel == "tumour" and ds.ManufacturerModelName == "unit-test"
    referenced = {r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(source_uids)

    empty = hd.seg.segread(io.BytesIO(dicom_seg_bytes(volume, np.zeros_like(case.masks))))
    frames = empty.get_pixels_by_source_instance(source_uids, segment_numbers=[1], combine_segments=True)
    assert frames.shape == (8, 64, 64) and not frames.any()


def test_the_nifti_mask_of_a_series_is_in_scanner_coordinates(case, study):
    folder, _ = study
    volume = read_dicom(folder)
    image = nib.Nifti1Image.from_bytes(gzip.decompress(nifti_mask_bytes(volume, case.masks)))
    assert np.array_equal(np.asanyarray(image.dataobj), volume.to_source(case.masks))
    first = min((pydicom.dcmread(p, stop_before_pixels=True) for p in dcm_files(folder / "s1")),
                key=lambda d: float(d.ImagePositionPatient[2]))
    lps = np.array([float(v) for v in first.ImagePositionPatient])
    assert np.allclose(image.affine[:3, 3], lps * [-1, -1, 1], atol=1e-4)  # voxel (0,0,0) = first slice, RAS
    assert int(image.header["sform_code"]) == 1 and image.header.get_intent()[0] == "label"
    assert volume.volume_ml(case.masks) == pytest.approx(np.count_nonzero(case.masks) * np.prod(SPACING) / 1000)


def test_zip_files_and_bytes_read_like_the_folder(case, study, tmp_path):
    folder, _ = study
    archive = _zip(folder, tmp_path / "study.zip")
    for source in (archive, archive.read_bytes()):
        volume = read_dicom(source)
        assert np.array_equal(volume.images, case.images) and len(volume.datasets) == 8


def test_series_chosen_by_mapping_when_descriptions_say_nothing(case, tmp_path):
    write_study(tmp_path / "study", case.images, descriptions=("series A", "series B", "series C"))
    with pytest.raises(MissingSequenceError, match="no FLAIR"):
        read_dicom(tmp_path / "study")
    uid = next(s["uid"] for s in iter_series(tmp_path / "study") if s["description"] == "series C")
    volume = read_dicom(tmp_path / "study", series={"flair": "2", "t1": "series a", "t1c": uid})
    assert np.array_equal(volume.images, case.images)


def _rewrite(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def _by_position(folder: Path) -> list[Path]:
    return sorted(dcm_files(folder), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


def test_broken_series_fail_clearly(case, tmp_path):
    def fresh(name: str) -> Path:
        write_study(tmp_path / name, case.images)
        return tmp_path / name

    folder = fresh("mixed")
    _rewrite(_by_position(folder / "s1")[3], ImageOrientationPatient=[1, 0, 0, 0, 0.8, 0.6])
    with pytest.raises(MixedOrientationError, match="ImageOrientationPatient"):
        read_dicom(folder)
    folder = fresh("gap")
    _by_position(folder / "s1")[4].unlink()
    with pytest.raises(SliceGapError, match="gap in slice positions.*1 slice"):
        read_dicom(folder)
    folder = fresh("uneven")
    shifted = _by_position(folder / "s1")[4]
    position = [float(v) for v in pydicom.dcmread(shifted).ImagePositionPatient]
    _rewrite(shifted, ImagePositionPatient=[position[0], position[1], position[2] + 1.2])
    with pytest.raises(SpacingError, match="inconsistent slice spacing"):
        read_dicom(folder)
    folder = fresh("spacing")
    _rewrite(_by_position(folder / "s1")[2], PixelSpacing=[0.9, 0.7])
    with pytest.raises(SpacingError, match="PixelSpacing"):
        read_dicom(folder)
    folder = fresh("duplicate")
    copy = folder / "s1" / "copy.dcm"
    shutil.copy(_by_position(folder / "s1")[2], copy)
    _rewrite(copy, SOPInstanceUID=generate_uid())
    with pytest.raises(DuplicateSliceError, match="one slice position"):
        read_dicom(folder)
    folder = fresh("nopixels")
    _rewrite(_by_position(folder / "s1")[5], PixelData=None)
    with pytest.raises(NoPixelDataError, match="no pixel data"):
        read_dicom(folder)


def test_several_series_where_one_was_expected(case, tmp_path):
    folder = tmp_path / "study"
    write_study(folder, case.images, descriptions=("T1 PRE", "AX T2 FLAIR", "COR FLAIR"))
    with pytest.raises(SeveralSeriesError, match="2 series look like FLAIR"):
        read_dicom(folder)
    volume = read_dicom(folder, series={"pre": "1", "flair": "AX T2 FLAIR"})
    assert volume.filled == ("post",) and np.array_equal(volume.images[..., 1], case.images[..., 1])
    for path in dcm_files(folder / "s2"):  # now two series share one description
        _rewrite(path, SeriesDescription="AX T2 FLAIR")
    with pytest.raises(SeveralSeriesError, match="2 series match"):
        read_dicom(folder, series={"flair": "AX T2 FLAIR"})


def test_limits_are_checked_before_pixels_and_zip_bombs_refused(case, study, tmp_path):
    folder, _ = study
    with pytest.raises(VolumeTooLarge, match="voxels"):
        read_dicom(folder, limits=Limits(max_voxels=64 * 64 * 8))
    with pytest.raises(VolumeTooLarge, match="files"):
        read_dicom(folder, limits=Limits(max_files=10))
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("huge.dcm", bytes(16 << 20))
    assert bomb.stat().st_size < (1 << 20)
    with pytest.raises(ZipBombError, match="expands"):
        read_dicom(bomb)
    with pytest.raises(ZipBombError, match="uncompressed"):
        read_dicom(_zip(folder, tmp_path / "study.zip"), limits=Limits(max_bytes=100_000))
    huge = tmp_path / "huge"
    write_dicom_series(huge, np.zeros((4, 4, 2), np.uint16), np.diag([1.0, 1, 1, 1]), "FLAIR")
    for path in dcm_files(huge):
        _rewrite(path, Rows=60000, Columns=60000)  # claims 3.6 G pixels; the data is 32 bytes
    with pytest.raises(VolumeTooLarge, match="voxels"):
        read_dicom(huge)


def test_files_pydicom_ships(tmp_path):
    path = Path(get_testdata_file("MR_small.dcm"))
    single = read_dicom(path)
    assert single.images.shape == (1, 64, 64, 3) and single.filled == ("pre", "post")
    assert any("one slice" in n for n in single.notes) and any("taken as FLAIR" in n for n in single.notes)
    template = pydicom.dcmread(path)
    series_uid, pixels = generate_uid(), template.pixel_array
    z0 = float(template.ImagePositionPatient[2])
    order = [2, 0, 3, 1]  # written out of order; each slice shifted so the order shows in the pixels
    for i, k in enumerate(order):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series_uid, generate_uid(), i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], z0 + 0.8 * k]
        ds.PixelData = np.ascontiguousarray(np.roll(pixels, 5 * k, axis=1)).tobytes()
        ds.save_as(tmp_path / f"{i}.dcm")
    volume = read_dicom(tmp_path)
    assert volume.images.shape == (4, 64, 64, 3) and np.allclose(volume.spacing, (0.8, 0.3125, 0.3125))
    flair = volume.images[..., 1].astype(int)
    for k in range(1, 4):  # slice k is slice 0 rolled by 5k columns (up to the percentile rescale)
        assert np.abs(np.roll(flair[0], 5 * k, axis=1) - flair[k]).max() <= 1
    seg = hd.seg.segread(io.BytesIO(dicom_seg_bytes(volume, volume.images[..., 1] > 128)))
    assert seg.number_of_segments == 1 and seg.FrameOfReferenceUID == template.FrameOfReferenceUID


def test_label_maps_become_one_segment_per_class(case, study):
    folder, _ = study
    volume = read_dicom(folder)
    labels = np.zeros(case.masks.shape, np.uint8)
    labels[2:5, 10:20, 10:20], labels[3:6, 30:40, 30:40], labels[4, 50:60, 5:15] = 1, 2, 3
    names = ["background", "tumour_core", "oedema", "csf"]
    ds = pydicom.dcmread(io.BytesIO(dicom_seg_bytes(volume, labels, names)))
    assert [s.SegmentLabel for s in ds.SegmentSequence] == names[1:]
    assert ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Edema"
    seg = hd.seg.Segmentation.from_dataset(ds)
    uids = [d.SOPInstanceUID for d in volume.datasets]
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    assert np.array_equal(frames, volume.to_source(labels).transpose(2, 1, 0))
    with pytest.raises(ValueError, match="no class name"):
        dicom_seg_bytes(volume, labels, names[:3])
