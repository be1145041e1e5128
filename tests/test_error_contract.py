"""One error contract: core maps each error class to one HTTP status and error JSON
(core.formats.media.error_answer), and Serve and the SageMaker handlers answer the same bad inputs with the
same status and the same ``{"error", "detail"}``."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from bundle_factory import make_random_bundle, sample_images
from sagemaker_sim import ATTRIBUTES, run_handlers
from scan_support import bad_bodies, dicom_study, nifti_scan, zip_folder
from volume_support import reorient, write_dicom_series, write_nifti

from core.formats import codecs
from core.formats.media import INTERNAL_DETAIL, DecodeError, error_answer

GZ, ZIP, JS = "application/gzip", "application/zip", codecs.JSON


class _Wrapped(ValueError):
    """What a Ray handle raises for a remote ValueError: a subclass carrying the original as ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"Traceback (most recent call last): ... {cause}")
        self.cause = cause


def test_each_error_class_has_one_status() -> None:
    assert error_answer(DecodeError(413, "too_large", "big")) == (413, {"error": "too_large", "detail": "big"})
    assert error_answer(ValueError("slice 0: expected uint8")) == (
        422, {"error": "invalid_input", "detail": "slice 0: expected uint8"})
    assert error_answer(_Wrapped(ValueError("bad shape"))) == (422, {"error": "invalid_input", "detail": "bad shape"})
    status, body = error_answer(RuntimeError("CUDA error at /home/ops/secret.py"))
    assert status == 500 and body == {"error": "internal", "detail": INTERNAL_DETAIL} and "secret" not in str(body)


def _cases(tmp_path: Path) -> dict[str, tuple[bytes, str, str, dict[str, str], int, str]]:
    """name -> (body, content type, accept, options (Serve's query = SageMaker's custom attributes), status, code)."""
    tmp_path.mkdir(parents=True)
    images = sample_images(6, seed=3)
    nifti = nifti_scan(images, tmp_path / "case.nii.gz").read_bytes()
    study = tmp_path / "study"
    info = dicom_study(images, study)
    source, affine = reorient(images, ("A", "S", "L"))
    write_dicom_series(study / "s3", source[..., 1], affine, "SAG 3D FLAIR", study=info["study"], series_number=4)
    tiny = write_nifti(tmp_path / "tiny.nii.gz", *reorient(sample_images(4, 16, 16)[..., 1], ("R", "A", "S")))
    stack = codecs.encode_npy(images)
    bad = bad_bodies(images, tmp_path / "bad")
    named = {"sequences": "pre,flair,post"}
    return {
        "unnamed_sequences": (nifti, GZ, JS, {}, 422, "unnamed_sequences"),
        "two_flair": (zip_folder(study), ZIP, JS, {}, 422, "several_series"),
        "bad_spacing": (stack, codecs.NPY, JS, {"spacing": "1,2"}, 400, "bad_spacing"),
        "series_of_slices": (stack, codecs.NPY, JS, {"series": "2"}, 400, "bad_series"),
        "spacing_conflict": (nifti, GZ, JS, {**named, "spacing": "1,1,1"}, 422, "spacing_conflict"),
        "tiny_scan": (tiny.read_bytes(), GZ, JS, {}, 422, "invalid_input"),
        "seg_of_nifti": (nifti, GZ, "application/dicom", named, 406, "not_acceptable"),
        "empty": (b"", codecs.NPY, JS, {}, 400, "undecodable"),
        **{name: (body, kind, JS, {}, status, code) for name, (body, kind, status, code) in bad.items()},
    }


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("errors") / "bundle")


def test_serve_and_sagemaker_answer_bad_input_alike(ray_session, bundle, tmp_path) -> None:
    from serve_support import serving

    from serve.app import ServeSettings

    cases = _cases(tmp_path / "in")
    served = {}
    with serving({"/": ServeSettings(bundle=str(bundle))}) as urls:
        for name, (body, kind, accept, options, _, _) in cases.items():
            r = httpx.post(f"{urls['/']}/v1/segment/volume", content=body, params=options, timeout=120,
                           headers={"Content-Type": kind, "Accept": accept})
            served[name] = (r.status_code, r.json())
    attributes = {name: {ATTRIBUTES: "; ".join(f"{k}={v}" for k, v in options.items())} if options else {}
                  for name, (_, _, _, options, _, _) in cases.items()}
    answered = run_handlers(bundle, {name: (body, kind, accept, attributes[name])
                                     for name, (body, kind, accept, _, _, _) in cases.items()}, tmp_path / "sm")
    for name, (_, _, _, _, status, code) in cases.items():
        r, out = answered[name]
        first = out.decode("utf-8", "replace").split("\n", 1)[0]
        assert served[name][0] == r["status"] == status, (name, served[name], r, first)
        assert served[name][1] == json.loads(first), (name, served[name][1], first)  # the same error JSON
        assert served[name][1]["error"] == code, (name, served[name][1])
