"""`python -m serve {export,deploy,invoke,batch-transform}-sagemaker`: the SageMaker path from a bundle.

Each command prints one JSON document (or one per invoked file) on stdout so scripts can chain them.
``invoke-sagemaker`` sends slices (.tif/.png/.npy) and scans (.nii/.nii.gz, a zipped DICOM study, one
.dcm, or a DICOM folder zipped on the fly) with their content types, and saves each answer by its
content type: ``NAME_mask.nii.gz`` (NIfTI), ``NAME_seg.dcm`` (DICOM SEG), ``NAME_mask.tif`` ...
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import add_arguments, from_args, meta
from core.formats.codecs import EXTENSIONS as CONTENT_TYPES
from serve.client import DICOM_FOLDER, SCAN, Job, scan_body, scan_type
from serve.sagemaker import deploy as dep
from serve.sagemaker.export import build_archive, parse_s3_uri, upload_archive

# answer content type -> saved file suffix (after the input's stem)
SUFFIXES = {"image/tiff": "_mask.tif", "image/png": "_mask.png", "application/x-npy": "_mask.npy",
            "application/json": "_mask.json", "application/gzip": "_mask.nii.gz", "application/x-gzip": "_mask.nii.gz",
            "application/x-nifti": "_mask.nii", "application/dicom": "_seg.dcm"}


def _repeated(text: str, metavar: str | None = None) -> Any:
    """A repeatable option as a ``list[str]`` field (each use adds one item)."""
    return field(default_factory=list, metadata=meta(
        text, argument={"action": "append", "default": [], **({"metavar": metavar} if metavar else {})}))


@dataclass
class ExportSagemakerOptions:
    """The `serve export-sagemaker` options."""

    bundle: str = field(metadata=meta("bundle directory (e.g. runs/NAME/best) or s3://bucket/prefix"))
    out: str = field(default="model.tar.gz", metadata=meta("archive to write"))
    upload: str | None = field(default=None, metadata=meta(
        "also upload it: s3://bucket/prefix[/model.tar.gz]", argument={"metavar": "S3_URI"}))
    requirement: list[str] = _repeated("extra pinned requirement line (repeatable)")


@dataclass
class AwsOptions:
    """What deploy-sagemaker and batch-transform-sagemaker share: the container, the region, a dry run."""

    image_uri: str | None = field(default=None, metadata=meta(
        "container image (default: AWS PyTorch inference DLC for the region)"))
    region: str | None = field(default=None, metadata=meta(
        "AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / profile)"))
    dry_run: bool = field(default=False, metadata=meta("print the requests as JSON; send nothing"))


@dataclass
class DeployRun:
    """The `serve deploy-sagemaker` options of its own (DeploySagemakerOptions adds AwsOptions)."""

    model_data: str = field(metadata=meta("s3://.../model.tar.gz from export-sagemaker --upload"))
    role: str = field(metadata=meta("SageMaker execution role ARN (reads the model data)"))
    endpoint: str = field(metadata=meta("endpoint name"))
    instance_type: str = field(default="ml.g4dn.xlarge", metadata=meta("real-time instance", at_most_one_of="kind"))
    serverless: bool = field(default=False, metadata=meta(
        "serverless endpoint (CPU, pay per request)", at_most_one_of="kind"))
    instance_count: int = field(default=1, metadata=meta("real-time instances"))
    memory_mb: int = field(default=6144, metadata=meta("serverless memory: 1024..6144 in steps of 1024"))
    max_concurrency: int = field(default=5, metadata=meta("serverless concurrent invocations"))
    env: list[str] = _repeated("container environment", "KEY=VALUE")
    wait: bool = field(default=False, metadata=meta("block until the endpoint is InService"))


@dataclass
class DeploySagemakerOptions(AwsOptions, DeployRun):
    """The `serve deploy-sagemaker` options: DeployRun's, then AwsOptions'."""


@dataclass
class InvokeSagemakerOptions:
    """The `serve invoke-sagemaker` options."""

    endpoint: str = field(metadata=meta("endpoint name"))
    files: list[str] = field(metadata=meta(
        ".tif/.tiff/.png/.npy slices, .nii/.nii.gz scans, DICOM .zip/.dcm files or folders, or s3://bucket/key URIs",
        positional=True, argument={"nargs": "+", "metavar": "FILE"}))
    out: str | None = field(default=None, metadata=meta("directory for the returned masks / JSON"))
    content_type: str | None = field(default=None, metadata=meta("request type (default: from the file extension)"))
    accept: str = field(default="application/json", metadata=meta(
        "application/json, application/x-npy, image/png or image/tiff; for a scan also application/gzip (the NIfTI "
        "mask) or application/dicom (a DICOM SEG of DICOM input)"))
    slices: bool = field(default=False, metadata=meta("several slices are unrelated, not one volume"))
    s3_staging: str | None = field(default=None, metadata=meta(
        "upload local files here and send their URIs (for inputs over the 6 MB invocation limit)",
        argument={"metavar": "S3_URI"}))
    output_prefix: str | None = field(default=None, metadata=meta(
        "where the endpoint writes masks for S3 inputs", argument={"metavar": "S3_URI"}))
    serverless: bool = field(default=False, metadata=meta("apply the serverless 4 MB payload limit"))
    region: str | None = field(default=None, metadata=meta(
        "AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / profile)"))


@dataclass
class TransformRun:
    """The `serve batch-transform-sagemaker` options of its own (TransformSagemakerOptions adds AwsOptions)."""

    model: str = field(metadata=meta("SageMaker model name (deploy-sagemaker creates one)"))
    input: str = field(metadata=meta("s3://bucket/prefix/ of slices or volumes"))
    output: str = field(metadata=meta("s3://bucket/prefix/ for <key>.out masks"))
    instance_type: str = field(default="ml.c5.xlarge", metadata=meta("instance type of the job"))
    instance_count: int = field(default=1, metadata=meta("instances of the job"))
    content_type: str = field(default="image/tiff", metadata=meta(
        "type of every input object (application/octet-stream: sniff each object's magic bytes)"))
    accept: str = field(default="image/tiff", metadata=meta("mask format (image/tiff: one page per slice)"))
    job_name: str | None = field(default=None, metadata=meta("the job's name (default: the model's, time-stamped)"))
    model_data: str | None = field(default=None, metadata=meta(
        "create the model NAME from this archive first (needs --role)"))
    role: str | None = field(default=None, metadata=meta("SageMaker execution role ARN, for --model-data"))
    wait: bool = field(default=False, metadata=meta("block until the job completes"))


@dataclass
class TransformSagemakerOptions(AwsOptions, TransformRun):
    """The `serve batch-transform-sagemaker` options: TransformRun's, then AwsOptions'."""


COMMANDS: dict[str, tuple[str, type]] = {
    "export-sagemaker": ("bundle -> model.tar.gz for the SageMaker PyTorch container", ExportSagemakerOptions),
    "deploy-sagemaker": ("create (or update) a real-time or serverless endpoint", DeploySagemakerOptions),
    "invoke-sagemaker": ("segment files (or s3:// objects) on a SageMaker endpoint", InvokeSagemakerOptions),
    "batch-transform-sagemaker": ("segment every object under an S3 prefix", TransformSagemakerOptions),
}


def register(sub: argparse._SubParsersAction) -> None:
    handlers = {"export-sagemaker": cmd_export, "deploy-sagemaker": cmd_deploy, "invoke-sagemaker": cmd_invoke,
                "batch-transform-sagemaker": cmd_transform}
    for name, (text, options) in COMMANDS.items():
        p = sub.add_parser(name, help=text)
        add_arguments(p, options)
        p.set_defaults(func=_guard(handlers[name], options))


def _guard(fn: Callable[[Any], int], options: type) -> Callable[[argparse.Namespace], int]:
    """``fn`` on the command line's ``options``; AWS failures are one ``error:`` line and exit 1, not a
    traceback."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(from_args(args, options))
        except (ClientError, BotoCoreError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _client(service: str, region: str | None) -> Any:
    import boto3

    return boto3.client(service, region_name=region)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_export(opts: ExportSagemakerOptions) -> int:
    if opts.upload:
        parse_s3_uri(opts.upload)  # a malformed URI fails before the archive is built
    out = build_archive(opts.bundle, opts.out, opts.requirement)
    result: dict[str, Any] = {"archive": str(out), "bytes": out.stat().st_size}
    if opts.upload:
        result["model_data"] = upload_archive(out, opts.upload, _client("s3", None))
    _print(result)
    return 0


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def cmd_deploy(opts: DeploySagemakerOptions) -> int:
    region = dep.resolve_region(opts.region)
    calls = dep.plan_deploy(
        opts.model_data, opts.role, opts.endpoint, region=region, instance_type=opts.instance_type,
        instance_count=opts.instance_count, serverless=opts.serverless, memory_mb=opts.memory_mb,
        max_concurrency=opts.max_concurrency, image_uri=opts.image_uri, env=_env(opts.env),
    )
    if opts.dry_run:
        _print({"region": region, "requests": [c.to_json() for c in calls]})
        return 0
    sm = _client("sagemaker", region)
    responses = dep.execute(calls, {"sagemaker": sm})
    result: dict[str, Any] = {"region": region, "endpoint": opts.endpoint, "responses": responses}
    if opts.wait:
        desc = dep.wait_endpoint(sm, opts.endpoint)
        result["status"] = desc.get("EndpointStatus")
    _print(result)
    return 0


def _request_for(path: str, opts: InvokeSagemakerOptions, s3: Any) -> tuple[bytes, str]:
    """Body and content type for one FILE argument."""
    if path.startswith("s3://") or opts.s3_staging:
        uri = path
        if not path.startswith("s3://"):
            bucket, prefix = parse_s3_uri(opts.s3_staging)
            key = f"{prefix.rstrip('/')}/{Path(path).name}".lstrip("/")
            s3.upload_file(path, bucket, key)
            uri = f"s3://{bucket}/{key}"
        spec: dict[str, Any] = {"s3_uri": uri}
        if opts.output_prefix:
            spec["output_prefix"] = opts.output_prefix
        if opts.slices:
            spec["volume"] = False
        if opts.content_type:
            spec["content_type"] = opts.content_type
        return json.dumps(spec).encode(), "application/json"
    local = Path(path)
    if local.is_dir() or scan_type(local):  # a scan: as it is (a DICOM folder zipped), always one volume
        body, ctype, _ = scan_body(Job(local, [local], kind=DICOM_FOLDER if local.is_dir() else SCAN))
        return body, opts.content_type or ctype
    ctype = opts.content_type or CONTENT_TYPES.get(local.suffix.lower())
    if not ctype:
        raise ValueError(f"{path}: unknown extension; pass --content-type")
    return local.read_bytes(), ctype + ("; volume=false" if opts.slices else "")


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".nii.gz", ".nii", ".zip", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def cmd_invoke(opts: InvokeSagemakerOptions) -> int:
    for path in opts.files:
        if not path.startswith("s3://") and not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if opts.s3_staging and Path(path).is_dir():
            raise ValueError(f"{path}: zip a DICOM folder before staging it on S3")
    region = opts.region
    runtime = _client("sagemaker-runtime", region)
    s3 = _client("s3", region) if opts.s3_staging else None
    out = Path(opts.out) if opts.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for path in opts.files:
        body, ctype = _request_for(path, opts, s3)
        accept = "application/json" if ctype == "application/json" else opts.accept
        data, rtype = dep.invoke(runtime, opts.endpoint, body, ctype, accept, serverless=opts.serverless)
        rtype = rtype.split(";", 1)[0].strip().lower()
        line: dict[str, Any] = {"file": path, "content_type": rtype, "bytes": len(data)}
        if rtype == "application/json":
            try:
                line["response"] = json.loads(data)
            except ValueError:
                line["response"] = data.decode("utf-8", "replace")[:2000]
        if out:
            target = out / f"{_stem(path)}{SUFFIXES.get(rtype, '_mask.bin')}"
            target.write_bytes(data)
            line["saved"] = str(target)
        print(json.dumps(line, default=str))
    return 0


def cmd_transform(opts: TransformSagemakerOptions) -> int:
    region = dep.resolve_region(opts.region)
    calls = []
    if opts.model_data:
        if not opts.role:
            raise ValueError("--model-data needs --role to create the model")
        image = opts.image_uri or dep.default_image_uri(region, opts.instance_type)
        calls.append(dep.model_call(opts.model, opts.model_data, opts.role, image, region))
    calls.append(dep.transform_call(
        opts.model, opts.input, opts.output, instance_type=opts.instance_type, instance_count=opts.instance_count,
        content_type=opts.content_type, accept=opts.accept, job_name=opts.job_name,
    ))
    if opts.dry_run:
        _print({"region": region, "requests": [c.to_json() for c in calls]})
        return 0
    sm = _client("sagemaker", region)
    result: dict[str, Any] = {"region": region, "responses": dep.execute(calls, {"sagemaker": sm})}
    job = calls[-1].params["TransformJobName"]
    result["job"] = job
    if opts.wait:
        desc = dep.wait_transform(sm, job)
        result["status"] = desc.get("TransformJobStatus")
        result["output"] = desc.get("TransformOutput", {}).get("S3OutputPath")
    _print(result)
    return 0
