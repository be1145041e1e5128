"""SageMaker deployment through boto3: model, endpoint config, endpoint, invocation, batch transform.

Every AWS call is first built as a plain request (``Call``), so ``--dry-run`` can print exactly what
would be sent, and tests can check the requests against a local moto server. The SageMaker SDK is not
needed (v3 dropped ``PyTorchModel``); boto3 honours ``AWS_ENDPOINT_URL`` for local servers.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from serve.sagemaker.images import image_uri as default_image_uri

# SageMaker's real-time invocation payload limit (serverless: 4 MB); bigger inputs go through S3.
MAX_INVOKE_BYTES = 6 * 1024 * 1024
MAX_SERVERLESS_BYTES = 4 * 1024 * 1024
SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)
# Batch transform can send up to 100 MB per record; TorchServe in the container refuses bodies over
# ~6.5 MB unless told otherwise (its enable_envvars_config reads these).
TRANSFORM_PAYLOAD_MB = 100
_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")


@dataclass
class Call:
    """One AWS API request: ``client.<method>(**params)``."""

    service: str
    operation: str
    params: dict[str, Any]

    @property
    def method(self) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.operation).lower()

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "operation": self.operation, "params": self.params}


def resolve_region(region: str | None = None) -> str:
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        import boto3

        region = boto3.session.Session().region_name
    if not region:
        raise ValueError("no AWS region: pass --region or set AWS_REGION")
    return region


def check_name(name: str, what: str = "name") -> str:
    if not _NAME.match(name) or len(name) > 63:
        raise ValueError(f"{what} {name!r}: letters, digits and hyphens, at most 63, no leading hyphen")
    return name


def stamped(base: str, stamp: str | None = None) -> str:
    """``base-YYYYmmdd-HHMMSS`` cut to SageMaker's 63 characters (models and configs are immutable)."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{base[: 62 - len(stamp)].rstrip('-')}-{stamp}"


def container_env(region: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        "SAGEMAKER_PROGRAM": "inference.py",
        "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
        "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
        "SAGEMAKER_REGION": region,
        "TS_MAX_REQUEST_SIZE": str(TRANSFORM_PAYLOAD_MB << 20),
        "TS_MAX_RESPONSE_SIZE": str(TRANSFORM_PAYLOAD_MB << 20),
    }
    env.update(extra or {})
    return env


def model_call(
    name: str, model_data: str, role: str, image: str, region: str, env: dict[str, str] | None = None
) -> Call:
    if not model_data.startswith("s3://") or not model_data.endswith(".tar.gz"):
        raise ValueError(f"--model-data {model_data!r}: expected s3://bucket/key/model.tar.gz")
    if not role.startswith("arn:"):
        raise ValueError(f"--role {role!r}: expected an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    return Call("sagemaker", "CreateModel", {
        "ModelName": check_name(name, "model name"),
        "PrimaryContainer": {"Image": image, "ModelDataUrl": model_data, "Environment": container_env(region, env)},
        "ExecutionRoleArn": role,
    })


def endpoint_config_call(
    name: str,
    model_name: str,
    instance_type: str | None = None,
    instance_count: int = 1,
    memory_mb: int | None = None,
    max_concurrency: int = 5,
) -> Call:
    """Real-time (``instance_type``) or serverless (``memory_mb``) variant taking all traffic."""
    variant: dict[str, Any] = {"VariantName": "AllTraffic", "ModelName": model_name}
    if memory_mb is not None:
        if memory_mb not in SERVERLESS_MEMORY_MB:
            raise ValueError(f"--memory-mb {memory_mb}: serverless takes one of {SERVERLESS_MEMORY_MB}")
        if not 1 <= max_concurrency <= 200:
            raise ValueError(f"--max-concurrency {max_concurrency}: between 1 and 200")
        variant["ServerlessConfig"] = {"MemorySizeInMB": memory_mb, "MaxConcurrency": max_concurrency}
    else:
        if not instance_type:
            raise ValueError("an instance type (e.g. ml.g4dn.xlarge) or --serverless is needed")
        if instance_count < 1:
            raise ValueError(f"--instance-count {instance_count}: at least 1")
        variant.update(InstanceType=instance_type, InitialInstanceCount=instance_count, InitialVariantWeight=1.0)
    return Call("sagemaker", "CreateEndpointConfig", {
        "EndpointConfigName": check_name(name, "endpoint config name"), "ProductionVariants": [variant],
    })


def plan_deploy(
    model_data: str,
    role: str,
    endpoint: str,
    *,
    region: str,
    instance_type: str | None = "ml.g4dn.xlarge",
    instance_count: int = 1,
    serverless: bool = False,
    memory_mb: int = 6144,
    max_concurrency: int = 5,
    image_uri: str | None = None,
    env: dict[str, str] | None = None,
    stamp: str | None = None,
) -> list[Call]:
    """CreateModel, CreateEndpointConfig, CreateEndpoint (UpdateEndpoint when it exists; see deploy)."""
    check_name(endpoint, "endpoint name")
    image = image_uri or default_image_uri(region, None if serverless else instance_type)
    name = stamped(endpoint, stamp)
    return [
        model_call(name, model_data, role, image, region, env),
        endpoint_config_call(
            name, name, None if serverless else instance_type, instance_count,
            memory_mb if serverless else None, max_concurrency,
        ),
        Call("sagemaker", "CreateEndpoint", {"EndpointName": endpoint, "EndpointConfigName": name}),
    ]


def endpoint_exists(sm: Any, name: str) -> bool:
    try:
        sm.describe_endpoint(EndpointName=name)
        return True
    except Exception as exc:  # botocore ClientError ValidationException "Could not find endpoint"
        if "Could not find" in str(exc) or "ValidationException" in str(exc):
            return False
        raise


def execute(calls: list[Call], clients: dict[str, Any]) -> list[dict[str, Any]]:
    """Send each call with its service's client; an existing endpoint gets UpdateEndpoint (blue/green)."""
    responses = []
    for call in calls:
        client = clients[call.service]
        if call.operation == "CreateEndpoint" and endpoint_exists(client, call.params["EndpointName"]):
            call = Call(call.service, "UpdateEndpoint", call.params)
        resp = getattr(client, call.method)(**call.params)
        resp.pop("ResponseMetadata", None)
        responses.append({"operation": call.operation, **resp})
    return responses


def wait_endpoint(sm: Any, name: str, delay: int = 30, max_attempts: int = 120) -> dict[str, Any]:
    """Block until InService; a failed endpoint raises with SageMaker's FailureReason."""
    from botocore.exceptions import WaiterError

    try:
        sm.get_waiter("endpoint_in_service").wait(
            EndpointName=name, WaiterConfig={"Delay": delay, "MaxAttempts": max_attempts}
        )
    except WaiterError as exc:
        desc = sm.describe_endpoint(EndpointName=name)
        raise RuntimeError(f"endpoint {name}: {desc.get('EndpointStatus')}: {desc.get('FailureReason', exc)}") from exc
    return sm.describe_endpoint(EndpointName=name)


def invoke(
    runtime: Any, endpoint: str, body: bytes, content_type: str, accept: str, serverless: bool = False
) -> tuple[bytes, str]:
    """One invocation; refuses bodies over the payload limit before sending them."""
    limit = MAX_SERVERLESS_BYTES if serverless else MAX_INVOKE_BYTES
    if len(body) > limit:
        raise ValueError(
            f"request of {len(body)} bytes exceeds SageMaker's {limit >> 20} MB invocation limit; "
            "stage the file in S3 (--s3-staging s3://bucket/prefix) or use batch-transform-sagemaker"
        )
    resp = runtime.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType=content_type, Accept=accept)
    return resp["Body"].read(), str(resp.get("ContentType", ""))


def transform_call(
    model: str,
    input_uri: str,
    output_uri: str,
    *,
    instance_type: str = "ml.c5.xlarge",
    instance_count: int = 1,
    content_type: str = "image/tiff",
    accept: str = "image/tiff",
    job_name: str | None = None,
    max_payload_mb: int = TRANSFORM_PAYLOAD_MB,
) -> Call:
    """One record per S3 object (a slice or a whole multi-page volume); outputs land as ``<key>.out``."""
    for uri, what in ((input_uri, "--input"), (output_uri, "--output")):
        if not uri.startswith("s3://"):
            raise ValueError(f"{what} {uri!r}: expected an s3:// prefix")
    if not 1 <= max_payload_mb <= 100:
        raise ValueError(f"max payload {max_payload_mb} MB: SageMaker allows 1..100")
    return Call("sagemaker", "CreateTransformJob", {
        "TransformJobName": check_name(job_name or stamped(model), "transform job name"),
        "ModelName": check_name(model, "model name"),
        "BatchStrategy": "SingleRecord",
        "MaxConcurrentTransforms": 1,
        "MaxPayloadInMB": max_payload_mb,
        "ModelClientConfig": {"InvocationsTimeoutInSeconds": 600, "InvocationsMaxRetries": 1},
        "Environment": {"TS_MAX_REQUEST_SIZE": str(max_payload_mb << 20),
                        "TS_MAX_RESPONSE_SIZE": str(max_payload_mb << 20)},
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
            "ContentType": content_type, "SplitType": "None", "CompressionType": "None",
        },
        "TransformOutput": {"S3OutputPath": output_uri, "Accept": accept, "AssembleWith": "None"},
        "TransformResources": {"InstanceType": instance_type, "InstanceCount": instance_count},
    })


def wait_transform(sm: Any, name: str, delay: int = 30, max_attempts: int = 240) -> dict[str, Any]:
    """Block until the job ends; anything but Completed raises with SageMaker's FailureReason."""
    from botocore.exceptions import WaiterError

    with contextlib.suppress(WaiterError):  # a Failed job ends the waiter too; the status below says why
        sm.get_waiter("transform_job_completed_or_stopped").wait(
            TransformJobName=name, WaiterConfig={"Delay": delay, "MaxAttempts": max_attempts}
        )
    desc = sm.describe_transform_job(TransformJobName=name)
    if desc.get("TransformJobStatus") != "Completed":
        raise RuntimeError(f"transform job {name}: {desc.get('TransformJobStatus')}: {desc.get('FailureReason', '')}")
    return desc
