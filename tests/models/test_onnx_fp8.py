"""The fp8 ONNX graph for TensorRT (onnx_fp8.py): its structure, and its numerics run by
onnxruntime on the CPU, whose Q/DQ nodes cast to e4m3 and back exactly as TensorRT's do."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from bench.measure import agreement
from models.backends.onnx_fp8 import OPSET
from models.backends.onnx_graph import export_fp8

TOP1, COSINE = 0.99, 0.99


@pytest.fixture(scope="module")
def tiny_graph(tiny, tmp_path_factory):
    path = export_fp8(tiny, tmp_path_factory.mktemp("fp8-onnx") / "tiny-fp8.onnx")
    return onnx.load(str(path)), path


def test_every_block_gemm_reads_dequantized_e4m3_and_nothing_else_does(tiny, tiny_graph):
    model, _ = tiny_graph
    onnx.checker.check_model(model, full_check=True)
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
    graph = model.graph
    made_by = {out: n for n in graph.node for out in n.output}
    initializers = {i.name: i for i in graph.initializer}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    quantized = [n for n in gemms if made_by.get(n.input[0], n).op_type == "DequantizeLinear"]
    assert len(gemms) == 4 * tiny.config.num_blocks + 2  # + the stem and the head
    assert len(quantized) == 4 * tiny.config.num_blocks
    assert gemms[0] not in quantized and gemms[-1] not in quantized  # stem and head: fp32
    for gemm in quantized:
        dq = [made_by[i] for i in gemm.input[:2]]
        assert [d.op_type for d in dq] == ["DequantizeLinear"] * 2
        weight = next(d for d in dq if d.input[0] in initializers)
        activation = next(d for d in dq if d.input[0] not in initializers)
        stored = initializers[weight.input[0]]
        scale = numpy_helper.to_array(initializers[weight.input[1]])
        assert stored.data_type == TensorProto.FLOAT8E4M3FN
        assert scale.shape == (stored.dims[0],) and (scale > 0).all()  # per output channel
        assert onnx.helper.get_attribute_value(weight.attribute[0]) == 0  # axis 0
        assert made_by[activation.input[0]].op_type == "QuantizeLinear"
        assert numpy_helper.to_array(initializers[activation.input[1]]).shape == ()
    names = {i.name for i in graph.initializer}
    assert not any(n.endswith(("fc1_weight", "fc2_weight")) for n in names)  # no fp32 copies


def test_the_graph_agrees_with_fp32_on_the_demo_models_real_test_images(tmp_path):
    import onnxruntime as ort

    from tests.models.demo_model import trained_demo

    model, images, reference = trained_demo()
    path = export_fp8(model, tmp_path / "demo-fp8.onnx")  # synthetic calibration images
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate(
        [
            session.run(["logits"], {"images": images[i : i + 64].numpy()})[0]
            for i in range(0, len(images), 64)
        ]
    )
    numbers = agreement(reference, torch.from_numpy(logits))
    print(f"fp8 Q/DQ graph (static per-tensor activation scales), {len(images)} digits: {numbers}")
    assert numbers["top1_agreement"] >= TOP1 and numbers["min_cosine"] >= COSINE
