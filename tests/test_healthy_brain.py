"""A tumour-free brain comes out near 0 mL from the shipped model, or says review (specificity).

The brain is the public MNI152 2009a template that nilearn ships (1 mm, 197x233x189): its T1 stands in
for pre- and post-contrast (no enhancement in a healthy brain), and a FLAIR is made from its grey- and
white-matter maps with FLAIR's contrast (grey matter brighter than white, CSF suppressed). It goes
through `core predict`, the path a user's NIfTI takes: as a 4D scan of three sequences, and as a 3D
FLAIR alone (pre- and post-contrast filled with FLAIR's copy). Whatever tumour the model reports on it
must come with "review".
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained" / "lgg"
HEALTHY_MAX_ML = 1.0


def mni_file(kind: str) -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nilearn (a dev extra) is not installed: it carries the MNI152 template")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / (
        f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def healthy_scans(tmp_path_factory) -> dict[str, Path]:
    import nibabel as nib

    t1 = nib.load(mni_file("t1"))
    gm, wm = (np.asarray(nib.load(mni_file(k)).dataobj, np.float32) for k in ("gm", "wm"))
    flair = 0.8 * gm + 0.55 * wm  # tissue probabilities 0-255: GM > WM > CSF (~0) on FLAIR
    data = np.stack([np.asarray(t1.dataobj, np.float32), flair, np.asarray(t1.dataobj, np.float32)], axis=-1)
    root = tmp_path_factory.mktemp("healthy")
    paths = {}
    for name, array in (("t1,flair,t1gd", data), ("flair", flair)):
        image = nib.Nifti1Image(array, t1.affine)
        image.header.set_xyzt_units("mm")
        paths[name] = root / f"mni152_{'4d' if array.ndim == 4 else 'flair'}.nii.gz"
        nib.save(image, paths[name])
    return paths


@pytest.fixture(scope="module")
def answers(healthy_scans, tmp_path_factory) -> dict[str, dict[str, str]]:
    """`core predict`'s predictions.csv row for each healthy scan, as a user's NIfTI goes."""
    rows = {}
    for sequences, scan in healthy_scans.items():
        out = tmp_path_factory.mktemp("masks")
        subprocess.run([sys.executable, "-m", "core", "predict", "--bundle", str(PRETRAINED), str(scan),
                        "--out", str(out), "--sequences", sequences, "--device", "cpu"], check=True,
                       cwd=Path(__file__).resolve().parents[1])
        with (out / "predictions.csv").open() as f:
            (rows[sequences],) = list(csv.DictReader(f))
        print(rows[sequences])
    return rows


# The plain fold ensemble sends a 3D FLAIR alone (pre/post filled with FLAIR's copy) through the same members
# and rules as any scan, and finds a small false region there: a known defect, flagged for review below.
@pytest.mark.parametrize("sequences", [
    "t1,flair,t1gd",
    pytest.param("flair", marks=pytest.mark.xfail(strict=True, reason="false region on a healthy 3D FLAIR alone")),
])
def test_the_healthy_template_brain_gets_under_one_ml_of_tumour(answers, sequences: str) -> None:
    assert float(answers[sequences]["volume_ml"]) < HEALTHY_MAX_ML


@pytest.mark.parametrize("sequences", ["t1,flair,t1gd", "flair"])
def test_a_healthy_brain_with_tumour_found_says_review(answers, sequences: str) -> None:
    row = answers[sequences]
    assert float(row["volume_ml"]) < HEALTHY_MAX_ML or row["review"] == "review", row
