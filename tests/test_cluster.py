"""cluster.yaml is what `ray up` accepts: Ray's own schema, after Ray's own defaults are filled in."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_rays_schema(config: dict) -> None:
    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(fillout_defaults(copy.deepcopy(config)))


def test_cluster_shape(config: dict) -> None:
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"].startswith("rayproject/ray:2.60") and "gpu" in config["docker"]["image"]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "trials must not land on the CPU head"
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert any(v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for v in workers.values())
    assert all(v["node_config"]["InstanceType"].startswith(("g5", "g4dn", "p")) for v in workers.values())
    assert all(v["max_workers"] >= v["min_workers"] for v in workers.values())
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "gliomaseg" in setup and "s3 sync" in setup


def test_schema_rejects_a_broken_config(config: dict) -> None:
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_spot"]["bogus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fillout_defaults(broken))
