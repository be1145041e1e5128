"""Every scan of a small corpus (tests/scan_corpus.py) through all five entry points, the same answer on each:
`core predict`, `serve predict` (against a running Serve app), ``POST /v1/segment/volume``, `serve batch`
(Ray Data) and the SageMaker handlers (from the exported archive, in a fresh process).

For each scan every path's masks are read back (canonical slices from JSON RLE, NPY, TIFF and PNG answers;
the scan's own grid from NIfTI answers) and must be identical; every path's notes (the JSON answer's, and
those beside a binary answer: ``X-Notes``, SageMaker's custom attributes, the CLIs' side files) must be the
same list; a refused scan gets the same status class, error code and detail on every path. One Serve app,
one SageMaker process and one `serve batch` run per option set answer the whole corpus.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import tifffile
from bundle_factory import make_random_bundle
from conftest import REAL_DATA
from PIL import Image
from sagemaker_sim import ATTRIBUTES, BUCKET, run_handlers
from scan_corpus import (
    BATCH,
    CLIENT,
    CORE,
    HTTP,
    SAGEMAKER,
    Scan,
    batch_groups,
    batch_name,
    real_scan,
    synthetic_scans,
)
from scan_support import read_nifti_bytes

from core.cli import dispatch
from core.formats import codecs
from core.formats.encoders import rle_decode
from core.inference.jobs import parse_series
from core.inference.spacing import parse_spacing

NAMES = ("order", "hot16", "hot16_tiff", "stack_npy", "nifti_named", "nifti_unnamed", "nifti_told", "nifti_3d", "dicom",
         "dicom_enhanced", "two_flair", "two_flair_told", "real")
RULES = {"min_volume_mm3": 40.0}  # a rule in mm3: a path that loses a scan's spacing answers another mask
FLAGS = {"spacing": "--spacing", "sequences": "--sequences", "series": "--series"}
CLI_ERROR = re.compile(r"(?:HTTP (?P<status>\d{3}) )?(?P<code>[a-z_]+): (?P<detail>.*)", re.DOTALL)


@dataclass
class Answer:
    """What one entry point answered for one scan: each mask it gave back (canonical slices, or the scan's
    own grid with the affine), each list of notes, or the error it refused the scan with."""

    masks: dict[str, np.ndarray] = field(default_factory=dict)
    grids: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    segs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # a DICOM study's SEG frames (``_seg``)
    notes: dict[str, list[str]] = field(default_factory=dict)
    ml: dict[str, float | None] = field(default_factory=dict)  # the tumour volume it gave (None: spacing unknown)
    error: tuple[int | None, str, str] | None = None  # (status where the path says one, code, detail)


def _binary(masks: np.ndarray) -> np.ndarray:
    return (np.asarray(masks) > 0).astype(np.uint8)  # TIFF and PNG masks are 0/255, NPY and NIfTI 0/1


def _grid(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    image = read_nifti_bytes(data)
    return np.asanyarray(image.dataobj).astype(np.uint8), image.affine


def _seg(data: bytes) -> dict[str, np.ndarray]:
    """A DICOM SEG's frames by what each references: the source instance, its frame, the segment."""
    ds = pydicom.dcmread(io.BytesIO(data))
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    shared = ds.SharedFunctionalGroupsSequence[0]  # one segment: highdicom names it here, not per frame
    out = {}
    for group, frame in zip(ds.PerFrameFunctionalGroupsSequence, frames, strict=True):
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        segment = (group if "SegmentIdentificationSequence" in group else shared).SegmentIdentificationSequence[0]
        segment = segment.ReferencedSegmentNumber
        out[f"{source.ReferencedSOPInstanceUID}/{source.get('ReferencedFrameNumber', '')}/{segment}"] = frame
    return out


def _rle(body: dict) -> np.ndarray:
    return np.stack([rle_decode(r) for r in body["masks_rle"]])


def _cli_error(text: str) -> tuple[int | None, str, str]:
    """A CLI's one-line error (``code: detail``, `serve predict`'s with ``HTTP status`` before it)."""
    m = CLI_ERROR.search(text.strip())
    assert m, text
    return int(m["status"]) if m["status"] else None, m["code"], m["detail"]


def _said(text: str, scan: Scan) -> str:
    """A note or error detail with what it names the scan by written alike: the CLIs and `serve batch` read a
    file and name it (its path; `serve batch` reads a copy in its cohort), HTTP and SageMaker get bytes, named
    "request body" or by the file name sent beside them without its folder and extension (a SageMaker body
    has none). Only that differs by transport; every other word must be the same. A slice stack's notes name
    no file."""
    if not scan.scan:
        return text
    name = re.escape(batch_name(scan))
    return re.sub(rf"(?:[^\s'\"(]*/)?(?<![\w.-]){name}(?:\.nii\.gz|\.nii|\.zip)?(?![\w-])|request body", "<scan>", text)


def _flags(options: dict[str, str]) -> list[str]:
    return [arg for key, value in options.items() for arg in (FLAGS[key], value)]


# --------------------------------------------------------------------------------------------- the paths


def _core(bundle: Path, scan: Scan, out: Path) -> Answer:
    """`core predict` on the scan's file or folder: PNG masks per slice or a NIfTI mask, and a volume JSON."""
    argv = ["predict", "--bundle", str(bundle), "--device", "cpu", str(scan.path), "--out", str(out),
            *_flags(scan.options)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = dispatch("core", "", ["core.inference.cli"], argv)
    if code:
        assert code == 2, err.getvalue()  # the user's to fix (a 4xx on the other paths); no status said
        return Answer(error=_cli_error(err.getvalue().split("error: ", 1)[1]))
    (side,) = out.glob("*_volume.json")
    said = json.loads(side.read_text())
    answer = Answer(notes={"volume.json": said["notes"]}, ml={"volume.json": said["volume_ml"]})
    if scan.scan:
        answer.grids["nifti"] = _grid(next(out.glob("*_mask.nii.gz")).read_bytes())
        if scan.dicom:
            answer.segs["seg.dcm"] = _seg(next(out.glob("*_seg.dcm")).read_bytes())
    else:
        rows = list(csv.DictReader((out / "predictions.csv").open()))
        answer.masks["png"] = _binary(np.stack([np.asarray(Image.open(out / r["mask"])) for r in rows]))
    return answer


def _client(url: str, scan: Scan, out: Path) -> Answer:
    """`serve predict`: a stack's TIFF masks and JSON, or a scan's JSON answer (RLE masks) and NIfTI mask."""
    argv = ["predict", "--url", url, str(scan.path), "--out", str(out), *_flags(scan.options)]
    code = dispatch("python -m serve", "", ["serve.client"], argv)
    (said,) = json.loads((out / "summary.json").read_text())
    if code:
        return Answer(error=_cli_error(said["error"].split(": ", 1)[1]))
    name = said["name"]
    body = json.loads((out / f"{name}.json").read_text())
    answer = Answer(notes={"json": body["notes"]}, ml={"json": body["volume_ml"]})
    if scan.scan:
        answer.masks["json rle"] = _rle(body)
        answer.grids["nifti"] = _grid((out / f"{name}_mask.nii.gz").read_bytes())
        if scan.dicom:
            answer.segs["seg.dcm"] = _seg((out / f"{name}_seg.dcm").read_bytes())
    else:
        answer.masks["tiff"] = _binary(tifffile.imread(out / f"{name}_masks.tif"))
    return answer


def _http(url: str, scan: Scan) -> Answer:
    """``POST /v1/segment/volume`` asked for JSON, NPY and (a scan) NIfTI; a scan is named as the client names it."""
    headers = {"Content-Type": scan.content_type}
    if scan.file_name:
        headers["Content-Disposition"] = f'attachment; filename="{scan.file_name}"'

    def post(fmt: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/segment/volume", content=scan.body, headers=headers,
                          params={**scan.options, "format": fmt}, timeout=120)

    r = post("json")
    if r.status_code != 200:
        return Answer(error=(r.status_code, r.json()["error"], r.json()["detail"]))
    answer = Answer(masks={"json rle": _rle(r.json())}, notes={"json": r.json()["notes"]},
                    ml={"json": r.json()["volume_ml"]})
    for fmt in ("npy", "nifti", "dicom-seg")[: 1 + scan.scan + scan.dicom]:
        r = post(fmt)
        assert r.status_code == 200, r.text
        answer.notes[f"{fmt} X-Notes"] = json.loads(r.headers["X-Notes"])
        ml = r.headers.get("X-Tumour-Volume-mL")
        answer.ml[f"{fmt} X-Tumour-Volume-mL"] = None if ml is None else float(ml)
        if fmt == "npy":
            answer.masks["npy"] = np.load(io.BytesIO(r.content), allow_pickle=False)
        elif fmt == "nifti":
            answer.grids["nifti"] = _grid(r.content)
        else:
            answer.segs[fmt] = _seg(r.content)
    return answer


def _sagemaker_cases(scan: Scan) -> dict[str, tuple]:
    """The handler invocations of one scan: JSON, NPY and (a scan) NIfTI answers, options as custom attributes;
    a scan that needs its file name comes from S3, asked for NPY and NIfTI masks."""
    attributes = {ATTRIBUTES: "; ".join(f"{k}={v}" for k, v in scan.options.items())} if scan.options else {}
    if scan.s3:
        spec = {"s3_uri": f"s3://{BUCKET}/corpus/{scan.path.name}", **scan.options}
        return {f"{scan.name}|s3 {fmt}": (json.dumps({**spec, "format": fmt}).encode(), codecs.JSON, codecs.JSON, {})
                for fmt in ("npy", "nifti")}
    accepts = {"json": codecs.JSON, "npy": codecs.NPY, **({"nifti": "application/gzip"} if scan.scan else {}),
               **({"dicom-seg": "application/dicom"} if scan.dicom else {})}
    return {f"{scan.name}|{fmt}": (scan.body, scan.content_type, accept, attributes) for fmt, accept in accepts.items()}


def _sagemaker(scan: Scan, answered: dict[str, tuple[dict, bytes]]) -> Answer:
    import boto3

    answer = Answer()
    for case in _sagemaker_cases(scan):
        r, out = answered[case]
        fmt = case.split("|", 1)[1]
        if r["status"] != 200:
            refusal = json.loads(out.decode().split("\n", 1)[0])  # the error JSON Serve answers
            error = (r["status"], refusal["error"], refusal["detail"])
            assert answer.error in (None, error), (case, error, answer.error)  # one refusal, whatever was asked
            answer.error = error
            continue
        if fmt.startswith("s3 "):
            said = json.loads(out)
            key = said["mask_uri"].split("/", 3)[3]
            data = boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
            answer.notes[fmt], answer.ml[fmt] = said["notes"], said["volume_ml"]
            if fmt == "s3 npy":
                answer.masks[fmt] = np.load(io.BytesIO(data), allow_pickle=False)
            else:
                answer.grids[fmt] = _grid(data)
        elif fmt == "json":
            said = json.loads(out)
            answer.masks[fmt], answer.notes[fmt], answer.ml[fmt] = _rle(said), said["notes"], said["volume_ml"]
        else:
            attributes = r["headers"].get(ATTRIBUTES, "")
            beside = attributes.split("notes=", 1)[1] if "notes=" in attributes else "[]"
            answer.notes[f"{fmt} attributes"] = json.loads(beside)
            ml = re.search(r"volume_ml=([0-9.]+)", attributes.split("notes=", 1)[0])
            answer.ml[f"{fmt} attributes"] = float(ml[1]) if ml else None
            if fmt == "npy":
                answer.masks[fmt] = np.load(io.BytesIO(out), allow_pickle=False)
            elif fmt == "nifti":
                answer.grids[fmt] = _grid(out)
            else:
                answer.segs[fmt] = _seg(out)
    return answer


def _batch(bundle: Path, scans: list[Scan], tmp: Path) -> dict[str, Answer]:
    """`serve batch` over a cohort of copies of the scans, one run per option set (batch_groups)."""
    from serve.batch.run import BatchOptions, run_batch

    answers: dict[str, Answer] = {}
    for i, (options, group) in enumerate(batch_groups(scans)):
        cohort, out = tmp / f"cohort{i}", tmp / f"out{i}"
        cohort.mkdir(parents=True)
        for scan in group:
            copy = shutil.copytree if scan.path.is_dir() else shutil.copy
            copy(scan.path, cohort / scan.path.name)
        summary = run_batch(BatchOptions(
            bundle=str(bundle), src=str(cohort), out=str(out), workers=1, batch_size=8, progress=False,
            spacing=parse_spacing(options.get("spacing")), series=parse_series(options.get("series")),
            sequences=options["sequences"].split(",") if "sequences" in options else None))
        failed = {f["patient"]: f for f in summary["failed"]}
        for scan in group:
            name = batch_name(scan)
            if name in failed:
                code, error = failed[name]["error_code"], failed[name]["error"]  # "<files>: <code>: <detail>"
                answers[scan.name] = Answer(error=(None, code, error.split(f"{code}: ", 1)[-1]))
                continue
            record = json.loads((out / name / "patient.json").read_text())
            answer = answers[scan.name] = Answer(notes={"patient.json": record["notes"]},
                                                 ml={"patient.json": record["volume_ml"]})
            if scan.scan:
                answer.grids["nifti"] = _grid((out / name / f"{name}_mask.nii.gz").read_bytes())
                if scan.dicom:
                    answer.segs["seg.dcm"] = _seg((out / name / f"{name}_seg.dcm").read_bytes())
            else:
                answer.masks["tiff"] = _binary(np.stack([tifffile.imread(out / name / m) for m in record["masks"]]))
    return answers


# ------------------------------------------------------------------------------------------- the corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, request) -> dict[str, Scan]:
    root = tmp_path_factory.mktemp("corpus")
    scans = synthetic_scans(root)
    if (REAL_DATA / "restore.py").is_file():  # the development machines' lossless patients; CI has none
        scans.append(real_scan(request.getfixturevalue("real_lgg_src"), root))
    assert {s.name for s in scans} <= set(NAMES)
    return {s.name: s for s in scans}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("corpus_bundle") / "bundle", postprocess=RULES)


@pytest.fixture(scope="module")
def answers(ray_session, aws, corpus, bundle, tmp_path_factory) -> dict[str, dict[str, Answer]]:
    """scan -> entry point -> its answer: one Serve app for HTTP and `serve predict`, one SageMaker process,
    one `serve batch` run per option set."""
    import boto3
    from serve_support import serving

    from serve.app import ServeSettings

    tmp = tmp_path_factory.mktemp("corpus_answers")
    out: dict[str, dict[str, Answer]] = {name: {} for name in corpus}
    with serving({"/": ServeSettings(bundle=str(bundle), max_slices=32)}) as urls:
        for name, scan in corpus.items():
            out[name][HTTP] = _http(urls["/"], scan)
            if CLIENT in scan.paths:
                out[name][CLIENT] = _client(urls["/"], scan, tmp / "client" / name)
    for name, scan in corpus.items():
        if CORE in scan.paths:
            out[name][CORE] = _core(bundle, scan, tmp / "core" / name)
    for scan in corpus.values():
        if scan.s3:
            boto3.client("s3").put_object(Bucket=BUCKET, Key=f"corpus/{scan.path.name}", Body=scan.body)
    cases = {case: spec for s in corpus.values() if SAGEMAKER in s.paths for case, spec in _sagemaker_cases(s).items()}
    answered = run_handlers(bundle, cases, tmp / "sagemaker", aws["env"])
    for name, scan in corpus.items():
        if SAGEMAKER in scan.paths:
            out[name][SAGEMAKER] = _sagemaker(scan, answered)
    for name, answer in _batch(bundle, list(corpus.values()), tmp / "batch").items():
        out[name][BATCH] = answer
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_point_answers_a_scan_alike(name: str, corpus, answers) -> None:
    if name not in corpus:
        pytest.skip(f"real LGG data not present at {REAL_DATA} (only on the project's development machines)")
    scan, by_path = corpus[name], answers[name]
    assert set(by_path) == set(scan.paths), sorted(by_path)
    if scan.error:
        status, code = scan.error
        errors = {path: a.error for path, a in by_path.items()}
        assert all(e is not None for e in errors.values()), errors
        assert {e[1] for e in errors.values()} == {code}, errors
        assert {e[0] for e in errors.values()} <= {status, None}, errors  # the CLIs' exit codes say "4xx" alone
        assert len({_said(e[2], scan) for e in errors.values()}) == 1, errors  # one detail
        return
    assert not any(a.error for a in by_path.values()), {p: a.error for p, a in by_path.items()}
    masks = {f"{path} {how}": m for path, a in by_path.items() for how, m in a.masks.items()}
    first = next(iter(masks))
    assert 0 < masks[first].sum() < masks[first].size, "an empty or full mask would prove nothing"
    for where, m in masks.items():
        np.testing.assert_array_equal(m, masks[first], err_msg=f"{name}: {where} vs {first}")
    grids = {f"{path} {how}": g for path, a in by_path.items() for how, g in a.grids.items()}
    assert bool(grids) == scan.scan
    for where, (grid, affine) in grids.items():
        ref, ref_affine = next(iter(grids.values()))
        assert grid.sum() == masks[first].sum(), where  # the source grid is the canonical one reordered
        np.testing.assert_array_equal(grid, ref, err_msg=f"{name}: {where}")
        np.testing.assert_allclose(affine, ref_affine, atol=1e-4, err_msg=f"{name}: {where}")
    segs = {f"{path} {how}": seg for path, a in by_path.items() for how, seg in a.segs.items()}
    assert len(segs) == (len(scan.paths) if scan.dicom else 0), sorted(segs)  # one SEG from each path
    for where, seg in segs.items():
        ref = next(iter(segs.values()))
        assert sorted(seg) == sorted(ref), where  # the same source instances (and frames) and segments
        for key, frame in seg.items():
            np.testing.assert_array_equal(frame, ref[key], err_msg=f"{name}: {where} {key}")
    mls = {f"{path} {how}": ml for path, a in by_path.items() for how, ml in a.ml.items()}
    ref_ml = next(iter(mls.values()))
    for where, ml in mls.items():  # headers and custom attributes round to 4 decimals
        assert ml == ref_ml if ref_ml is None else ml == pytest.approx(ref_ml, abs=1e-4), (where, mls)
    assert (ref_ml is None) == (scan.options.get("spacing") is None and not scan.scan), mls
    notes = {f"{path} {how}": n for path, a in by_path.items() for how, n in a.notes.items()}
    alike = {json.dumps([_said(n, scan) for n in said]) for said in notes.values()}
    assert len(alike) == 1, json.dumps(notes, indent=1)
