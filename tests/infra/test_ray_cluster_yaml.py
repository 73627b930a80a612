"""infra/ray/cluster-aws.yaml: valid for the Ray in our pins, a CPU head, GPU workers that scale."""

from __future__ import annotations

import copy
import json
import re
from importlib.metadata import metadata
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "infra" / "ray" / "cluster-aws.yaml"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

# (GPUs, vCPUs) per instance type, from the EC2 instance type pages; resources must not lie.
EC2_SHAPES = {
    "g5.xlarge": (1, 4),
    "g5.2xlarge": (1, 8),
    "g5.12xlarge": (4, 48),
    "p4d.24xlarge": (8, 96),
    "p5.48xlarge": (8, 192),
    "m6i.2xlarge": (0, 8),
}


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_validates_against_ray_json_schema(config):
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    assert errors == []


def test_schema_rejects_a_typo(config):
    """The schema is strict enough to matter: a misspelled node-type key fails."""
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu.g5"]["max_worker"] = 4
    schema = json.loads(RAY_SCHEMA.read_text())
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(broken, schema)


def test_ray_up_config_checks_pass(config):
    """What `ray up` runs before it calls AWS: fill defaults, merge commands, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head.cpu"
    assert prepared["available_node_types"]["head.cpu"]["max_workers"] == 0


def test_cpu_head_and_autoscaling_gpu_workers(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # No GPU, and no CPU slot either: actors must never land on the head.
    assert head["resources"] == {"CPU": 0}
    assert EC2_SHAPES[head["node_config"]["InstanceType"]][0] == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    families = {t["node_config"]["InstanceType"].split(".")[0] for t in gpu_types.values()}
    assert {"g5", "p4d", "p5"} <= families
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, f"{name} should scale from zero"
        assert node_type["max_workers"] >= 1, name
        assert node_type["max_workers"] <= config["max_workers"], name


@pytest.mark.parametrize("name", ["gpu.g5", "gpu.p4d", "gpu.p5"])
def test_resources_match_the_instance_type(config, name):
    node_type = config["available_node_types"][name]
    instance = node_type["node_config"]["InstanceType"]
    gpus, vcpus = EC2_SHAPES[instance]
    assert node_type["resources"].get("GPU", 0) == gpus, instance
    assert node_type["resources"]["CPU"] == vcpus, instance


def test_every_node_has_an_image_with_a_current_nvidia_driver(config):
    # Without ImageId Ray falls back to an Ubuntu 18.04 DLAMI whose driver predates H100.
    for name, node_type in config["available_node_types"].items():
        image = node_type["node_config"].get("ImageId", "")
        assert image.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/"), name


def test_workers_install_the_project_with_gpu_and_tensorrt_extras(config):
    extras = set(metadata("mixer-label").get_all("Provides-Extra"))
    worker = " ".join(config["worker_setup_commands"])
    match = re.search(r'-e "?/home/ray/mixer-label\[([a-z,]+)\]', worker)
    assert match, worker
    wanted = set(match.group(1).split(","))
    assert wanted == {"gpu", "tensorrt"}
    assert wanted <= extras, f"extras missing from pyproject.toml: {wanted - extras}"
    # Same pins as the image: infra/docker/Dockerfile's ARGs.
    dockerfile = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    for arg, package in (
        ("TENSORRT_VERSION", "tensorrt"),
        ("ONNXRUNTIME_GPU_VERSION", "onnxruntime-gpu"),
    ):
        pin = re.search(rf"^ARG {arg}=(\S+)$", dockerfile, re.M).group(1)
        assert f"{package}=={pin}" in worker, package
    assert "pip uninstall -y -q onnxruntime" in worker
    head = " ".join(config["head_setup_commands"])
    assert "-e /home/ray/mixer-label" in head
    for command in (worker, head):
        assert "-c /home/ray/mixer-label/requirements/constraints.txt" in command


def test_the_synced_checkout_is_this_repo(config):
    # ray up resolves "." against the directory it is started in: the repo root.
    (remote, local), *_ = config["file_mounts"].items()
    assert remote == "/home/ray/mixer-label"
    assert (REPO / local / "pyproject.toml").is_file()
    assert (REPO / local / "requirements" / "constraints.txt").is_file()
    assert ".gitignore" in config["rsync_filter"]  # keeps .venv and .demo off the wire


def test_images_run_the_pinned_ray_and_python(config):
    pinned = re.search(
        r"^ray==(\S+)$", (REPO / "requirements" / "constraints.txt").read_text(), re.M
    )
    assert pinned
    for key in ("head_image", "worker_image"):
        image = config["docker"][key]
        assert image.startswith(f"rayproject/ray:{pinned.group(1)}-py311-"), image
    assert config["docker"]["worker_image"].endswith("-gpu")
