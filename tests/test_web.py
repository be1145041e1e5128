"""The web page in real headless Chromium (Debian's, driven by Playwright): load, upload slices, volumes and
scans, scroll through them with one sequence in grey and the mask over it, read the tumour volume in mL."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_random_bundle, sample_images
from serve_support import serving, slice_files

from core.formats import codecs
from serve.app import ServeSettings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason="Debian chromium not installed (run `make browser`)")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    val = {"dsc_volume": 0.8125, "dice_tumour": 0.75, "fp_slice_rate": 0.0625}
    # Rules the random network's masks pass (every mask pixel is above the 0.5 threshold), shown in mm.
    postprocess = {"min_volume_mm3": 20.0, "min_probability": 0.5, "min_area_slice_mm2": 50.0}
    # A study's test-split figures, as tune.card.metrics_json writes them.
    test = {"patients": 20, "reading": 4, "volume": {"dsc_volume": 0.81, "dsc_volume_ci95": [0.75, 0.86],
                                                    "dsc_volume_worst": 0.4}}
    return make_random_bundle(tmp_path_factory.mktemp("web") / "bundle", postprocess=postprocess,
                              metrics={"val": val, "epoch": 7, "selection_metric": "dsc_volume", "test": test})


@pytest.fixture(scope="module")
def url(ray_session, bundle):
    with serving({"/": ServeSettings(bundle=str(bundle))}) as urls:
        yield urls["/"]


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        yield page
        browser.close()


def test_page_loads_model_and_segments_a_slice(url: str, page, synth_src: Path, tmp_path: Path) -> None:
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(f"{url}/")
    page.wait_for_function("document.querySelector('#model-name').textContent.includes('gliomaseg-')")
    assert "lite" in page.inner_text("#model") and "test-time augmentation" in page.inner_text("#model")
    # Post-processing as the bundle records it: the 3D rule for volumes, its own rule for one slice alone.
    assert "3D components >= 20 mm³" in page.inner_text("#model")
    assert "3D components of mean probability >= 0.5" in page.inner_text("#model")
    assert "one slice alone: lesions >= 50 mm²" in page.inner_text("#model")
    metrics = page.inner_text("#metrics")  # the validation metrics of the model, not only its epoch
    assert "val dsc_volume" in metrics and "0.8125" in metrics and "val fp_slice_rate" in metrics
    assert metrics.index("test dsc_volume, volumes") < metrics.index("val dsc_volume")  # the test split first
    assert "0.8100 [0.7500, 0.8600], worst 0.4000" in metrics and "20 patients, reading 4" in metrics
    assert "null" not in page.inner_text("#model-name")  # the bundle's version, not a missing one
    files = slice_files(synth_src)
    page.set_input_files("#file", str(files[8]))
    page.wait_for_function("document.body.dataset.state === 'done' || document.body.dataset.state === 'error'")
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    assert "tumour area" in page.inner_text("#area")
    assert page.evaluate("document.querySelector('#view').width") == 64
    assert page.is_hidden("#slider") and page.is_hidden("#volume")
    assert page.input_value("#sequence") == "flair"  # one sequence in grey, FLAIR first, as a viewer shows it
    shot = tmp_path / "slice.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 5000
    _keep(shot)
    assert not [u for u in failed if not u.startswith(url)]  # nothing fetched from elsewhere


def test_page_segments_a_multi_page_tiff(url: str, page, tmp_path: Path) -> None:
    volume = tmp_path / "patient.tif"
    volume.write_bytes(codecs.encode_volume_tiff(sample_images(6, seed=2)))
    page.goto(f"{url}/")
    page.set_input_files("#file", str(volume))
    page.wait_for_function("document.body.dataset.state === 'done' || document.body.dataset.state === 'error'")
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    assert page.is_visible("#slider") and page.get_attribute("#slider", "max") == "5"
    assert "6 slices" in page.inner_text("#summary")
    assert "unknown" in page.inner_text("#volume")  # a TIFF stack has no voxel spacing: no mL made up
    page.fill("#slider", "0")
    page.dispatch_event("#slider", "input")
    assert page.inner_text("#area").startswith("slice 1/6")
    page.wait_for_selector("#view[data-slice='0']")
    shot = tmp_path / "volume.png"
    page.screenshot(path=str(shot))
    _keep(shot)


def _canvas(page) -> np.ndarray:
    """The viewer's pixels (H,W,4), read back from the canvas."""
    w, h = page.evaluate("[document.querySelector('#view').width, document.querySelector('#view').height]")
    data = page.evaluate("Array.from(document.querySelector('#view').getContext('2d')"
                         f".getImageData(0, 0, {w}, {h}).data)")
    return np.asarray(data, np.uint8).reshape(h, w, 4)


def _wait_drawn(page, slice_: int, sequence: str, mask: bool) -> None:
    page.wait_for_selector(f"#view[data-slice='{slice_}'][data-sequence='{sequence}'][data-mask='{str(mask).lower()}']")


def test_page_scrolls_a_nifti_scan_in_grey_with_the_mask_and_its_volume(url: str, page, bundle: Path,
                                                                         tmp_path: Path) -> None:
    from scan_support import nifti_scan, voxel_ml

    from core.formats.load import load_volume
    from core.inference.predictor import Predictor
    from core.inference.results import segment_volume

    images = sample_images(8, seed=4)
    scan = nifti_scan(images, tmp_path / "patient_t1_flair_t1ce.nii.gz")  # the name says the three sequences
    expected = segment_volume(Predictor.from_bundle(bundle, device="cpu"), load_volume(scan))
    masks = expected.masks
    assert 0 < masks.sum() < masks.size
    page.goto(f"{url}/")
    page.set_input_files("#file", str(scan))
    page.wait_for_function("document.body.dataset.state === 'done' || document.body.dataset.state === 'error'")
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    ml = np.count_nonzero(masks) * voxel_ml()
    review = " (review)" if expected.review else ""
    assert page.inner_text("#volume") == f"tumour volume {ml:.2f} mL · quality {expected.quality:.2f}{review}"
    assert "8 slices" in page.inner_text("#summary") and "NIFTI axial scan" in page.inner_text("#summary")
    assert page.get_attribute("#slider", "max") == "7"
    first = int(np.argmax(masks.sum((1, 2))))  # the page opens on the largest lesion
    _wait_drawn(page, first, "flair", True)
    assert page.inner_text("#area").startswith(f"slice {first + 1}/8: tumour area {int(masks[first].sum())} px")
    shown, inside = _canvas(page), masks[first] > 0
    flair = images[first, ..., 1]
    for c in range(3):  # FLAIR in grey outside the mask, exactly; tinted red inside
        np.testing.assert_array_equal(shown[..., c][~inside], flair[~inside])
    assert inside.any() and (shown[..., 0][inside].astype(int) > shown[..., 1][inside].astype(int) + 50).all()
    shot = tmp_path / "nifti.png"
    page.screenshot(path=str(shot))
    _keep(shot)

    page.select_option("#sequence", "pre")  # another sequence, no new request
    _wait_drawn(page, first, "pre", True)
    np.testing.assert_array_equal(_canvas(page)[..., 1][~inside], images[first, ..., 0][~inside])
    page.uncheck("#show-mask")
    _wait_drawn(page, first, "pre", False)
    np.testing.assert_array_equal(_canvas(page)[..., :3], np.repeat(images[first, ..., :1], 3, axis=-1))
    page.check("#show-mask")
    step = 1 if first < 7 else -1  # scroll one slice with the mouse wheel over the image
    page.hover("#view")
    page.mouse.wheel(0, 100 * step)
    _wait_drawn(page, first + step, "pre", True)
    assert page.inner_text("#area").startswith(f"slice {first + step + 1}/8")


def test_page_shows_server_errors(url: str, page, tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    page.goto(f"{url}/")
    page.set_input_files("#file", str(junk))
    page.wait_for_function("document.body.dataset.state === 'error'")
    assert "400 undecodable" in page.inner_text("#error")
    from scan_support import bad_bodies

    body, _, status, code = bad_bodies(sample_images(8, seed=1), tmp_path / "bad")["nan_nifti"]
    (tmp_path / "nan.nii.gz").write_bytes(body)
    page.set_input_files("#file", str(tmp_path / "nan.nii.gz"))
    page.wait_for_function("document.querySelector('#error').textContent.includes('non_finite')")
    assert f"{status} {code}" in page.inner_text("#error") and "NaN" in page.inner_text("#error")


def _keep(shot: Path) -> None:
    """Copy screenshots where a person can look at them (GLIOMASEG_SCREENSHOTS=DIR)."""
    target = os.environ.get("GLIOMASEG_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)
