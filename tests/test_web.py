"""The web page in real headless Chromium (Debian's, driven by Playwright): load, upload, see the overlay."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
def url(ray_session, tmp_path_factory):
    val = {"dsc_volume": 0.8125, "dice_tumour": 0.75, "fp_slice_rate": 0.0625}
    bundle = make_random_bundle(tmp_path_factory.mktemp("web") / "bundle", postprocess={"min_area": 0},
                                metrics={"val": val, "epoch": 7, "selection_metric": "dsc_volume"})
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
    metrics = page.inner_text("#metrics")  # the validation metrics of the model, not only its epoch
    assert "val dsc_volume" in metrics and "0.8125" in metrics and "val fp_slice_rate" in metrics
    files = slice_files(synth_src)
    page.set_input_files("#file", str(files[8]))
    page.wait_for_function("document.body.dataset.state === 'done' || document.body.dataset.state === 'error'")
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    assert "tumour area" in page.inner_text("#area")
    assert page.evaluate("document.querySelector('#overlay').naturalWidth") == 64
    assert page.is_hidden("#slider")
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
    page.fill("#slider", "0")
    page.dispatch_event("#slider", "input")
    assert page.inner_text("#area").startswith("slice 1/6")
    shot = tmp_path / "volume.png"
    page.screenshot(path=str(shot))
    _keep(shot)


def test_page_shows_server_errors(url: str, page, tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    page.goto(f"{url}/")
    page.set_input_files("#file", str(junk))
    page.wait_for_function("document.body.dataset.state === 'error'")
    assert "400 undecodable" in page.inner_text("#error")


def _keep(shot: Path) -> None:
    """Copy screenshots where a person can look at them (GLIOMASEG_SCREENSHOTS=DIR)."""
    target = os.environ.get("GLIOMASEG_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)
