"""PyTorch inference container image URIs (AWS Deep Learning Containers) per region and CPU/GPU.

The SageMaker SDK resolves these from a bundled table; gliomaseg does not depend on the SDK, so the
table lives here. Source: aws/deep-learning-containers ``available_images.md`` (region registries and
the newest SageMaker ``pytorch-inference`` tags). ``--image-uri`` overrides all of it.
"""

from __future__ import annotations

REPOSITORY = "pytorch-inference"

# PyTorch 2.6.0 is the newest SageMaker pytorch-inference DLC; monai in code/requirements.txt is pinned
# to a release that supports it (monai 1.6 needs torch >= 2.8 and would pull a second torch at start-up).
DEFAULT_VERSION = "2.6.0"
TAGS: dict[str, dict[str, str]] = {
    "2.6.0": {
        "cpu": "2.6.0-cpu-py312-ubuntu22.04-sagemaker",
        "gpu": "2.6.0-gpu-py312-cu124-ubuntu22.04-sagemaker",
    },
}

_DEFAULT_ACCOUNT = "763104351884"
# Opt-in regions publish the DLCs from their own registry account.
REGISTRIES: dict[str, str] = {
    **dict.fromkeys(
        [
            "us-east-1", "us-east-2", "us-west-1", "us-west-2", "ap-south-1", "ap-northeast-1",
            "ap-northeast-2", "ap-southeast-1", "ap-southeast-2", "ap-east-2", "ca-central-1",
            "eu-central-1", "eu-west-1", "eu-west-2", "eu-west-3", "eu-north-1", "sa-east-1",
        ],
        _DEFAULT_ACCOUNT,
    ),
    "af-south-1": "626614931356",
    "ap-east-1": "871362719292",
    "ap-south-2": "772153158452",
    "ap-southeast-3": "907027046896",
    "ap-southeast-4": "457447274322",
    "ap-southeast-5": "550225433462",
    "ap-southeast-7": "590183813437",
    "ap-northeast-3": "364406365360",
    "ca-west-1": "204538143572",
    "eu-south-1": "692866216735",
    "eu-south-2": "503227376785",
    "eu-central-2": "380420809688",
    "il-central-1": "780543022126",
    "mx-central-1": "637423239942",
    "me-south-1": "217643126080",
    "me-central-1": "914824155844",
    "cn-north-1": "727897471807",
    "cn-northwest-1": "727897471807",
}

# Instance families with NVIDIA GPUs that the GPU image runs on.
_GPU_FAMILIES = ("ml.g4dn", "ml.g5", "ml.g6", "ml.g6e", "ml.p3", "ml.p4d", "ml.p4de", "ml.p5", "ml.p5e")
# Inferentia/Trainium need Neuron-compiled models and a different container.
_NEURON_FAMILIES = ("ml.inf", "ml.trn")


def processor_for(instance_type: str | None) -> str:
    """``gpu`` or ``cpu`` for a SageMaker instance type (``None``: serverless, which is CPU only)."""
    if instance_type is None:
        return "cpu"
    if not instance_type.startswith("ml."):
        raise ValueError(f"instance type {instance_type!r} should look like ml.<family>.<size>, e.g. ml.g4dn.xlarge")
    family = instance_type.rsplit(".", 1)[0]
    if family.startswith(_NEURON_FAMILIES):
        raise ValueError(f"{instance_type}: Inferentia/Trainium need a Neuron container; pass --image-uri")
    return "gpu" if family in _GPU_FAMILIES else "cpu"


def image_uri(region: str, instance_type: str | None = None, version: str = DEFAULT_VERSION) -> str:
    """The pytorch-inference image for ``region`` and the processor ``instance_type`` implies."""
    if region not in REGISTRIES:
        raise ValueError(
            f"no known pytorch-inference registry for region {region!r}; pass --image-uri "
            f"(known: {', '.join(sorted(REGISTRIES))})"
        )
    if version not in TAGS:
        raise ValueError(f"unknown container version {version!r}; known: {', '.join(TAGS)}")
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    tag = TAGS[version][processor_for(instance_type)]
    return f"{REGISTRIES[region]}.dkr.ecr.{region}.{domain}/{REPOSITORY}:{tag}"
