"""NIfTI in and out (core.formats.nifti): any stored orientation gives the Kaggle slices, masks go back
onto the source grid with the source header, channels map by name, bad files fail clearly."""

from __future__ import annotations

import gzip
import io
import json
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from volume_support import SPACING, reorient, rotation, write_nifti

from core.formats.nifti import nifti_mask_bytes, nifti_mask_image, read_nifti
from core.formats.volume import (
    DimensionError,
    Limits,
    MissingSequenceError,
    NonFiniteError,
    UnreadableVolume,
    VolumeError,
    VolumeTooLarge,
    to_uint8,
    volume_ml,
)

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
KAGGLE = ["pre", "flair", "post"]  # the synthetic scans' channels, named: three volumes are never guessed
LAYOUTS = {
    "LPS (DICOM-like)": (("L", "P", "S"), None),
    "RAS (nibabel canonical)": (("R", "A", "S"), None),
    "flipped LAI": (("L", "A", "I"), None),
    "permuted ASR": (("A", "S", "R"), None),
    "oblique RAS": (("R", "A", "S"), rotation(15, 2) @ rotation(-10, 0)),
    "oblique permuted": (("P", "R", "S"), rotation(25, 1)),
}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """One synthetic patient (8 slices of 64x64, Kaggle orientation and channels) and its mask."""
    from core.data.prepare import read_patients
    from core.data.synth import synthesize

    src = synthesize(tmp_path_factory.mktemp("synth"), patients=1, slices=8, size=64, seed=3)
    return next(read_patients(src))


def _mask_back(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_any_orientation_gives_the_kaggle_slices_and_the_mask_goes_back_exactly(case, tmp_path, layout):
    axcodes, rotate = LAYOUTS[layout]
    source, affine = reorient(case.images, axcodes, rotate=rotate)
    path = write_nifti(tmp_path / "scan.nii.gz", source, affine)
    volume = read_nifti(path, sequences=KAGGLE)
    assert np.array_equal(volume.images, case.images)  # reordered, never resampled
    assert np.allclose(volume.spacing, SPACING, atol=1e-5)
    assert volume.source_shape == source.shape[:3] and volume.filled == ()

    mask_source, _ = reorient(case.masks, axcodes, rotate=rotate)
    assert np.array_equal(volume.to_source(case.masks), mask_source)
    written = _mask_back(nifti_mask_bytes(volume, case.masks))
    stored = nib.load(path)
    assert written.get_data_dtype() == np.uint8 and np.array_equal(np.asanyarray(written.dataobj), mask_source)
    assert np.array_equal(written.affine, stored.affine)
    assert np.array_equal(written.header.get_sform(), stored.header.get_sform())
    assert np.array_equal(written.header.get_qform(), stored.header.get_qform())
    assert int(written.header["sform_code"]) == int(stored.header["sform_code"]) == 1
    assert written.header.get_intent()[0] == "label"


def test_bytes_read_like_the_file(case, tmp_path):
    source, affine = reorient(case.images, ("R", "A", "S"))
    path = write_nifti(tmp_path / "scan.nii.gz", source, affine)
    from_bytes = read_nifti(path.read_bytes(), sequences=KAGGLE)
    assert np.array_equal(from_bytes.images, read_nifti(path, sequences=KAGGLE).images)
    assert np.array_equal(from_bytes.affine, read_nifti(path, sequences=KAGGLE).affine)
    uncompressed = read_nifti(gzip.decompress(path.read_bytes()), sequences=KAGGLE)
    assert np.array_equal(uncompressed.images, case.images)


def test_channel_files_follow_the_dataset_channel_names(case, tmp_path):
    dataset = tmp_path / "Dataset001_Mine"
    (dataset / "imagesTs").mkdir(parents=True)
    names = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    (dataset / "dataset.json").write_text(json.dumps({"channel_names": names, "labels": {"background": 0},
                                                      "file_ending": ".nii.gz"}))
    order = [1, 0, 2]  # FLAIR, pre-contrast, post-contrast as Kaggle channels
    for i, c in enumerate(order):
        source, affine = reorient(case.images[..., c], ("R", "A", "S"))
        write_nifti(dataset / "imagesTs" / f"brain_{i:04d}.nii.gz", source, affine)
    t2 = np.full(source.shape, 7, np.uint8)
    write_nifti(dataset / "imagesTs" / "brain_0003.nii.gz", t2, affine)
    volume = read_nifti(dataset / "imagesTs" / "brain_0002.nii.gz")  # any channel file brings its case
    assert volume.name == "brain" and np.array_equal(volume.images, case.images)
    assert volume.sources == {"flair": "brain_0000.nii.gz", "pre": "brain_0001.nii.gz", "post": "brain_0002.nii.gz"}
    swapped = read_nifti(dataset / "imagesTs" / "brain_0000.nii.gz", sequences=["flair", "t1c", "t1", "-"])
    assert np.array_equal(swapped.images[..., 0], case.images[..., 2])
    assert np.array_equal(swapped.images[..., 2], case.images[..., 0])


def test_a_missing_sequence_is_a_copy_of_flair(case, tmp_path):
    source, affine = reorient(case.images[..., 1], ("L", "P", "S"))
    volume = read_nifti(write_nifti(tmp_path / "flair.nii.gz", source, affine))
    for c in range(3):
        assert np.array_equal(volume.images[..., c], case.images[..., 1])
    assert volume.filled == ("pre", "post") and any("copy of FLAIR" in n for n in volume.notes)
    with pytest.raises(MissingSequenceError, match="no FLAIR"):
        read_nifti(tmp_path / "flair.nii.gz", sequences=["t1"])


def test_scanner_intensities_are_rescaled_by_their_own_percentiles(case, tmp_path):
    flair = case.images[..., 1].astype(np.float32)
    scanner = flair * 13.7 + np.where(flair > 0, 40.0, 0.0)  # gain and offset, background kept zero
    source, affine = reorient(scanner, ("R", "A", "S"))
    float_volume = read_nifti(write_nifti(tmp_path / "float.nii.gz", source, affine, np.float32))
    int_volume = read_nifti(write_nifti(tmp_path / "int.nii.gz", np.round(source * 2.5), affine, np.uint16))
    got = float_volume.images[..., 1]
    assert got.dtype == np.uint8 and np.array_equal(got[flair == 0], np.zeros(int((flair == 0).sum()), np.uint8))
    nonzero = scanner[scanner != 0]
    lo, hi = np.percentile(nonzero, (0.5, 99.5))
    expected = np.where(scanner != 0, np.round(np.clip((scanner - lo) / (hi - lo), 0, 1) * 255), 0)
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert (got[scanner >= hi] == 255).all()
    order = np.argsort(scanner, axis=None, kind="stable")
    assert (np.diff(got.ravel()[order].astype(int)) >= 0).all()  # monotone: the contrast is kept
    assert np.abs(int_volume.images.astype(int) - float_volume.images.astype(int)).max() <= 1  # gain-free
    assert np.array_equal(to_uint8(scanner), to_uint8(scanner * 3.0))
    with pytest.raises(VolumeError, match="not 0..255"):
        read_nifti(tmp_path / "float.nii.gz", rescale="none")


def test_volume_in_ml_is_voxel_count_times_voxel_volume(case, tmp_path):
    mask = case.masks
    assert mask.any()
    expected = np.count_nonzero(mask) * SPACING[0] * SPACING[1] * SPACING[2] / 1000
    assert volume_ml(mask, SPACING) == pytest.approx(expected, rel=1e-12)
    for axcodes, rotate in LAYOUTS.values():
        source, affine = reorient(case.images, axcodes, rotate=rotate)
        volume = read_nifti(write_nifti(tmp_path / "v.nii.gz", source, affine), sequences=KAGGLE)
        assert volume.volume_ml(mask) == pytest.approx(expected, rel=1e-5)
        assert volume.volume_ml(volume.to_source(mask)) == pytest.approx(expected, rel=1e-5)
        assert volume_ml(mask, volume.spacing) == pytest.approx(expected, rel=1e-5)


def _patched(path: Path, **fields) -> bytes:
    """The bytes of a NIfTI whose header fields were rewritten (its data left as it was)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:352])))
    for key, value in fields.items():
        header[key] = value
    raw[:348] = header.binaryblock
    return bytes(raw)


def test_bad_files_fail_clearly(case, tmp_path):
    source, affine = reorient(case.images, ("R", "A", "S"))
    good = write_nifti(tmp_path / "good.nii.gz", source, affine)
    nan = source.astype(np.float32)
    nan[3, 4, 5, 1] = np.nan
    with pytest.raises(NonFiniteError, match="NaN"):
        read_nifti(write_nifti(tmp_path / "nan.nii.gz", nan, affine), sequences=KAGGLE)
    with pytest.raises(DimensionError, match="5 dimensions"):
        read_nifti(write_nifti(tmp_path / "5d.nii.gz", source[..., None, :], affine))
    with pytest.raises(VolumeTooLarge, match="voxels"):
        read_nifti(good, limits=Limits(max_voxels=1000))
    with pytest.raises(DimensionError, match="name them"):
        read_nifti(write_nifti(tmp_path / "two.nii.gz", source[..., :2], affine))
    with pytest.raises(UnreadableVolume):
        read_nifti(b"\x1f\x8b" + b"garbage" * 100)
    with pytest.raises(UnreadableVolume):
        read_nifti(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated
    assert issubclass(VolumeTooLarge, ValueError) and VolumeTooLarge("x").status == 413


def test_claimed_size_is_refused_before_decompressing_the_data(case, tmp_path):
    source, affine = reorient(case.images, ("R", "A", "S"))
    good = write_nifti(tmp_path / "good.nii.gz", source, affine)
    huge = _patched(good, dim=[4, 4096, 4096, 4096, 3, 1, 1, 1])
    # Only the header survives; a reader that decompressed further would fail on the garbage instead.
    body = gzip.compress(huge[:4096]) + b"not gzip at all" * 1000
    with pytest.raises(VolumeTooLarge, match="voxels") as err:
        read_nifti(body)
    assert err.value.status == 413
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(huge))
    with pytest.raises(VolumeTooLarge):
        read_nifti(path)
    # A gzip that expands far past what its header claims is decompressed only as far as the claim.
    padded = gzip.compress(gzip.decompress(good.read_bytes()) + bytes(64 << 20), compresslevel=1)
    assert len(padded) < (1 << 20)
    tracemalloc.start()
    try:
        images = read_nifti(padded, sequences=KAGGLE).images
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(images, case.images) and peak < (20 << 20), peak


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz"])
def test_files_nibabel_ships(name):
    path = NIBABEL_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not shipped with this nibabel")
    stored = nib.load(path)
    sequences = None if len(stored.shape) == 3 else ["flair", "-"]
    if sequences:
        with pytest.raises(DimensionError, match="2 channels"):
            read_nifti(path)
    volume = read_nifti(path, sequences=sequences)
    assert volume.source_shape == stored.shape[:3] and volume.images.dtype == np.uint8
    assert volume.images[..., 1].max() == 255 and volume.filled == ("pre", "post")
    rng = np.random.default_rng(0)
    masks = (rng.random(volume.images.shape[:3]) > 0.7).astype(np.uint8)
    written = nifti_mask_image(volume, masks)
    assert type(written) is type(stored)  # NIfTI-2 stays NIfTI-2
    assert np.array_equal(written.affine, stored.affine)
    assert np.array_equal(np.asanyarray(written.dataobj), volume.to_source(masks))
    assert np.array_equal(volume.to_canonical(volume.to_source(masks)), masks)
