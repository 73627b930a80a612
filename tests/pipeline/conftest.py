"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import pytest

from pipeline.storage import open_storage


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """(storage, root URI) on each backend; the root is an empty folder / prefix."""
    if request.param == "local":
        root = str(tmp_path / "root")
        return open_storage(root), root
    bucket = request.getfixturevalue("s3_bucket")
    root = f"s3://{bucket}/root"
    return open_storage(root), root
