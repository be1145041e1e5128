"""nnU-Net v2 raw datasets (core.data.nnunet): export writes our split as splits_final.json, prepare reads
a dataset back into the same arrays, foreign datasets (other channel names, labels, sizes, orientations)
prepare with what they say recorded, and broken ones fail naming the file, writing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from volume_support import reorient, write_nifti

from core.cli import dispatch
from core.data.arrays import SPLITS, load_split, load_split_info
from core.data.nnunet import export_nnunet, prepare_nnunet
from core.data.prepare import DataError, SplitOptions, prepare
from core.formats.volume import to_uint8


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    from core.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth"), patients=4, slices=8, size=64, seed=21)


@pytest.fixture(scope="module")
def prepared(kaggle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(kaggle, out, SplitOptions(val=1, test=1, seed=0), progress=False)
    return out


@pytest.fixture(scope="module")
def exported(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nnunet") / "Dataset501_LGG"
    export_nnunet(prepared, out)
    return out


def test_export_writes_a_raw_dataset_with_our_split(prepared, exported):
    info = load_split_info(prepared)
    meta = json.loads((exported / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "pre-contrast", "1": "FLAIR", "2": "post-contrast"}
    assert meta["labels"] == {"background": 0, "tumour": 1} and meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == 3
    folds = json.loads((exported / "splits_final.json").read_text())
    assert folds == [{"train": info["patients"]["train"], "val": info["patients"]["val"]}]
    train_ids = info["patients"]["train"] + info["patients"]["val"]
    assert sorted(p.name for p in (exported / "labelsTr").iterdir()) == sorted(f"{p}.nii.gz" for p in train_ids)
    assert sorted(p.name for p in (exported / "imagesTr").iterdir()) == sorted(
        f"{p}_{c:04d}.nii.gz" for p in train_ids for c in range(3))
    test_id = info["patients"]["test"][0]
    assert (exported / "labelsTs" / f"{test_id}.nii.gz").is_file()
    image = nib.load(exported / "imagesTr" / f"{train_ids[0]}_0001.nii.gz")
    assert image.shape == (64, 64, 8) and nib.aff2axcodes(image.affine) == ("L", "P", "S")  # axial for every tool
    arrays = load_split(prepared, "train" if train_ids[0] in info["patients"]["train"] else "val")
    rows = np.flatnonzero(arrays.patients == train_ids[0])
    flair = np.asarray(arrays.images[rows, 1])  # (slice, row, column)
    assert np.array_equal(np.asanyarray(image.dataobj).transpose(2, 1, 0), flair)


def test_prepare_reads_the_export_back_into_the_same_arrays(prepared, exported, tmp_path):
    out = tmp_path / "again"
    assert dispatch("core", "", ("core.data.cli",), ["data", "prepare", "--src", str(exported), "--out", str(out),
                                                     "--no-progress"]) == 0
    before, after = load_split_info(prepared), load_split_info(out)
    assert after["patients"] == before["patients"] and after["format"] == "nnunet" and after["fold"] == 0
    assert after["channel_names"] == {"pre": "pre-contrast", "flair": "FLAIR", "post": "post-contrast"}
    assert after["resized"] == {} and after["image_size"] == [64, 64]
    for split in SPLITS:
        a, b = load_split(prepared, split), load_split(out, split)
        order_a, order_b = np.lexsort((a.slices, a.patients)), np.lexsort((b.slices, b.patients))
        for field in ("images", "masks", "patients", "slices"):
            assert np.array_equal(np.asarray(getattr(a, field))[order_a], np.asarray(getattr(b, field))[order_b])


def test_export_from_a_kaggle_folder_splits_like_prepare(kaggle, prepared, tmp_path):
    out = tmp_path / "Dataset502_Kaggle"
    assert dispatch("core", "", ("core.data.cli",), ["data", "export-nnunet", "--src", str(kaggle), "--out",
                                                     str(out), "--val", "1", "--test", "1",
                                                     "--spacing", "3,0.9,0.9"]) == 0
    info = load_split_info(prepared)
    assert json.loads((out / "splits_final.json").read_text()) == [
        {"train": info["patients"]["train"], "val": info["patients"]["val"]}]
    image = nib.load(next((out / "imagesTr").iterdir()))
    assert np.allclose(image.header.get_zooms(), (0.9, 0.9, 3.0))


def _foreign(root: Path, sizes=((64, 64), (48, 56), (64, 64))) -> Path:
    """A BraTS-like dataset: FLAIR, T1w, t1gd, T2w; three labels; float intensities; RAS+ storage."""
    src = root / "Dataset003_Foreign"
    for d in ("imagesTr", "labelsTr"):
        (src / d).mkdir(parents=True)
    meta = {"channel_names": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"background": 0, "edema": 1, "non-enhancing": 2, "enhancing": 3},
            "numTraining": len(sizes), "file_ending": ".nii.gz"}
    (src / "dataset.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        scans = rng.gamma(2.0, 300.0, (6, h, w, 4)).astype(np.float32)
        scans[:, :4] = 0  # background
        labels = np.zeros((6, h, w), np.uint8)
        labels[2:4, 20:30, 20:30] = rng.integers(1, 4, (2, 10, 10))
        for c in range(4):
            write_nifti(src / "imagesTr" / f"brats_{i:03d}_{c:04d}.nii.gz", *reorient(scans[..., c], ("R", "A", "S")))
        write_nifti(src / "labelsTr" / f"brats_{i:03d}.nii.gz", *reorient(labels, ("R", "A", "S")))
        np.save(root / f"truth_{i}.npy", scans[..., 0])
    return src


def test_a_foreign_dataset_prepares_with_its_names_labels_and_sizes_recorded(tmp_path):
    src = _foreign(tmp_path)
    info = prepare_nnunet(src, tmp_path / "prepared", SplitOptions(val=1, test=0, seed=0))
    assert info["class_names"] == ["background", "edema", "non-enhancing", "enhancing"] and info["classes"] == 3
    assert info["channel_names"] == {"pre": "T1w", "flair": "FLAIR", "post": "t1gd"}
    assert info["image_size"] == [64, 64] and info["resized"] == {"brats_001": [48, 56]}
    assert info["fold"] is None and sum(len(v) for v in info["patients"].values()) == 3
    everything = [load_split(tmp_path / "prepared", s) for s in ("train", "val")]
    masks = np.concatenate([np.asarray(a.masks) for a in everything])
    assert set(np.unique(masks).tolist()) <= {0, 1, 2, 3} and masks.max() == 3
    for a in everything:
        rows = np.flatnonzero(a.patients == "brats_000")
        if len(rows):
            assert np.array_equal(np.asarray(a.images[rows, 1]), to_uint8(np.load(tmp_path / "truth_0.npy")))


@pytest.mark.parametrize("breakage, message", [
    ("missing_label", "missing labels"),
    ("regions", "region-based labels"),
    ("label_value", "outside 0..3"),
    ("label_grid", "another grid"),
    ("stray_file", "unexpected file"),
    ("missing_channel", "channel files"),
    ("png", "only NIfTI"),
])
def test_broken_datasets_fail_naming_the_problem_and_write_nothing(tmp_path, breakage, message):
    src = _foreign(tmp_path, sizes=((32, 32), (32, 32), (32, 32)))
    meta = json.loads((src / "dataset.json").read_text())
    if breakage == "missing_label":
        (src / "labelsTr" / "brats_001.nii.gz").unlink()
    elif breakage == "regions":
        meta["labels"] = {"background": 0, "whole tumour": [1, 2, 3]}
    elif breakage == "label_value":
        labels = np.full((6, 32, 32), 7, np.uint8)
        write_nifti(src / "labelsTr" / "brats_002.nii.gz", *reorient(labels, ("R", "A", "S")))
    elif breakage == "label_grid":
        labels = np.zeros((5, 32, 32), np.uint8)
        write_nifti(src / "labelsTr" / "brats_002.nii.gz", *reorient(labels, ("R", "A", "S")))
    elif breakage == "stray_file":
        (src / "imagesTr" / "notes.txt").write_text("hello")
    elif breakage == "missing_channel":
        (src / "imagesTr" / "brats_001_0002.nii.gz").unlink()
    elif breakage == "png":
        meta["file_ending"] = ".png"
    (src / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=message):
        prepare_nnunet(src, tmp_path / "out", SplitOptions(val=1, test=0))
    assert not (tmp_path / "out").exists()


def test_export_needs_an_nnunet_name(prepared, tmp_path):
    with pytest.raises(DataError, match="DatasetNNN_Name"):
        export_nnunet(prepared, tmp_path / "lgg")
    assert not (tmp_path / "lgg").exists()


def test_evaluate_reads_a_dataset_as_scans_with_their_voxel_volume(prepared, exported):
    from core.evaluation.evaluate import scans_from_src

    arrays, voxel_ml, notes = scans_from_src(exported)
    info = load_split_info(prepared)
    assert sorted(voxel_ml) == sorted(p for ids in info["patients"].values() for p in ids)
    assert set(voxel_ml.values()) == {1e-3} and notes == {"resized": {}}  # 1 mm voxels, as exported
    everything = [load_split(prepared, s) for s in SPLITS]
    truth = {(str(p), int(k)): m for a in everything for p, k, m in zip(a.patients, a.slices, a.masks, strict=True)}
    assert len(truth) == len(arrays)
    for p, k, m in zip(arrays.patients, arrays.slices, arrays.masks, strict=True):
        assert np.array_equal(truth[(str(p), int(k))], m)
