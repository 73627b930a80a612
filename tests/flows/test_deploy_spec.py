"""The deployment definition (prefect.yaml), its overrides, and the flow's parameter form."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from console.deploy import add_arguments, parse_parameter
from console.errors import UsageError
from flows.deploy import PREFECT_YAML, DeployError, absolute_paths, check_spec, load_spec

FLOW_PARAMETERS = [
    "input_uri",
    "output_uri",
    "model",
    "backend",
    "precision",
    "batch_size",
    "decode",
    "ray_address",
    "actors",
    "min_actors",
    "max_actors",
    "date",
    "force",
]


def test_prefect_yaml_defines_the_nightly_deployment():
    spec = load_spec("nightly", PREFECT_YAML)
    assert spec.entrypoint == "flows/labeling.py:label_images"
    assert spec.cron == "0 2 * * *" and spec.timezone == "UTC"
    assert set(spec.parameters) <= set(FLOW_PARAMETERS)
    assert {"input_uri", "output_uri", "model"} <= set(spec.parameters)
    check_spec(spec)  # the file itself passes the checks the command runs


def test_prefect_yaml_entrypoint_names_the_flow():
    from flows.labeling import label_images

    path, function = load_spec().entrypoint.split(":")
    assert (PREFECT_YAML.parent / path).is_file()
    assert function == label_images.fn.__name__ and label_images.name == "label-images"


def test_overrides_merge_parameters_and_replace_the_schedule():
    spec = load_spec().with_overrides(
        parameters={"batch_size": 8}, cron="30 1 * * *", timezone="Europe/Berlin"
    )
    assert spec.parameters["batch_size"] == 8 and spec.parameters["backend"] == "auto"
    (schedule,) = spec.schedules()
    assert schedule.cron == "30 1 * * *" and schedule.timezone == "Europe/Berlin"


def test_a_missing_deployment_or_file_is_named(tmp_path: Path):
    with pytest.raises(DeployError, match="no deployment named 'weekly'"):
        load_spec("weekly")
    with pytest.raises(DeployError, match="no such file"):
        load_spec("nightly", tmp_path / "prefect.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("batch_size=32", ("batch_size", 32)),
        ("force=true", ("force", True)),
        ("input_uri=s3://b/in/", ("input_uri", "s3://b/in/")),
        ("date=2024-05-01", ("date", "2024-05-01")),
        ("ray_address=", ("ray_address", "")),
    ],
)
def test_parse_parameter_reads_json_scalars(text, expected):
    assert parse_parameter(text) == expected


def test_parse_parameter_refuses_a_missing_equals_sign():
    with pytest.raises(UsageError, match="NAME=VALUE"):
        parse_parameter("batch_size")


def test_local_paths_become_absolute_but_uris_and_presets_do_not(tmp_path: Path):
    (tmp_path / "m.safetensors").write_bytes(b"x")
    out = absolute_paths(
        {"input_uri": "data/in", "output_uri": "s3://b/out", "model": "m.safetensors"}, tmp_path
    )
    assert out["input_uri"] == str(tmp_path / "data" / "in")
    assert out["output_uri"] == "s3://b/out"
    assert out["model"] == str(tmp_path / "m.safetensors")
    assert absolute_paths({"model": "B/16"}, tmp_path)["model"] == "B/16"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"parameters": {"batchsize": 8}}, "unknown parameter\\(s\\) batchsize"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"cron": "every night"}, "bad cron 'every night'"),
    ],
)
def test_check_spec_names_what_is_wrong(overrides, message):
    with pytest.raises(DeployError, match=message):
        check_spec(load_spec().with_overrides(**overrides))


def test_deploy_command_line_parses():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--work-pool", "gpu", "-p", "batch_size=8", "-p", "force=true"])
    assert args.work_pool == "gpu" and args.param == ["batch_size=8", "force=true"]
    assert args.name == "nightly"


def test_flow_parameter_form_explains_itself():
    from prefect.utilities.callables import parameter_schema

    from flows.labeling import label_images

    schema = parameter_schema(label_images).model_dump()
    properties = schema["properties"]
    assert list(properties) == FLOW_PARAMETERS
    assert schema["required"] == ["input_uri", "output_uri", "model"]
    for name, prop in properties.items():
        assert len(prop.get("description", "")) > 15, f"{name} has no description"
        assert prop["title"] != name, f"{name} has no human title"
    assert properties["backend"]["enum"] == ["auto", "torch", "onnxruntime", "tensorrt"]
    assert properties["batch_size"]["default"] == 64 and properties["batch_size"]["minimum"] == 1
    assert properties["decode"]["enum"] == ["auto", "cpu", "device"]
    assert properties["decode"]["default"] == "auto"
    assert properties["date"]["default"] is None
    for bound in ("min_actors", "max_actors"):
        assert properties[bound]["default"] is None
        assert {"type": "integer", "minimum": 0 if bound == "min_actors" else 1} in properties[
            bound
        ]["anyOf"]
    assert {"format": "date", "type": "string"} in properties["date"]["anyOf"]
    assert properties["force"] == {**properties["force"], "type": "boolean", "default": False}
