"""SageMaker deployment commands (export and upload, real-time and serverless endpoints, invoke,
batch transform, image URIs) through boto3 against a local moto server, never real AWS."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_random_bundle, sample_images
from sagemaker_sim import BUCKET, FakeRuntime, fake_runtime

from core.cli import dispatch
from core.formats import codecs
from serve.sagemaker import deploy as dep
from serve.sagemaker import images

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("sm_deploy") / "bundle")


def _cli(*argv: str) -> int:
    return dispatch("python -m serve", "", ["serve.sagemaker.cli"], list(argv))


def test_export_upload_and_deploy_realtime_and_serverless(bundle, aws, tmp_path, capsys):
    import boto3

    out = tmp_path / "model.tar.gz"
    assert _cli("export-sagemaker", "--bundle", str(bundle), "--out", str(out),
                "--upload", f"s3://{BUCKET}/models/run1") == 0
    exported = json.loads(capsys.readouterr().out)
    data = f"s3://{BUCKET}/models/run1/model.tar.gz"
    assert exported["model_data"] == data and exported["bytes"] == out.stat().st_size
    head = boto3.client("s3").head_object(Bucket=BUCKET, Key="models/run1/model.tar.gz")
    assert head["ContentLength"] == out.stat().st_size

    sm = boto3.client("sagemaker")
    assert _cli("deploy-sagemaker", "--model-data", data, "--role", ROLE, "--endpoint", "glioma-rt",
                "--instance-type", "ml.g4dn.xlarge", "--wait") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "InService"
    ep = sm.describe_endpoint(EndpointName="glioma-rt")
    cfg = sm.describe_endpoint_config(EndpointConfigName=ep["EndpointConfigName"])
    variant = cfg["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.g4dn.xlarge" and variant["InitialInstanceCount"] == 1
    container = sm.describe_model(ModelName=variant["ModelName"])["PrimaryContainer"]
    assert container["Image"] == images.image_uri("us-east-1", "ml.g4dn.xlarge")
    assert "-gpu-" in container["Image"] and container["Image"].startswith("763104351884.dkr.ecr.us-east-1")
    assert container["ModelDataUrl"] == data
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert container["Environment"]["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"

    assert _cli("deploy-sagemaker", "--model-data", data, "--role", ROLE, "--endpoint", "glioma-sls",
                "--serverless", "--memory-mb", "6144", "--max-concurrency", "3", "--wait",
                "--image-uri", "123456789012.dkr.ecr.us-east-1.amazonaws.com/custom:1") == 0
    capsys.readouterr()
    ep = sm.describe_endpoint(EndpointName="glioma-sls")
    variant = sm.describe_endpoint_config(EndpointConfigName=ep["EndpointConfigName"])["ProductionVariants"][0]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 6144, "MaxConcurrency": 3}
    assert "InstanceType" not in variant
    image = sm.describe_model(ModelName=variant["ModelName"])["PrimaryContainer"]["Image"]
    assert image == "123456789012.dkr.ecr.us-east-1.amazonaws.com/custom:1"

    assert _cli("deploy-sagemaker", "--model-data", data, "--role", ROLE, "--endpoint", "glioma-sls",
                "--serverless", "--memory-mb", "5000") == 2  # not a serverless size: refused before AWS
    assert "memory-mb" in capsys.readouterr().err


def test_dry_run_prints_requests_and_sends_nothing(aws, capsys, monkeypatch):
    import boto3

    before = boto3.client("sagemaker").list_models()["Models"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: any call would fail
    assert _cli("deploy-sagemaker", "--model-data", f"s3://{BUCKET}/m/model.tar.gz", "--role", ROLE,
                "--endpoint", "dry", "--serverless", "--region", "eu-south-1", "--dry-run") == 0
    plan = json.loads(capsys.readouterr().out)
    ops = [r["operation"] for r in plan["requests"]]
    assert ops == ["CreateModel", "CreateEndpointConfig", "CreateEndpoint"]
    image = plan["requests"][0]["params"]["PrimaryContainer"]["Image"]
    assert image.startswith("692866216735.dkr.ecr.eu-south-1.amazonaws.com/pytorch-inference:") and "-cpu-" in image
    assert plan["requests"][1]["params"]["ProductionVariants"][0]["ServerlessConfig"]["MemorySizeInMB"] == 6144
    assert _cli("batch-transform-sagemaker", "--model", "m1", "--input", f"s3://{BUCKET}/in/",
                "--output", f"s3://{BUCKET}/out/", "--dry-run") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["requests"][0]["operation"] == "CreateTransformJob"
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws["url"])
    assert boto3.client("sagemaker").list_models()["Models"] == before


def test_image_uri_resolution():
    assert images.image_uri("us-west-2", "ml.c5.xlarge").endswith(":2.6.0-cpu-py312-ubuntu22.04-sagemaker")
    assert images.image_uri("us-west-2", "ml.g5.2xlarge").endswith(":2.6.0-gpu-py312-cu124-ubuntu22.04-sagemaker")
    assert images.image_uri("cn-north-1").startswith("727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/")
    assert images.image_uri("ap-east-1", "ml.m5.large").startswith("871362719292.")
    with pytest.raises(ValueError, match="image-uri"):
        images.image_uri("xx-nowhere-1")
    with pytest.raises(ValueError, match="Neuron"):
        images.processor_for("ml.inf2.xlarge")


def _set_moto_results(url: str, results: list[dict]) -> None:
    req = urllib.request.Request(f"{url}/moto-api/static/sagemaker/endpoint-results", method="POST",
                                 data=json.dumps({"results": results}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()


def test_invoke_s3_uri_reaches_moto_and_cli_reads_the_response(aws, tmp_path, capsys):
    from moto.sagemakerruntime.models import sagemakerruntime_backends

    canned = {"mask_uri": f"s3://{BUCKET}/out/a_mask.png", "total_tumour_pixels": 12}
    _set_moto_results(aws["url"], [{"Body": json.dumps(canned), "ContentType": "application/json"}])
    assert _cli("invoke-sagemaker", "--endpoint", "glioma-s3", f"s3://{BUCKET}/in/a.tif",
                "--output-prefix", f"s3://{BUCKET}/out/", "--out", str(tmp_path)) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["response"] == canned and line["content_type"] == "application/json"
    assert json.loads((tmp_path / "a_mask.json").read_text()) == canned
    # moto keys recorded requests by endpoint name, but its parser loses the name (None): search them all
    backend = sagemakerruntime_backends["123456789012"]["us-east-1"]
    requests = [json.loads(base64.b64decode(k)) for per_endpoint in backend.results.values() for k in per_endpoint]
    expected = {"s3_uri": f"s3://{BUCKET}/in/a.tif", "output_prefix": f"s3://{BUCKET}/out/"}
    request = next(r for r in requests if json.loads(r["Body"]) == expected)
    assert request["Accept"] == "application/json"


def test_invoke_binary_files_and_payload_limit(aws, tmp_path, capsys, monkeypatch):
    mask = np.zeros((1, 64, 64), np.uint8)
    mask[0, 10:20, 10:30] = 1
    tif = tmp_path / "TCGA_1.tif"
    tif.write_bytes(codecs.encode_volume_tiff(sample_images(3)))
    big = tmp_path / "big.npy"
    big.write_bytes(codecs.encode_npy(np.zeros((40, 256, 256, 3), np.uint8)))  # 7.9 MB > 6 MB
    with fake_runtime(codecs.encode_npy(mask)) as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        assert _cli("invoke-sagemaker", "--endpoint", "glioma-rt", str(tif), "--accept", "application/x-npy",
                    "--out", str(tmp_path / "masks")) == 0
        line = json.loads(capsys.readouterr().out)
        assert _cli("invoke-sagemaker", "--endpoint", "glioma-rt", str(big)) == 2
        assert "6 MB" in capsys.readouterr().err
        seen = list(FakeRuntime.seen)
    assert len(seen) == 1  # the oversized body was never sent
    assert seen[0]["path"] == "/endpoints/glioma-rt/invocations"
    assert seen[0]["headers"]["Content-Type"] == "image/tiff" and seen[0]["headers"]["Accept"] == "application/x-npy"
    assert seen[0]["body"] == tif.read_bytes()
    saved = Path(line["saved"])
    assert saved.name == "TCGA_1_mask.npy"
    np.testing.assert_array_equal(np.load(saved, allow_pickle=False), mask)


def test_batch_transform_creates_model_and_job(aws, capsys):
    import boto3

    data = f"s3://{BUCKET}/models/run1/model.tar.gz"
    assert _cli("batch-transform-sagemaker", "--model", "glioma-batch", "--model-data", data, "--role", ROLE,
                "--input", f"s3://{BUCKET}/volumes/", "--output", f"s3://{BUCKET}/masks/",
                "--instance-type", "ml.c5.2xlarge", "--job-name", "glioma-batch-1", "--wait") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "Completed" and result["job"] == "glioma-batch-1"
    sm = boto3.client("sagemaker")
    image = sm.describe_model(ModelName="glioma-batch")["PrimaryContainer"]["Image"]
    assert "-cpu-" in image
    job = sm.describe_transform_job(TransformJobName="glioma-batch-1")
    assert job["ModelName"] == "glioma-batch"
    assert job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{BUCKET}/volumes/"
    assert job["TransformInput"]["ContentType"] == "image/tiff"
    assert job["TransformOutput"]["S3OutputPath"] == f"s3://{BUCKET}/masks/"
    assert job["TransformResources"] == {"InstanceType": "ml.c5.2xlarge", "InstanceCount": 1}
    assert job["MaxPayloadInMB"] == dep.TRANSFORM_PAYLOAD_MB


def test_invoke_sends_scans_and_saves_answers_by_content_type(aws, tmp_path, capsys, monkeypatch):
    from scan_support import dicom_study, nifti_scan, zip_folder

    scans = tmp_path / "scans"
    scans.mkdir()
    nii = nifti_scan(sample_images(4), scans / "case.nii.gz")
    dicom_study(sample_images(4), scans / "study")
    archive = scans / "study.zip"
    archive.write_bytes(zip_folder(scans / "study"))
    for reply_type, accept, sent, saved in [
        ("application/gzip", "application/gzip", [nii], ["case_mask.nii.gz"]),
        ("application/dicom", "application/dicom", [archive, scans / "study"], ["study_seg.dcm", "study_seg.dcm"]),
    ]:
        reply = f"answer as {reply_type}".encode()
        with fake_runtime(reply, reply_type) as url:
            monkeypatch.setenv("AWS_ENDPOINT_URL", url)
            assert _cli("invoke-sagemaker", "--endpoint", "glioma-rt", *map(str, sent), "--accept", accept,
                        "--out", str(tmp_path / "answers")) == 0
            lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            seen = list(FakeRuntime.seen)
        assert [Path(line["saved"]).name for line in lines] == saved
        assert all(Path(line["saved"]).read_bytes() == reply for line in lines)
        assert all(s["headers"]["Accept"] == accept for s in seen)
        if reply_type == "application/gzip":
            assert seen[0]["headers"]["Content-Type"] == "application/gzip" and seen[0]["body"] == nii.read_bytes()
        else:  # a zip as it is, a folder zipped on the fly: the same study either way
            assert [s["headers"]["Content-Type"] for s in seen] == ["application/zip"] * 2
            assert seen[0]["body"] == archive.read_bytes()
            from core.formats.load import load_volume

            np.testing.assert_array_equal(load_volume(seen[1]["body"]).images, load_volume(seen[0]["body"]).images)
