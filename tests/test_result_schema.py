"""One answer format: core's result schema (core.inference.results) and media negotiation (core.formats.media),
and Serve and the SageMaker handlers answering the same NIfTI scan, slice stack and slice with the same JSON."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from bundle_factory import make_random_bundle, sample_images
from sagemaker_sim import run_container

from core.formats import codecs
from core.formats.media import DICOM, NIFTI, SLICES, DecodeError, choose_format, preferences
from core.inference.results import RESULT_KEYS, result_json

SERVE_SLICE_EXTRAS = {"batch_size"}  # how many requests shared the forward pass: Serve's batching, only there


def json_types(body: dict) -> dict[str, str]:
    return {k: type(v).__name__ for k, v in body.items()}


def check_schema(body: dict) -> None:
    """Every schema key, each of its declared type (a JSON number may come back as an int)."""
    assert set(RESULT_KEYS) <= set(body), sorted(set(RESULT_KEYS) - set(body))
    for key, types in RESULT_KEYS.items():
        value = body[key]
        assert isinstance(value, types) or (float in types and type(value) is int), (key, value)


# ------------------------------------------------------------------------------------- negotiation


OFFERED = ("nifti", "dicom-seg", "tiff", "npy", "json")


@pytest.mark.parametrize("accept, kind, expected", [
    (None, NIFTI, "nifti"),
    ("*/*", SLICES, "tiff"),
    ("application/json", DICOM, "json"),
    ("application/x-npy;q=0.5, application/json", NIFTI, "json"),  # q-values, not order
    ("application/json;q=0.2, application/x-npy;q=0.9", NIFTI, "npy"),
    ("application/dicom, application/json;q=0.5", DICOM, "dicom-seg"),
    ("application/dicom, application/json;q=0.5", NIFTI, "json"),  # a SEG of a NIfTI falls back
    ("image/*", NIFTI, "tiff"),  # the default (NIfTI) is no image: the first image format offered
    ("image/*", SLICES, "tiff"),
    ("text/html, application/*;q=0.1", SLICES, "npy"),
])
def test_negotiation_ranks_by_q_value_and_falls_back_to_what_the_input_can_have(accept, kind, expected) -> None:
    default = "nifti" if kind != SLICES else "tiff"
    assert choose_format(preferences(accept, OFFERED), kind, default, OFFERED) == expected


@pytest.mark.parametrize("accept, kind, slices, detail", [
    ("text/html", NIFTI, None, "this endpoint answers"),
    ("application/json;q=0", NIFTI, None, "this endpoint answers"),
    ("application/dicom", NIFTI, None, "DICOM SEG references"),
    ("application/gzip", SLICES, None, "no voxel geometry"),
    ("image/png", SLICES, 3, "holds one slice"),
])
def test_negotiation_answers_406_for_what_cannot_be_given(accept, kind, slices, detail) -> None:
    offered = (*OFFERED, "png")
    with pytest.raises(DecodeError) as info:
        choose_format(preferences(accept, offered), kind, "json", offered, slices)
    assert info.value.status == 406 and info.value.error == "not_acceptable" and detail in info.value.detail


def test_result_json_reads_quality_where_the_answer_has_it() -> None:
    masks = np.zeros((3, 8, 8), np.uint8)
    masks[1, 2:4, 2:5] = 1

    class Answer:  # an answer from before quality existed has neither attribute
        quality, review = np.float32(0.25), np.True_

    for answer, quality, review in ((None, None, None), (object(), None, None), (Answer(), 0.25, True)):
        body = result_json(masks, "v1", ["background", "tumour"], answer=answer)
        check_schema(body)
        assert body["quality"] == quality and body["review"] is review
    assert body["slice_tumour_pixels"] == [0, 6, 0] and body["tumour_pixels"] == 6 and body["tumour_slices"] == 1
    assert body["size"] == [8, 8] and body["input"] == SLICES and body["volume_ml"] is None
    np.testing.assert_array_equal(np.stack([codecs.rle_decode(r) for r in body["masks_rle"]]), masks)
    assert json.loads(json.dumps(body)) == body  # plain JSON: no numpy scalars left


# ------------------------------------------------------------------------------- Serve == SageMaker


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("schema") / "bundle")


def test_serve_and_sagemaker_answer_the_same_json(ray_session, bundle, tmp_path) -> None:
    from scan_support import KAGGLE_TEXT, nifti_scan, voxel_ml
    from serve_support import serving

    from serve.app import ServeSettings
    from serve.sagemaker.export import build_archive

    vol = sample_images(10, seed=9)
    bodies = {"scan": (nifti_scan(vol, tmp_path / "case.nii.gz").read_bytes(), "application/gzip"),
              "stack": (codecs.encode_npy(vol), codecs.NPY), "slice": (codecs.encode_npy(vol[2]), codecs.NPY)}

    with serving({"/": ServeSettings(bundle=str(bundle))}) as urls:
        served = {}
        for name, (body, kind) in bodies.items():
            path = "/v1/segment" if name == "slice" else "/v1/segment/volume"
            params = {"format": "json", **({"sequences": KAGGLE_TEXT} if name == "scan" else {})}
            r = httpx.post(f"{urls['/']}{path}", content=body, params=params, timeout=120,
                           headers={"Content-Type": kind})
            assert r.status_code == 200, r.text
            served[name] = r.json()

    archive = build_archive(bundle, tmp_path / "model.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "opt_ml_model", filter="data")
    spec = []
    for name, (body, kind) in bodies.items():
        (tmp_path / name).write_bytes(body)
        named = {"X-Amzn-SageMaker-Custom-Attributes": f"sequences={KAGGLE_TEXT}"} if name == "scan" else {}
        spec.append({"body": str(tmp_path / name), "content_type": kind, "accept": codecs.JSON, "headers": named})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    results = json.loads(run_container(tmp_path / "opt_ml_model", tmp_path / "spec.json", tmp_path, {})
                         .split("RESULTS", 1)[1])
    assert [r["status"] for r in results[:3]] == [200, 200, 200], results

    for name in bodies:
        sm = json.loads((tmp_path / f"{name}.out").read_bytes())
        serve_body = {k: v for k, v in served[name].items() if not (name == "slice" and k in SERVE_SLICE_EXTRAS)}
        check_schema(sm)
        assert json_types(serve_body) == json_types(sm), name
        for key in ("input", "volume", "slices", "size", "slice_tumour_pixels", "masks_rle", "scan", "spacing_mm"):
            assert serve_body[key] == sm[key], (name, key)
        for key in ("volume_ml", "quality"):  # None for a slice stack's mL and a slice's quality
            a, b = serve_body[key], sm[key]
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-4), (name, key, a, b)
    assert served["scan"]["input"] == "nifti"  # the NIfTI's mL: its tumour voxels times the voxel volume
    assert served["scan"]["volume_ml"] == pytest.approx(served["scan"]["tumour_pixels"] * voxel_ml(), rel=1e-6)
    assert served["stack"]["volume"] is True and served["slice"]["volume"] is False
