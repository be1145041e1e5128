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
from pathlib import Path
from typing import Any

from core.formats.codecs import EXTENSIONS as CONTENT_TYPES
from serve.client import DICOM_FOLDER, SCAN, Job, scan_body, scan_type
from serve.sagemaker import deploy as dep
from serve.sagemaker.export import build_archive, parse_s3_uri, upload_archive

# answer content type -> saved file suffix (after the input's stem)
SUFFIXES = {"image/tiff": "_mask.tif", "image/png": "_mask.png", "application/x-npy": "_mask.npy",
            "application/json": "_mask.json", "application/gzip": "_mask.nii.gz", "application/x-gzip": "_mask.nii.gz",
            "application/x-nifti": "_mask.nii", "application/dicom": "_seg.dcm"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-sagemaker", help="bundle -> model.tar.gz for the SageMaker PyTorch container")
    p.add_argument("--bundle", required=True, type=str,
                   help="bundle directory (e.g. runs/NAME/best) or s3://bucket/prefix")
    p.add_argument("--out", default="model.tar.gz", help="archive to write (default: model.tar.gz)")
    p.add_argument("--upload", metavar="S3_URI", help="also upload it: s3://bucket/prefix[/model.tar.gz]")
    p.add_argument("--requirement", action="append", default=[], help="extra pinned requirement line (repeatable)")
    p.set_defaults(func=_guard(cmd_export))

    p = sub.add_parser("deploy-sagemaker", help="create (or update) a real-time or serverless endpoint")
    p.add_argument("--model-data", required=True, help="s3://.../model.tar.gz from export-sagemaker --upload")
    p.add_argument("--role", required=True, help="SageMaker execution role ARN (reads the model data)")
    p.add_argument("--endpoint", required=True, help="endpoint name")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--instance-type", default="ml.g4dn.xlarge", help="real-time instance (default ml.g4dn.xlarge)")
    kind.add_argument("--serverless", action="store_true", help="serverless endpoint (CPU, pay per request)")
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--memory-mb", type=int, default=6144, help="serverless memory: 1024..6144 in steps of 1024")
    p.add_argument("--max-concurrency", type=int, default=5, help="serverless concurrent invocations")
    _common(p)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="container environment")
    p.add_argument("--wait", action="store_true", help="block until the endpoint is InService")
    p.set_defaults(func=_guard(cmd_deploy))

    p = sub.add_parser("invoke-sagemaker", help="segment files (or s3:// objects) on a SageMaker endpoint")
    p.add_argument("--endpoint", required=True)
    p.add_argument("files", nargs="+", metavar="FILE", help=".tif/.tiff/.png/.npy slices, .nii/.nii.gz scans, "
                   "DICOM .zip/.dcm files or folders, or s3://bucket/key URIs")
    p.add_argument("--out", help="directory for the returned masks / JSON")
    p.add_argument("--content-type", help="request type (default: from the file extension)")
    p.add_argument("--accept", default="application/json",
                   help="application/json (default), application/x-npy, image/png or image/tiff; for a scan also "
                   "application/gzip (the NIfTI mask) or application/dicom (a DICOM SEG of DICOM input)")
    p.add_argument("--slices", action="store_true", help="several slices are unrelated, not one volume")
    p.add_argument("--s3-staging", metavar="S3_URI", help="upload local files here and send their URIs "
                   "(for inputs over the 6 MB invocation limit)")
    p.add_argument("--output-prefix", metavar="S3_URI", help="where the endpoint writes masks for S3 inputs")
    p.add_argument("--serverless", action="store_true", help="apply the serverless 4 MB payload limit")
    p.add_argument("--region")
    p.set_defaults(func=_guard(cmd_invoke))

    p = sub.add_parser("batch-transform-sagemaker", help="segment every object under an S3 prefix")
    p.add_argument("--model", required=True, help="SageMaker model name (deploy-sagemaker creates one)")
    p.add_argument("--input", required=True, help="s3://bucket/prefix/ of slices or volumes")
    p.add_argument("--output", required=True, help="s3://bucket/prefix/ for <key>.out masks")
    p.add_argument("--instance-type", default="ml.c5.xlarge")
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--content-type", default="image/tiff", help="type of every input object (default image/tiff; "
                   "application/octet-stream: sniff each object's magic bytes)")
    p.add_argument("--accept", default="image/tiff", help="mask format (default image/tiff, one page per slice)")
    p.add_argument("--job-name")
    p.add_argument("--model-data", help="create the model NAME from this archive first (needs --role)")
    p.add_argument("--role")
    _common(p)
    p.add_argument("--wait", action="store_true", help="block until the job completes")
    p.set_defaults(func=_guard(cmd_transform))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-uri", help="container image (default: AWS PyTorch inference DLC for the region)")
    p.add_argument("--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / profile)")
    p.add_argument("--dry-run", action="store_true", help="print the requests as JSON; send nothing")


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """AWS failures are one ``error:`` line and exit 1, not a traceback."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(args)
        except (ClientError, BotoCoreError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _client(service: str, region: str | None) -> Any:
    import boto3

    return boto3.client(service, region_name=region)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_export(args: argparse.Namespace) -> int:
    if args.upload:
        parse_s3_uri(args.upload)  # a malformed URI fails before the archive is built
    out = build_archive(args.bundle, args.out, args.requirement)
    result: dict[str, Any] = {"archive": str(out), "bytes": out.stat().st_size}
    if args.upload:
        result["model_data"] = upload_archive(out, args.upload, _client("s3", None))
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


def cmd_deploy(args: argparse.Namespace) -> int:
    region = dep.resolve_region(args.region)
    calls = dep.plan_deploy(
        args.model_data, args.role, args.endpoint, region=region, instance_type=args.instance_type,
        instance_count=args.instance_count, serverless=args.serverless, memory_mb=args.memory_mb,
        max_concurrency=args.max_concurrency, image_uri=args.image_uri, env=_env(args.env),
    )
    if args.dry_run:
        _print({"region": region, "requests": [c.to_json() for c in calls]})
        return 0
    sm = _client("sagemaker", region)
    responses = dep.execute(calls, {"sagemaker": sm})
    result: dict[str, Any] = {"region": region, "endpoint": args.endpoint, "responses": responses}
    if args.wait:
        desc = dep.wait_endpoint(sm, args.endpoint)
        result["status"] = desc.get("EndpointStatus")
    _print(result)
    return 0


def _request_for(path: str, args: argparse.Namespace, s3: Any) -> tuple[bytes, str]:
    """Body and content type for one FILE argument."""
    if path.startswith("s3://") or args.s3_staging:
        uri = path
        if not path.startswith("s3://"):
            bucket, prefix = parse_s3_uri(args.s3_staging)
            key = f"{prefix.rstrip('/')}/{Path(path).name}".lstrip("/")
            s3.upload_file(path, bucket, key)
            uri = f"s3://{bucket}/{key}"
        spec: dict[str, Any] = {"s3_uri": uri}
        if args.output_prefix:
            spec["output_prefix"] = args.output_prefix
        if args.slices:
            spec["volume"] = False
        if args.content_type:
            spec["content_type"] = args.content_type
        return json.dumps(spec).encode(), "application/json"
    local = Path(path)
    if local.is_dir() or scan_type(local):  # a scan: as it is (a DICOM folder zipped), always one volume
        body, ctype, _ = scan_body(Job(local, [local], kind=DICOM_FOLDER if local.is_dir() else SCAN))
        return body, args.content_type or ctype
    ctype = args.content_type or CONTENT_TYPES.get(local.suffix.lower())
    if not ctype:
        raise ValueError(f"{path}: unknown extension; pass --content-type")
    return local.read_bytes(), ctype + ("; volume=false" if args.slices else "")


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".nii.gz", ".nii", ".zip", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def cmd_invoke(args: argparse.Namespace) -> int:
    for path in args.files:
        if not path.startswith("s3://") and not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if args.s3_staging and Path(path).is_dir():
            raise ValueError(f"{path}: zip a DICOM folder before staging it on S3")
    region = args.region
    runtime = _client("sagemaker-runtime", region)
    s3 = _client("s3", region) if args.s3_staging else None
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for path in args.files:
        body, ctype = _request_for(path, args, s3)
        accept = "application/json" if ctype == "application/json" else args.accept
        data, rtype = dep.invoke(runtime, args.endpoint, body, ctype, accept, serverless=args.serverless)
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


def cmd_transform(args: argparse.Namespace) -> int:
    region = dep.resolve_region(args.region)
    calls = []
    if args.model_data:
        if not args.role:
            raise ValueError("--model-data needs --role to create the model")
        image = args.image_uri or dep.default_image_uri(region, args.instance_type)
        calls.append(dep.model_call(args.model, args.model_data, args.role, image, region))
    calls.append(dep.transform_call(
        args.model, args.input, args.output, instance_type=args.instance_type, instance_count=args.instance_count,
        content_type=args.content_type, accept=args.accept, job_name=args.job_name,
    ))
    if args.dry_run:
        _print({"region": region, "requests": [c.to_json() for c in calls]})
        return 0
    sm = _client("sagemaker", region)
    result: dict[str, Any] = {"region": region, "responses": dep.execute(calls, {"sagemaker": sm})}
    job = calls[-1].params["TransformJobName"]
    result["job"] = job
    if args.wait:
        desc = dep.wait_transform(sm, job)
        result["status"] = desc.get("TransformJobStatus")
        result["output"] = desc.get("TransformOutput", {}).get("S3OutputPath")
    _print(result)
    return 0
