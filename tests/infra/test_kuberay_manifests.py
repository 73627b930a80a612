"""infra/kuberay/*.yaml against the KubeRay CRD schema (vendored in infra/kuberay/schema/).

The API server checks a custom resource against the CRD's openAPIV3Schema; with strict field
validation (kubectl's default since 1.27) it also rejects unknown fields. We apply the same
schema with jsonschema and close every object that lists its properties, so a misspelled key
fails here as it would on `kubectl apply`. A few rules the KubeRay operator enforces in code
(names, replica bounds) are checked beside it.
"""

from __future__ import annotations

import copy
import re
import shlex
from functools import cache
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "infra" / "kuberay"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayCluster": 53, "RayJob": 47}  # KubeRay v1.7.0 utils/constant.go

OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": DNS1035.pattern, "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict(schema):
    """The CRD schema as the API server applies it, in JSON Schema terms."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "x-kubernetes-validations" in schema:
        # CEL rules cannot be evaluated here: a manifest that sets such a field fails
        # loudly rather than passing unchecked.
        return False
    out = {key: strict(value) for key, value in schema.items()}
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((KUBERAY / "schema" / CRDS[kind]).read_text(), Loader=yaml.CSafeLoader)
    assert crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert served["served"] and served["storage"]
    schema = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    return jsonschema.Draft7Validator(schema)


def errors(document: dict) -> list[str]:
    found = validator(document["kind"]).iter_errors(document)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def one(name: str, kind: str) -> dict:
    (document,) = [d for d in documents(name) if d["kind"] == kind]
    return document


def cluster_specs():
    yield "raycluster.yaml", one("raycluster.yaml", "RayCluster")["spec"]
    yield "rayjob.yaml", one("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]


def pods(spec: dict):
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


@pytest.mark.parametrize(
    ("name", "kind"), [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")]
)
def test_manifest_matches_the_crd_schema(name, kind):
    document = one(name, kind)
    assert errors(document) == []
    assert len(document["metadata"]["name"]) <= MAX_NAME[kind]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resource"),
            {},
            "resource",
        ),
        (
            (
                "spec",
                "workerGroupSpecs",
                0,
                "template",
                "spec",
                "containers",
                0,
                "resources",
                "limits",
                "memory",
            ),
            "12 Gi",
            "12 Gi",
        ),
        (("spec", "workerGroupSpecs", 0, "maxReplica"), 3, "maxReplica"),
        (
            (
                "spec",
                "headGroupSpec",
                "template",
                "spec",
                "containers",
                0,
                "ports",
                0,
                "containerPort",
            ),
            "6379",
            "6379",
        ),
        (("metadata", "name"), "Mixer_Label", "Mixer_Label"),
    ],
)
def test_the_schema_catches_mistakes(path, value, expected):
    """Typos, bad quantities and wrong types fail, so the passing test above means something."""
    broken = copy.deepcopy(one("raycluster.yaml", "RayCluster"))
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert any(expected in message for message in errors(broken)), errors(broken)


def test_missing_required_field_fails():
    broken = copy.deepcopy(one("raycluster.yaml", "RayCluster"))
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in message for message in errors(broken))


@pytest.mark.parametrize(("name", "spec"), list(cluster_specs()))
def test_gpu_worker_groups_ask_for_whole_gpus(name, spec):
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups), "group names must be unique"
    for group in groups:
        label = f"{name}:{group['groupName']}"
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], label
        (container,) = group["template"]["spec"]["containers"]
        requests = container["resources"]["requests"]
        limits = container["resources"]["limits"]
        # Extended resources cannot be overcommitted: Kubernetes wants requests == limits.
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == "1", label
        assert {"cpu", "memory"} <= set(requests), label
        tolerated = {t["key"] for t in group["template"]["spec"].get("tolerations", [])}
        assert "nvidia.com/gpu" in tolerated, label


def test_raycluster_gpu_groups_scale_from_zero():
    spec = one("raycluster.yaml", "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == group.get("replicas", 0) == 0, group["groupName"]
        assert group["maxReplicas"] >= 1, group["groupName"]


def test_rayjob_gpu_workers_scale_from_zero_to_what_the_run_asks_for():
    """The run asks for --max-actors GPUs; the groups can give that many, starting from none."""
    job = one("rayjob.yaml", "RayJob")["spec"]
    spec = job["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == group.get("replicas", 0) == 0, group["groupName"]
    from console import main as cli

    args = cli.build_parser().parse_args(shlex.split(job["entrypoint"])[1:])
    assert args.actor_device == "gpu"  # asks for GPUs before any GPU pod exists
    # One GPU per pod (test_gpu_worker_groups_ask_for_whole_gpus): maxReplicas GPUs in all.
    assert args.max_actors == sum(g["maxReplicas"] for g in spec["workerGroupSpecs"])


@pytest.mark.parametrize(("name", "spec"), list(cluster_specs()))
def test_head_runs_no_actors_and_no_gpu(name, spec):
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"], name
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}


@pytest.mark.parametrize(("name", "spec"), list(cluster_specs()))
def test_every_pod_runs_our_image_and_ray_version(name, spec):
    pinned = re.search(r"^ray==(\S+)$", (REPO / "requirements/constraints.txt").read_text(), re.M)
    assert spec["rayVersion"] == pinned.group(1)
    expected = f"registry.example.com/mixer-label:{version('mixer-label')}-gpu"
    for group, pod in pods(spec):
        assert [c["image"] for c in pod["containers"]] == [expected], f"{name}:{group}"
        assert pod["serviceAccountName"] == "mixer-label", f"{name}:{group}"


def test_service_account_is_defined_beside_the_cluster():
    account = one("raycluster.yaml", "ServiceAccount")
    assert account["apiVersion"] == "v1"
    assert account["metadata"]["name"] == "mixer-label"


def test_rayjob_runs_the_pods_of_raycluster_and_cleans_up():
    job = one("rayjob.yaml", "RayJob")["spec"]
    cluster = one("raycluster.yaml", "RayCluster")["spec"]
    ours = job["rayClusterSpec"]
    assert ours["rayVersion"] == cluster["rayVersion"]
    assert ours["headGroupSpec"] == cluster["headGroupSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for group in ours["workerGroupSpecs"]:
        assert group["template"] == groups[group["groupName"]]["template"], group["groupName"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] >= 0
    assert job["activeDeadlineSeconds"] > 0
    assert job["backoffLimit"] >= 0


def test_rayjob_entrypoint_is_a_valid_mixer_label_run():
    from console import main as cli

    assert "run" in {name for name, _, _ in cli.COMMANDS}
    argv = shlex.split(one("rayjob.yaml", "RayJob")["spec"]["entrypoint"])
    assert argv[:2] == ["mixer-label", "run"]
    args = cli.build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.ray_address == "auto"  # the driver joins the RayJob's own cluster
    assert args.model.startswith("s3://")  # every node fetches it; no local path on pods
