"""The fp8 ONNX graph for TensorRT: e4m3 Q/DQ around every block GEMM, the precision in the graph.

TensorRT 10+ builds strongly typed networks, and its fp8 is explicit quantization: a
`DequantizeLinear` whose input is float8e4m3fn feeding a GEMM tells it to run that GEMM in
fp8 (it fuses the pair into the kernel). So the fp32 graph of `onnx_graph.export_module`
(LayerNorm in fp32) gets, for each of the four GEMMs of every block:
- the weight stored as float8e4m3fn with one fp32 scale per output channel (axis 0 of the
  (out, in) weight), quantized by `torch_fp8.quantize`, the code the torch backend uses, and
  a `DequantizeLinear` in front of the GEMM;
- the activation through `QuantizeLinear` -> `DequantizeLinear` with one static scale per
  tensor: TensorRT takes Q/DQ scales as build-time constants, so the per-row dynamic scales
  of the torch path are not expressible; each scale is the activation's amax over the
  calibration images (`torch_int8.calibration_images`, real ones where given) / 448.
The stem, the head and everything between the GEMMs stay fp32: that is the graph onnxruntime
can run and so check here; a bf16 base would halve the bytes of TensorRT's non-GEMM passes,
but nothing here could run it (no TensorRT, no bf16 GEMM in onnxruntime's CPU provider).
Opset 19 (the first with float8 Q/DQ). onnxruntime's CPU provider runs these Q/DQ nodes
exactly (a cast to e4m3 and back), so the graph's numerics are checked on the CPU
(tests/models/test_onnx_fp8.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from models.backends.torch_fp8 import E4M3_MAX, MIN_AMAX, quantize

OPSET = 19
BLOCK_WEIGHT = re.compile(r"^blocks\.\d+\.(token|channel)_fc[12]_weight$")


def block_gemms(graph) -> list:
    """The Gemm nodes whose weight is a block's (stem and head excluded), in graph order."""
    return [n for n in graph.node if _is_block_gemm(n)]


def _is_block_gemm(node) -> bool:
    return node.op_type in ("Gemm", "MatMul") and any(BLOCK_WEIGHT.match(i) for i in node.input)


def activation_amax(path: str | Path, images: torch.Tensor) -> dict[str, float]:
    """Max |x| of each block GEMM's activation input over `images`, by onnxruntime on `path`."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    names = [_activation_input(n) for n in block_gemms(model.graph)]
    for name in names:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    amax = dict.fromkeys(names, 0.0)
    for start in range(0, len(images), 32):
        batch = images[start : start + 32].numpy().astype(np.float32)
        values = session.run(names, {session.get_inputs()[0].name: batch})
        for name, value in zip(names, values, strict=True):
            amax[name] = max(amax[name], float(np.abs(value).max()))
    return amax


def insert_qdq(path: str | Path, out: str | Path, amax: dict[str, float]) -> Path:
    """Write `path`'s fp32 graph with fp8 Q/DQ on every block GEMM (see module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter

    model = version_converter.convert_version(onnx.load(str(path)), OPSET)
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    added, nodes = [], []
    for node in graph.node:
        if not _is_block_gemm(node):
            nodes.append(node)
            continue
        activation = _activation_input(node)
        weight_name = next(i for i in node.input if BLOCK_WEIGHT.match(i))
        weight = torch.from_numpy(numpy_helper.to_array(weights[weight_name]).copy())
        q, scale = quantize(weight, "row")  # (out, in): one scale per output channel
        stem = weight_name.replace(".", "_")
        added += [
            _fp8_initializer(f"{stem}_fp8", q),
            numpy_helper.from_array(scale.view(-1).numpy(), f"{stem}_scale"),
            helper.make_tensor(
                f"{stem}_zero", TensorProto.FLOAT8E4M3FN, [len(scale)], [0] * len(scale)
            ),
            numpy_helper.from_array(
                np.array(max(amax[activation], MIN_AMAX) / E4M3_MAX, np.float32), f"{stem}_x_scale"
            ),
            helper.make_tensor(f"{stem}_x_zero", TensorProto.FLOAT8E4M3FN, [], [0]),
        ]
        nodes += [
            helper.make_node(
                "DequantizeLinear",
                [f"{stem}_fp8", f"{stem}_scale", f"{stem}_zero"],
                [f"{stem}_dq"],
                name=f"{stem}_dq",
                axis=0,
            ),
            helper.make_node(
                "QuantizeLinear",
                [activation, f"{stem}_x_scale", f"{stem}_x_zero"],
                [f"{stem}_x_q"],
                name=f"{stem}_x_q",
                saturate=1,
            ),
            helper.make_node(
                "DequantizeLinear",
                [f"{stem}_x_q", f"{stem}_x_scale", f"{stem}_x_zero"],
                [f"{stem}_x_dq"],
                name=f"{stem}_x_dq",
            ),
        ]
        inputs = [
            f"{stem}_dq" if i == weight_name else f"{stem}_x_dq" if i == activation else i
            for i in node.input
        ]
        gemm = helper.make_node(node.op_type, inputs, list(node.output), name=node.name)
        gemm.attribute.extend(node.attribute)
        nodes.append(gemm)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]  # the fp32 block weights go
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out)
    return out


def _activation_input(node) -> str:
    """The GEMM input that is not a block weight nor a bias (Gemm's third input)."""
    return next(i for i in node.input[:2] if not BLOCK_WEIGHT.match(i))


def _fp8_initializer(name: str, q: torch.Tensor):
    from onnx import TensorProto, helper

    raw = q.contiguous().view(torch.uint8).numpy().tobytes()  # e4m3fn bits, as ONNX stores them
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(q.shape), raw, raw=True)
