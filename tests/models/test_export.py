from pathlib import Path

import pytest
import torch

from models.checkpoints import load_checkpoint
from models.export import export_onnx, verify_onnx
from models.mixer import build_preset

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


def test_onnx_has_a_dynamic_batch_and_single_layernorm_nodes(tmp_path):
    model = build_preset("tiny")
    path = export_onnx(model, tmp_path / "tiny.onnx")
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version >= 17
    dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value  # symbolic, not fixed
    norms = [n for n in graph.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 2 * model.config.num_blocks + 1


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_torch_fp32(tmp_path, batch):
    model = build_preset("tiny")
    path = export_onnx(model, tmp_path / "tiny.onnx")
    x = torch.randn(batch, 3, 32, 32)
    diff = verify_onnx(model, path, x)
    print(f"onnxruntime vs torch fp32, batch {batch}: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_official_checkpoint_exports_with_tanh_gelu(tmp_path):
    model = load_checkpoint(Path(__file__).parent / "data" / "official_small" / "params.npz")
    path = export_onnx(model, tmp_path / "official.onnx")
    assert verify_onnx(model, path) <= 1e-4
