"""infra/ray/reserve_gpus.py: counting GPUs and refusing bad input (the cluster part is in
test_multinode.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "ray" / "reserve_gpus.py"


@pytest.fixture(scope="module")
def reserve():
    spec = importlib.util.spec_from_file_location("reserve_gpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_gpus_of_alive_nodes_only(reserve):
    nodes = [
        {"Alive": True, "Resources": {"CPU": 0.0}},  # the head
        {"Alive": True, "Resources": {"CPU": 192.0, "GPU": 8.0}},
        {"Alive": False, "Resources": {"CPU": 4.0, "GPU": 1.0}},  # a node that left
        {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
    ]
    assert reserve.cluster_gpus(nodes) == 9
    assert reserve.cluster_gpus([]) == 0


def test_negative_count_is_refused_before_joining_ray(reserve, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reserve.main(["-3"])
    assert exit_info.value.code == 2
    assert "gpus must be 0 or more, not -3" in capsys.readouterr().err
