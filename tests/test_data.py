"""Data layer: synth -> prepare -> arrays, patient-level split, and every bad-input error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.data.arrays import SPLITS, load_split, load_split_info
from core.data.prepare import DataError, SplitOptions, prepare, read_patients, split_patients
from core.data.synth import synthesize


def test_synth_writes_kaggle_layout(synth_src: Path) -> None:
    folders = sorted(p for p in synth_src.iterdir() if p.is_dir())
    assert len(folders) == 12
    assert (synth_src / "data.csv").read_text().startswith("Patient,")
    name = folders[0].name
    image = tifffile.imread(folders[0] / f"{name}_1.tif")
    mask = tifffile.imread(folders[0] / f"{name}_1_mask.tif")
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert mask.shape == (64, 64) and mask.dtype == np.uint8
    assert len(list(folders[0].glob("*_mask.tif"))) == 16


def test_synth_is_realistic_enough(synth_src: Path) -> None:
    patients = list(read_patients(synth_src))
    tumour = np.concatenate([p.masks.reshape(len(p.masks), -1).max(1) > 0 for p in patients])
    assert 0.2 <= tumour.mean() <= 0.5, "about 35% tumour slices"
    for p in patients:
        has = p.masks.reshape(len(p.masks), -1).max(1) > 0
        # lesions are coherent across slices: tumour slices form one contiguous run (or two for 2 lesions)
        assert np.count_nonzero(np.diff(has.astype(int)) == 1) <= 2
        lesion, brain = p.masks > 0, p.images[..., 1] > 20
        if lesion.any():
            # FLAIR-bright lesion: brighter than the rest of the brain in FLAIR
            assert p.images[..., 1][lesion].mean() > p.images[..., 1][brain & ~lesion].mean() + 15
    flair_copies = sum(
        int(np.array_equal(p.images[..., 0], p.images[..., 1]) or np.array_equal(p.images[..., 2], p.images[..., 1]))
        for p in patients
    )
    assert flair_copies < len(patients)


def test_synth_is_deterministic(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", patients=2, slices=4, size=32, seed=3)
    b = synthesize(tmp_path / "b", patients=2, slices=4, size=32, seed=3)
    c = synthesize(tmp_path / "c", patients=2, slices=4, size=32, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*.tif"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_prepare_round_trip(synth_src: Path, prepared_dir: Path) -> None:
    info = load_split_info(prepared_dir)
    patients = {p.id: p for p in read_patients(synth_src)}
    seen = set()
    for split in SPLITS:
        arrays = load_split(prepared_dir, split)
        assert arrays.images.dtype == np.uint8 and arrays.images.shape[1:] == (3, 64, 64)
        assert set(np.unique(arrays.masks)) <= {0, 1}
        assert isinstance(arrays.images, np.memmap)
        for row in (0, len(arrays) - 1):
            p = patients[str(arrays.patients[row])]
            k = int(np.flatnonzero(p.slices == arrays.slices[row])[0])
            assert np.array_equal(arrays.images[row].transpose(1, 2, 0), p.images[k])
            assert np.array_equal(arrays.masks[row], p.masks[k])
        assert info["counts"][split]["slices"] == len(arrays)
        seen |= set(info["patients"][split])
    assert seen == set(patients)


def test_split_is_by_patient_and_balanced(prepared_dir: Path) -> None:
    info = load_split_info(prepared_dir)
    groups = [set(info["patients"][s]) for s in SPLITS]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1 :])
    for s in SPLITS:
        assert set(np.unique(load_split(prepared_dir, s).patients)) == set(info["patients"][s])
    assert [len(g) for g in groups] == [8, 2, 2]


def test_split_balances_tumour_fraction() -> None:
    rng = np.random.default_rng(0)
    fractions = {f"p{i}": float(f) for i, f in enumerate(rng.uniform(0.05, 0.8, 60))}
    split = split_patients(fractions, val=0.15, test=0.15, seed=0)
    means = [np.mean([fractions[p] for p in split[s]]) for s in SPLITS]
    assert max(means) - min(means) < 0.02
    assert split == split_patients(fractions, val=0.15, test=0.15, seed=0)
    assert split != split_patients(fractions, val=0.15, test=0.15, seed=1)


def test_split_file_reproduces_assignment(synth_src: Path, prepared_dir: Path, tmp_path: Path) -> None:
    again = prepare(synth_src, tmp_path / "p", split_file=prepared_dir / "split.json", progress=False)
    assert again["patients"] == load_split_info(prepared_dir)["patients"]


def test_multiclass_labels(multiclass_prepared_dir: Path) -> None:
    info = load_split_info(multiclass_prepared_dir)
    assert info["classes"] == 3 and info["class_names"][:2] == ["background", "tumour_core"]
    labels = np.unique(load_split(multiclass_prepared_dir, "train").masks)
    assert set(labels) == {0, 1, 2, 3}


def _copy(src: Path, dst: Path, patients: int = 3) -> tuple[Path, Path]:
    folders = sorted(p for p in src.iterdir() if p.is_dir())[:patients]
    for f in folders:
        shutil.copytree(f, dst / f.name)
    first = sorted(p for p in dst.iterdir() if p.is_dir())[0]
    return dst, first / f"{first.name}_3"


def _bad_cases():
    def missing_mask(stem: Path) -> None:
        Path(f"{stem}_mask.tif").unlink()

    def orphan_mask(stem: Path) -> None:
        Path(f"{stem}.tif").unlink()

    def wrong_shape(stem: Path) -> None:
        tifffile.imwrite(f"{stem}.tif", np.zeros((64, 64), np.uint8))

    def wrong_dtype(stem: Path) -> None:
        tifffile.imwrite(f"{stem}.tif", np.zeros((64, 64, 3), np.float32))

    def mask_size(stem: Path) -> None:
        tifffile.imwrite(f"{stem}_mask.tif", np.zeros((32, 32), np.uint8))

    def non_binary(stem: Path) -> None:
        tifffile.imwrite(f"{stem}_mask.tif", np.full((64, 64), 7, np.uint8))

    def unreadable(stem: Path) -> None:
        Path(f"{stem}.tif").write_bytes(b"II*\x00garbage")

    def stray(stem: Path) -> None:
        (stem.parent / "notes.txt").write_text("x")

    return {
        "missing mask": (missing_mask, "_3.tif", "missing mask"),
        "orphan mask": (orphan_mask, "_3_mask.tif", "mask without an image"),
        "wrong shape": (wrong_shape, "_3.tif", "wrong shape"),
        "wrong dtype": (wrong_dtype, "_3.tif", "wrong dtype"),
        "mask size": (mask_size, "_3_mask.tif", "wrong shape"),
        "non-binary mask": (non_binary, "_3_mask.tif", "non-binary mask"),
        "unreadable": (unreadable, "_3.tif", "unreadable TIFF"),
        "stray file": (stray, "notes.txt", "unexpected file"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_names_the_file_and_leaves_no_output(case: str, synth_src: Path, tmp_path: Path) -> None:
    corrupt, filename, message = _bad_cases()[case]
    src, stem = _copy(synth_src, tmp_path / "kaggle_3m")
    corrupt(stem)
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match=message) as err:
        prepare(src, out, SplitOptions(val=1, test=1), progress=False)
    assert filename in str(err.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_empty_folders_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no patient folders"):
        prepare(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "empty" / "TCGA_XX_0001_20000101").mkdir()
    with pytest.raises(DataError, match="empty patient folder"):
        prepare(tmp_path / "empty", tmp_path / "out", progress=False)


def test_failed_prepare_keeps_previous_output(synth_src: Path, tmp_path: Path) -> None:
    src, stem = _copy(synth_src, tmp_path / "kaggle_3m")
    out = tmp_path / "prepared"
    prepare(src, out, SplitOptions(val=1, test=1), progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    Path(f"{stem}_mask.tif").unlink()
    with pytest.raises(DataError):
        prepare(src, out, SplitOptions(val=1, test=1), progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert len(load_split(out, "train")) == json.loads(before[Path("split.json")])["counts"]["train"]["slices"] > 0


def test_cli_end_to_end_and_clear_errors(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "core", *args], capture_output=True, text=True)

    ok = run("data", "synth", "--out", str(tmp_path), "--patients", "4", "--slices", "6", "--size", "32")
    assert ok.returncode == 0, ok.stderr
    prep = run("data", "prepare", "--src", str(tmp_path / "kaggle_3m"), "--out", str(tmp_path / "p"),
               "--val", "1", "--test", "1")
    assert prep.returncode == 0, prep.stderr
    assert "reading slices" in prep.stderr  # the progress bar
    eda = run("data", "eda", str(tmp_path / "p"))
    assert eda.returncode == 0, eda.stderr
    stats = json.loads((tmp_path / "p" / "eda" / "stats.json").read_text())
    assert stats["splits"]["train"]["patients"] == 2
    for png in ("tumour_share", "channel_histograms", "examples", "tumour_area"):
        assert (tmp_path / "p" / "eda" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    bad = run("data", "prepare", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "q"))
    assert bad.returncode == 2 and "nowhere: not a directory" in bad.stderr and "Traceback" not in bad.stderr


def test_download_without_credentials_fails_clearly(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "core", "data", "download", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "kagglehub" in result.stderr or "credentials" in result.stderr


def test_prepare_real_patients(real_lgg_src: Path, tmp_path: Path) -> None:
    info = prepare(real_lgg_src, tmp_path / "p", SplitOptions(val=1, test=0, seed=0), progress=False)
    assert info["image_size"] == [256, 256]
    train = load_split(tmp_path / "p", "train")
    assert train.images.shape[1:] == (3, 256, 256)
    assert set(np.unique(train.masks)) <= {0, 1}
    assert sum(c["patients"] for c in info["counts"].values()) == 2
    # slices are in numeric order of k within each patient
    for pid in np.unique(train.patients):
        k = train.slices[train.patients == pid]
        assert np.all(np.diff(k) == 1) and k[0] == 1


def test_interrupted_swap_restores_previous_version(tmp_path: Path) -> None:
    """A crash between atomic_dir's two renames leaves the old copy aside; the next write puts it back."""
    import os

    from core.io import atomic_dir

    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("v1")
    os.replace(tmp_path / "out", tmp_path / ".out.old-4242")  # the state a crash mid-swap leaves
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out"):
        raise RuntimeError("crash while writing v2")
    assert (tmp_path / "out" / "a").read_text() == "v1"
