"""S3 credentials from a Prefect Secret block, for workers without an instance role or AWS_* env.

The block holds JSON: {"aws_access_key_id": ..., "aws_secret_access_key": ...,
"aws_session_token": ... (optional), "region_name": ... (optional)}. Its name, never its
content, is configuration (MIXER_LABEL_AWS_BLOCK in the work pool's or the server's env).
The values go into this process's environment, where boto3's standard chain and a local Ray
started from here find them; they are never logged or passed as parameters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

_ENV = {
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
    "region_name": "AWS_DEFAULT_REGION",
}


def credentials_env(value: Any, block_name: str) -> dict[str, str]:
    """The AWS_* variables a Secret block's value stands for; errors name the block, not values."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"Secret block {block_name!r} does not hold JSON") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"Secret block {block_name!r} must hold a JSON object")
    missing = [k for k in ("aws_access_key_id", "aws_secret_access_key") if not value.get(k)]
    if missing:
        raise ValueError(f"Secret block {block_name!r} lacks {', '.join(missing)}")
    unknown = sorted(set(value) - set(_ENV))
    if unknown:
        raise ValueError(f"Secret block {block_name!r} has unknown keys {', '.join(unknown)}")
    return {_ENV[key]: str(v) for key, v in value.items() if v}


def load_aws_secret(block_name: str | None) -> bool:
    """Put the credentials of Secret block `block_name` into os.environ; False when unnamed."""
    if not block_name:
        return False
    from prefect.blocks.system import Secret

    try:
        secret = Secret.load(block_name)
    except ValueError:
        raise ValueError(f"no Prefect Secret block named {block_name!r}") from None
    os.environ.update(credentials_env(secret.get(), block_name))
    return True
