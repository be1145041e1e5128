"""A folder of slice files is one volume the same way on every path: `core predict`, `serve predict` and
`serve batch` stack its files in one order (core.formats.cases.slice_order) and map 16-bit intensities with
one scale for the whole volume (core.formats.intensity, as NIfTI and DICOM), as the decoders do for a
multi-page TIFF or an .npy volume; a slice sent alone is its own scope."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.formats import codecs
from core.formats.cases import slice_number, slice_order
from core.formats.intensity import to_uint8
from core.inference.jobs import collect_jobs
from core.inference.predict import read_slices
from serve import client
from serve.batch.plan import plan
from serve.batch.stages import read_patient
from serve.batch.store import Store

SIZE = 48
HOT = (3, 20, 17)  # (slice, row, column) of the planted hot pixel


def _write(folder: Path, slices: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    for name, array in slices.items():
        tifffile.imwrite(folder / name, array)
    return folder


def _core_volume(folder: Path) -> tuple[list[str], np.ndarray]:
    """What `core predict` stacks from a patient folder: its files and its (N,H,W,3) uint8 slices."""
    (job,) = collect_jobs([folder])
    entries, images = read_slices(job)
    return [path.name for path, _ in entries], images


def _client_volume(folder: Path) -> tuple[list[str], np.ndarray]:
    """What `serve predict` sends for a patient folder: its files and the .npy volume of its request."""
    (job,) = client.collect([folder])
    body, kind, images, volume = client.load(job)
    assert volume and kind == codecs.NPY
    np.testing.assert_array_equal(codecs.decode(body, kind, volume=True), images)  # the server sees the same
    return [f.name for f in job.files], images


def _batch_volume(folder: Path) -> tuple[list[str], dict]:
    """What `serve batch` plans and reads for a patient folder: its files and the row it predicts from."""
    src = Store(str(folder.parent))
    (job,) = [j for j in plan(src) if j["patient"] == folder.name]
    return job["images"], read_patient({"job": json.dumps(job)}, src, classes=1)


# ------------------------------------------------------------------------------------------- order

def test_a_number_inside_the_name_orders_alike_through_core_serve_and_batch(tmp_path: Path) -> None:
    # the slice number is not at the end of the stem: name order (s10, s1, s2) and number order differ
    names = ["s10_flair.tif", "s2_flair.tif", "s1_flair.tif"]
    folder = _write(tmp_path / "patient", {n: np.full((SIZE, SIZE), 10 * slice_number(n), np.uint8) for n in names})
    expected = ["s1_flair.tif", "s2_flair.tif", "s10_flair.tif"]
    core_files, core_images = _core_volume(folder)
    client_files, client_images = _client_volume(folder)
    batch_files, row = _batch_volume(folder)
    assert core_files == client_files == batch_files == expected
    assert [int(s[0, 0, 0]) for s in core_images] == [10, 20, 100]  # the pixels follow the files
    np.testing.assert_array_equal(core_images, client_images)
    np.testing.assert_array_equal(core_images, row["images"])


def test_kaggle_names_sort_by_k_and_masks_stay_out(tmp_path: Path) -> None:
    slices = {f"TCGA_CS_4941_19960909_{k}.tif": np.full((SIZE, SIZE), k, np.uint8) for k in (12, 1, 2, 10, 3)}
    slices.update({f"TCGA_CS_4941_19960909_{k}_mask.tif": np.zeros((SIZE, SIZE), np.uint8) for k in (12, 1, 2, 10, 3)})
    folder = _write(tmp_path / "TCGA_CS_4941_19960909", slices)
    for files, images in (_core_volume(folder), _client_volume(folder)):
        assert [slice_number(f) for f in files] == [1, 2, 3, 10, 12]
        assert [int(s[0, 0, 0]) for s in images] == [1, 2, 3, 10, 12]
    assert slice_order(["b.tif"]) == ["b.tif"]  # a lone file needs no number


def test_slices_without_a_number_are_refused_by_name(tmp_path: Path) -> None:
    folder = _write(tmp_path / "patient", {n: np.zeros((SIZE, SIZE), np.uint8)
                                           for n in ("flair.tif", "post.tif", "s3_flair.tif")})
    for collect in (collect_jobs, client.collect):
        with pytest.raises(ValueError, match=r"no slice number in the name of .*flair\.tif, .*post\.tif"):
            collect([folder])
    _, row = _batch_volume(folder)  # the cohort goes on: this patient fails, named
    meta = json.loads(row["meta"])
    assert "post.tif" in meta["error"] and meta["bad_files"] == [str(folder)] and len(row["images"]) == 0


def test_two_slices_with_one_number_are_refused(tmp_path: Path) -> None:
    folder = _write(tmp_path / "patient", {n: np.zeros((SIZE, SIZE), np.uint8)
                                           for n in ("s2_flair.tif", "s2_post.tif", "s3_flair.tif")})
    for collect in (collect_jobs, client.collect):
        with pytest.raises(ValueError, match=r"s2_flair\.tif, .*s2_post\.tif have the same slice number 2"):
            collect([folder])
    with pytest.raises(ValueError, match="same slice number 7"):
        slice_order(["a_7.tif", "a_007.png"])


# ------------------------------------------------------------------------------------ 16-bit scale

def _uint16_patient(n: int = 6) -> np.ndarray:
    """(n,H,W) uint16 slices of one 12-bit-like scan, alike slice to slice, zero background round a head;
    slice HOT[0] has one pixel at the 16-bit maximum."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    head = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (SIZE * 0.42) ** 2
    base = np.where(head, 400 + 12 * xx + rng.integers(0, 300, (SIZE, SIZE)), 0).astype(np.uint16)
    stack = np.repeat(base[None], n, axis=0)
    stack[HOT] = 65535
    return stack


def _check_hot_slice(images: np.ndarray, where: str) -> None:
    """The hot slice's other pixels get (nearly) the uint8 levels its neighbours get."""
    k = HOT[0]
    assert images.dtype == np.uint8 and images.shape[-1] == 3, where
    others = np.ones((SIZE, SIZE), bool)
    others[HOT[1:]] = False
    for neighbour in (k - 1, k + 1):
        assert images[neighbour, ..., 1].max() >= 200, where  # a real range: a dark slice would show
        diff = np.abs(images[k].astype(int) - images[neighbour].astype(int))[others]
        assert diff.max() <= 1, f"{where}: hot slice differs from slice {neighbour} by {diff.max()} levels"


def test_a_hot_pixel_does_not_rescale_its_slice_on_any_volume_path(tmp_path: Path) -> None:
    stack = _uint16_patient()
    folder = _write(tmp_path / "patient", {f"P_{k + 1}.tif": s for k, s in enumerate(stack)})
    expected = np.repeat(to_uint8(stack)[..., None], 3, axis=-1)  # the volume's one percentile window
    volumes = {"core predict folder": _core_volume(folder)[1], "serve predict folder": _client_volume(folder)[1],
               "serve batch folder": _batch_volume(folder)[1]["images"],
               "multi-page TIFF": codecs.decode(_tiff_bytes(stack), codecs.TIFF, volume=True),
               "NPY volume": codecs.decode(codecs.encode_npy(stack), codecs.NPY, volume=True)}
    for where, images in volumes.items():
        _check_hot_slice(images, where)
        np.testing.assert_array_equal(images, expected, err_msg=where)


def _tiff_bytes(stack: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, stack, photometric="minisblack")
    return buffer.getvalue()


def test_a_slice_sent_alone_is_its_own_scope_and_bit_depths_do_not_mix(tmp_path: Path) -> None:
    stack = _uint16_patient()
    alone = codecs.decode(codecs.encode_npy(stack[HOT[0]]), codecs.NPY, volume=False)
    np.testing.assert_array_equal(alone[0, ..., 0], to_uint8(stack[HOT[0]]))
    folder = _write(tmp_path / "patient", {"P_1.tif": stack[0], "P_2.tif": (stack[1] >> 8).astype(np.uint8)})
    with pytest.raises(ValueError, match=r"P_2\.tif: 8-bit, but .*P_1\.tif is 16-bit"):
        _core_volume(folder)
