"""S3 credentials from a Secret block's JSON; errors name the block, never a value."""

from __future__ import annotations

import json

import pytest

from flows.secrets import credentials_env, load_aws_secret


def test_credentials_env_maps_keys_to_the_aws_variables():
    value = {"aws_access_key_id": "AKIAEXAMPLE", "aws_secret_access_key": "s3cr3t"}
    assert credentials_env(json.dumps(value), "aws") == {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
    }
    with_token = {**value, "aws_session_token": "tok", "region_name": "eu-west-1"}
    env = credentials_env(with_token, "aws")
    assert env["AWS_SESSION_TOKEN"] == "tok" and env["AWS_DEFAULT_REGION"] == "eu-west-1"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not json s3cr3t", "does not hold JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ({"aws_access_key_id": "AKIAEXAMPLE"}, "lacks aws_secret_access_key"),
        (
            {"aws_access_key_id": "a", "aws_secret_access_key": "s3cr3t", "password": "x"},
            "unknown keys password",
        ),
    ],
)
def test_bad_secret_values_are_refused_without_echoing_them(value, message):
    with pytest.raises(ValueError, match=message) as info:
        credentials_env(value, "aws")
    assert "s3cr3t" not in str(info.value) and "'aws'" in str(info.value)


def test_no_block_name_changes_nothing():
    assert load_aws_secret(None) is False and load_aws_secret("") is False


def test_credentials_come_from_a_real_secret_block(prefect_server, monkeypatch):
    from prefect.blocks.system import Secret

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    value = {"aws_access_key_id": "AKIAFROMBLOCK", "aws_secret_access_key": "block-s3cr3t"}
    Secret(value=json.dumps(value)).save("mixer-label-aws-test", overwrite=True)
    assert load_aws_secret("mixer-label-aws-test") is True
    import os

    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIAFROMBLOCK"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "block-s3cr3t"
    with pytest.raises(ValueError, match="no Prefect Secret block named 'absent-block'"):
        load_aws_secret("absent-block")
