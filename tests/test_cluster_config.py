"""cluster.yaml validates against the cluster-launcher schema that ships inside the installed Ray."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers and all(v["max_workers"] <= config["max_workers"] for v in workers.values())
    assert any("torch==2.14.1" in c for c in config["setup_commands"])
    assert any("pip install" in c and "kdray" in c for c in config["setup_commands"])


def test_a_broken_cluster_yaml_is_rejected():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["max_workers"] = "eight"
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as err:
        assert "eight" in str(err)
    else:
        raise AssertionError("the schema accepted max_workers: eight")
