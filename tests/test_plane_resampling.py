"""Sagittal and coronal scans: a thick-sliced one is resampled to square axial pixels, segmented there, and its
mask mapped back to its own grid (core.formats.volume.axial_grid, core.formats.regrid), the same on every
path (core, HTTP, SageMaker, `core predict`, `serve batch`); one too thick or too short is a 422 naming its
plane.

The scans: a synthetic head (2 x 1 x 1 mm, 32 x 100 x 100) with a bright FLAIR lesion, and the same head as a
scanner would acquire it sagittally or coronally with 5 mm slices (each the mean of five 1 mm ones, on an
affine that keeps every voxel where it was). The resampled grid is then the axial one, so masks compare
voxel for voxel there and, brought back, on the thick grid.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from bundle_factory import make_random_bundle
from sagemaker_sim import ATTRIBUTES, run_handlers
from scan_support import read_nifti_bytes
from volume_support import canonical_affine, reorient, write_nifti

from core.formats.media import error_answer
from core.formats.nifti import read_nifti
from core.formats.regrid import labels_to
from core.formats.volume import PlaneError, Volume
from core.inference.predictor import Predictor
from core.inference.results import segment_volume
from core.inference.slices import SlicePredictor

SPACING = (2.0, 1.0, 1.0)  # the axial head's (slice, row, column) mm
SHAPE = (32, 100, 100)
THICK = 5  # mm of a sagittal or coronal slice: five 1 mm columns (sagittal) or rows (coronal)
# plane -> (canonical axis the slices cut, the NIfTI's storage axes: slices along its third)
PLANES = {"sagittal": (2, ("A", "S", "L")), "coronal": (1, ("L", "S", "P"))}
SEQUENCES = ["pre", "flair", "post"]
# The lesion is ~24 mm across; a mask one 5 mm source slice off on either side would score about
# 2 x 24 / (24 + 34) = 0.83, so 0.9 asks for boundaries well inside one thick slice (measured: 0.98).
MIN_DICE = 0.9


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * float(np.count_nonzero(a & b)) / max(1, int(a.sum() + b.sum()))


def synthetic_head() -> np.ndarray:
    """(N,H,W,3) uint8 canonical slices: a brain ellipsoid with a FLAIR-bright, T1-dark lesion (no texture)."""
    z, y, x = (np.indices(SHAPE).astype(np.float32) * np.reshape(SPACING, (3, 1, 1, 1)))
    brain = (((z - 32) / 34) ** 2 + ((y - 50) / 44) ** 2 + ((x - 50) / 38) ** 2) < 1
    lesion = np.exp(-1.5 * (((z - 34) / 14) ** 2 + ((y - 42) / 13) ** 2 + ((x - 36) / 12) ** 2)) * brain
    channels = [brain * 110 - 30 * lesion, brain * 90 + 180 * lesion, brain * 100 + 60 * lesion]
    return np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8)


def thicken(images: np.ndarray, plane: str, slices: int = THICK, keep: int | None = None
            ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Canonical slices as ``plane`` acquires them with slices ``slices`` mm thick (the mean of that many 1 mm
    ones; the first ``keep`` of them), still canonical, and their (slice, row, column) spacing."""
    axis = PLANES[plane][0]
    n = images.shape[axis] // slices
    kept = np.take(images, range(n * slices), axis=axis).astype(np.float32)
    shape = list(kept.shape)
    shape[axis: axis + 1] = [n, slices]
    thick = np.rint(kept.reshape(shape).mean(axis=axis + 1)).astype(np.uint8)
    if keep is not None:
        thick = np.take(thick, range(keep), axis=axis)
    spacing = list(SPACING)
    spacing[axis] *= slices
    return thick, (spacing[0], spacing[1], spacing[2])


def thick_scan(images: np.ndarray, plane: str, path: Path, slices: int = THICK, keep: int | None = None) -> Path:
    """``thicken``'s scan written as a NIfTI stored in ``plane`` whose affine puts every voxel where it was."""
    axis, axcodes = PLANES[plane]
    thick, spacing = thicken(images, plane, slices, keep)
    fine = canonical_affine(SPACING)
    affine = canonical_affine(spacing)
    affine[:3, 3] = fine[:3, 3] + fine[:3, axis] * (slices - 1) / 2  # a thick voxel's centre: its slab's middle
    source, source_affine = reorient(thick, axcodes, affine=affine)
    return write_nifti(path, source, source_affine)


class BrightFlair(SlicePredictor):
    """A network that is a FLAIR threshold at the slice's own pixels: what a plane's geometry does to a mask,
    with no model in the way."""

    def __init__(self, config: dict) -> None:
        self._configure(config, {}, 16)

    def _forward(self, batch: np.ndarray, stats: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(batch[..., 1].astype(np.float32) - 150.0) / 8.0))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("plane") / "bundle",
                              postprocess={"min_volume_mm3": 40.0, "largest_component": True})


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    """The axial head and its sagittal and coronal acquisitions, and two a reader must refuse: sagittal with
    10 mm slices, coronal with 6 slices."""
    folder = tmp_path_factory.mktemp("scans")
    images = synthetic_head()
    source, affine = reorient(images, ("R", "A", "S"), affine=canonical_affine(SPACING))
    out = {"axial": write_nifti(folder / "axial.nii.gz", source, affine)}
    for plane in PLANES:
        out[plane] = thick_scan(images, plane, folder / f"{plane}.nii.gz")
    out["too_thick"] = thick_scan(images, "sagittal", folder / "too_thick.nii.gz", slices=10)
    out["too_few"] = thick_scan(images, "coronal", folder / "too_few.nii.gz", keep=6)
    return out


def plane_notes(notes: list[str]) -> list[str]:
    """The notes on the acquisition plane (the others name the file, which differs between paths)."""
    return [n for n in notes if " acquisition" in n]


def _read(path: Path) -> Volume:
    return read_nifti(path, sequences=SEQUENCES)


# ------------------------------------------------------------------------------------------------ core


@pytest.mark.parametrize("plane", list(PLANES))
def test_a_thick_plane_is_resampled_to_axial_and_its_mask_mapped_back(bundle, scans, plane) -> None:
    oracle = BrightFlair(json.loads((bundle / "config.json").read_text()))
    axial = _read(scans["axial"])
    assert axial.resampled_from is None and axial.spacing == pytest.approx(SPACING)
    reference = segment_volume(oracle, axial).masks
    assert reference.sum() > 1000
    volume = _read(scans[plane])
    assert volume.images.shape[:3] == SHAPE and volume.spacing == pytest.approx(SPACING)  # the axial grid again
    assert volume.source_spacing[PLANES[plane][0]] == pytest.approx(THICK)
    assert volume.voxel_ml == pytest.approx(np.prod(SPACING) / 1000)
    assert any(n.startswith(f"{plane} acquisition resampled to axial at 1 x 1 mm in-plane") and "mapped back" in n
               for n in volume.notes), volume.notes
    result = segment_volume(oracle, volume)
    assert dice(result.masks, reference) >= MIN_DICE  # on the axial grid
    on_source = volume.to_source(result.masks)
    assert on_source.shape == volume.source_shape
    assert dice(on_source, volume.to_source(reference)) >= MIN_DICE  # on the thick grid
    assert result.volume_ml == pytest.approx(axial.volume_ml(reference), rel=0.05)
    assert volume.volume_ml(on_source) == pytest.approx(result.volume_ml, rel=0.1)  # source voxels, 5x larger


def test_near_cubic_voxels_are_only_reordered(scans, tmp_path) -> None:
    images = synthetic_head()
    source, affine = reorient(images, PLANES["sagittal"][1], affine=canonical_affine((1.1, 1.0, 1.0)))
    volume = _read(write_nifti(tmp_path / "iso.nii.gz", source, affine))
    assert volume.resampled_from is None and np.array_equal(volume.images, images)
    assert any("reordering its voxels" in n for n in volume.notes)
    masks = (images[..., 1] > 150).astype(np.uint8)
    assert np.array_equal(volume.to_canonical(volume.to_source(masks)), masks)


@pytest.mark.parametrize("name, plane, why", [("too_thick", "sagittal", "10 mm apart"),
                                              ("too_few", "coronal", "6 slices")])
def test_too_thick_or_too_few_slices_are_a_422_naming_the_plane(scans, name, plane, why) -> None:
    with pytest.raises(PlaneError) as err:
        _read(scans[name])
    status, body = error_answer(err.value)
    assert status == 422 and body["error"] == "unusable_plane"
    assert body["detail"].startswith(f"{plane} acquisition of") and why in body["detail"], body


def test_a_coronal_dicom_series_is_resampled_and_its_seg_is_on_its_instances(scans, tmp_path) -> None:
    import highdicom as hd
    from volume_support import read_headers, write_study

    from core.formats.dicom import read_dicom
    from core.formats.dicom_seg import dicom_seg_bytes

    thick, spacing = thicken(synthetic_head(), "coronal")
    write_study(tmp_path / "study", thick, PLANES["coronal"][1], spacing=spacing)
    volume = read_dicom(tmp_path / "study")
    assert np.array_equal(volume.images, _read(scans["coronal"]).images)  # as the NIfTI of the same slices
    assert volume.resampled_from == thick.shape[:3] and volume.spacing == pytest.approx(SPACING)
    assert any(n.startswith("coronal acquisition resampled to axial") for n in volume.notes)
    masks = (volume.images[..., 1] > 150).astype(np.uint8)
    source = volume.to_source(masks)  # (columns, rows, slices): L, S, P
    assert source.shape == (100, 32, 20) and source.any()
    seg = hd.seg.segread(io.BytesIO(dicom_seg_bytes(volume, masks)))
    flair = read_headers(tmp_path / "study" / "s1")
    normal = np.cross(*np.reshape(np.asarray(flair[0].ImageOrientationPatient, float), (2, 3)))
    flair.sort(key=lambda d: float(np.dot(np.asarray(d.ImagePositionPatient, float), normal)))  # the grid's order
    frames = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in flair], segment_numbers=[1],
                                               combine_segments=True)
    for k in range(len(flair)):
        np.testing.assert_array_equal(frames[k], source[:, :, k].T)


def test_labels_go_back_by_the_label_covering_most_of_a_voxel() -> None:
    fine = np.zeros((1, 2, 10), np.uint8)
    fine[0, :, 2:8] = 1  # source voxel 0 (fine 0-4) holds 3 of 5, voxel 1 (fine 5-9) 3 of 5
    fine[0, 1, 2:5] = 2  # row 1: voxel 0 is 2 for 3 of 5
    assert labels_to(fine, (1, 2, 2)).tolist() == [[[1, 1], [2, 1]]]


# ------------------------------------------------------------------------------ every path, one answer


@pytest.fixture(scope="module")
def expected(bundle, scans) -> dict[str, dict]:
    """Core's answer with the bundle for each plane: the source-grid mask, its notes and its mL."""
    predictor = Predictor.from_bundle(bundle, "cpu")
    out = {}
    for plane in PLANES:
        result = segment_volume(predictor, _read(scans[plane]))
        out[plane] = {"mask": result.volume.to_source(result.masks), "notes": plane_notes(result.volume.notes),
                      "ml": result.volume_ml, "pixels": int(result.masks.sum())}
        assert out[plane]["pixels"] > 0
    return out


@pytest.fixture(scope="module")
def url(ray_session, bundle):
    from serve_support import serving

    from serve.app import ServeSettings

    with serving({"/": ServeSettings(bundle=str(bundle), max_slices=64)}) as urls:
        yield urls["/"]


def _post(url: str, path: Path, **params) -> httpx.Response:
    return httpx.post(f"{url}/v1/segment/volume", content=path.read_bytes(), timeout=120,
                      headers={"Content-Type": "application/gzip"}, params={"sequences": "pre,flair,post", **params})


def test_planes_over_http(url, scans, expected) -> None:
    for plane in PLANES:
        r = _post(url, scans[plane], format="nifti")
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.asanyarray(read_nifti_bytes(r.content).dataobj), expected[plane]["mask"])
        assert plane_notes(json.loads(r.headers["X-Notes"])) == expected[plane]["notes"]
        assert r.headers["X-Spacing-mm"] == "2,1,1"
        body = _post(url, scans[plane], format="json").json()
        assert body["volume_ml"] == pytest.approx(expected[plane]["ml"]) and body["spacing_mm"] == list(SPACING)
        assert body["tumour_pixels"] == expected[plane]["pixels"] and body["scan"]["plane"] == plane
    r = _post(url, scans["too_thick"])
    assert r.status_code == 422 and r.json()["error"] == "unusable_plane" and "sagittal" in r.json()["detail"]


def test_planes_through_sagemaker(bundle, scans, expected, aws, tmp_path) -> None:
    named = {ATTRIBUTES: "sequences=pre,flair,post"}
    gz, js = "application/gzip", "application/json"
    requests = {f"{p}_{a}": (scans[p].read_bytes(), gz, accept, named) for p in PLANES for a, accept in
                (("nifti", gz), ("json", js))}
    requests["too_thick"] = (scans["too_thick"].read_bytes(), gz, js, named)
    res = run_handlers(bundle, requests, tmp_path, {**aws["env"]})
    for plane in PLANES:
        r, out = res[f"{plane}_nifti"]
        assert r["status"] == 200, out[:300]
        np.testing.assert_array_equal(np.asanyarray(read_nifti_bytes(out).dataobj), expected[plane]["mask"])
        assert plane_notes(json.loads(r["headers"][ATTRIBUTES].split("notes=", 1)[1])) == expected[plane]["notes"]
        body = json.loads(res[f"{plane}_json"][1])
        assert body["volume_ml"] == pytest.approx(expected[plane]["ml"])
        assert plane_notes(body["notes"]) == expected[plane]["notes"]
    r, out = res["too_thick"]
    refusal = json.loads(out.decode().split("\n", 1)[0])
    assert r["status"] == 422 and refusal["error"] == "unusable_plane" and "sagittal" in refusal["detail"]


def test_planes_in_core_predict_and_serve_batch(ray_session, bundle, scans, expected, tmp_path) -> None:
    from core.cli import dispatch
    from serve.batch.run import BatchOptions, run_batch

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for plane in PLANES:
        (cohort / f"{plane}.nii.gz").write_bytes(scans[plane].read_bytes())
    argv = ["predict", "--bundle", str(bundle), "--device", "cpu", "--sequences", "pre,flair,post",
            *[str(cohort / f"{p}.nii.gz") for p in PLANES], "--out", str(tmp_path / "core")]
    assert dispatch("core", "", ["core.inference.cli"], argv) == 0
    summary = run_batch(BatchOptions(bundle=str(bundle), src=str(cohort), out=str(tmp_path / "batch"), workers=1,
                                     batch_size=8, progress=False, sequences=SEQUENCES))
    assert sorted(summary["segmented"]) == sorted(PLANES), summary
    for plane in PLANES:
        side = json.loads((tmp_path / "core" / f"{plane}_volume.json").read_text())
        assert plane_notes(side["notes"]) == expected[plane]["notes"]
        assert side["volume_ml"] == pytest.approx(expected[plane]["ml"])
        for mask in ((tmp_path / "core" / f"{plane}_mask.nii.gz"), *(tmp_path / "batch").rglob(f"{plane}*.nii.gz")):
            got = np.asanyarray(read_nifti_bytes(mask.read_bytes()).dataobj)
            np.testing.assert_array_equal(got, expected[plane]["mask"], err_msg=str(mask))
        record = json.loads((tmp_path / "batch" / plane / "patient.json").read_text())
        assert record["volume_ml"] == pytest.approx(expected[plane]["ml"])
        assert plane_notes(record["notes"]) == expected[plane]["notes"]

