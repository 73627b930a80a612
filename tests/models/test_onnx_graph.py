"""The ONNX graphs TensorRT builds from: precision cast inside, LayerNorm in fp32, checked on CPU.

onnxruntime's CPU provider runs the fp16 graph; it has no bf16 MatMul, so the bf16 graph runs
on onnx's reference evaluator (numpy with ml_dtypes' bfloat16) instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.backends.onnx_graph import OUTPUT_NAMES, export_cached

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

ONNX_TYPES = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16}
ONNX_TYPES["bf16"] = onnx.TensorProto.BFLOAT16


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def value_types(model) -> dict[str, int]:
    """Element type of every tensor in the graph, after shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = inferred.graph
    types: dict[str, int] = {}
    for init in graph.initializer:
        types[init.name] = init.data_type
    for v in [*graph.input, *graph.value_info, *graph.output]:
        types[v.name] = v.type.tensor_type.elem_type
    return types


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_graph_is_typed_for_a_strongly_typed_build(tiny, tmp_path, precision):
    path = export_cached(tiny, precision, tmp_path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    types = value_types(model)
    nodes = model.graph.node
    assert not [n for n in nodes if n.op_type == "Conv"]  # ONNX Conv has no bf16
    norms = [n for n in nodes if n.op_type == "LayerNormalization"]
    assert len(norms) == 2 * tiny.config.num_blocks + 1
    for node in norms:  # input, scale, bias and output all fp32
        assert {types[name] for name in [*node.input, node.output[0]]} == {ONNX_TYPES["fp32"]}
    gemms = [n for n in nodes if n.op_type in ("MatMul", "Gemm")]
    assert len(gemms) == 4 * tiny.config.num_blocks + 2  # + stem and head
    for node in gemms:
        assert {types[name] for name in node.input} == {ONNX_TYPES[precision]}, node.name
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    for output in model.graph.output:
        assert output.type.tensor_type.elem_type == ONNX_TYPES["fp32"]
        assert output.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert model.graph.input[0].type.tensor_type.elem_type == ONNX_TYPES["fp32"]


def test_fp16_graph_runs_in_onnxruntime_close_to_fp32(tiny, images, tmp_path):
    path = export_cached(tiny, "fp16", tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, features = session.run(list(OUTPUT_NAMES), {"images": images.numpy()})
    with torch.inference_mode():
        expected = tiny(images).numpy()
        expected_features = tiny.forward_features(images).numpy()
    print(f"fp16 graph: max logit diff {np.abs(logits - expected).max():.2e}")
    assert np.abs(logits - expected).max() < 2e-2
    assert np.abs(features - expected_features).max() < 5e-2
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 5 / 6


def test_bf16_graph_computes_the_model_in_the_reference_evaluator(tiny, images, tmp_path):
    from onnx.reference import ReferenceEvaluator

    path = export_cached(tiny, "bf16", tmp_path)
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        print("onnxruntime's CPU provider now loads the bf16 graph too")
    except Exception as err:  # expected: no bf16 MatMul kernel on CPU
        print(f"onnxruntime CPU cannot run bf16 ({str(err).splitlines()[0][:100]})")
    logits, features = ReferenceEvaluator(str(path)).run(
        list(OUTPUT_NAMES), {"images": images.numpy()}
    )
    with torch.inference_mode():
        expected = tiny(images).numpy()
    print(f"bf16 graph: max logit diff {np.abs(logits - expected).max():.2e}")
    assert logits.dtype == np.float32 and features.shape == (6, 64)
    assert np.abs(logits - expected).max() < 5e-2
