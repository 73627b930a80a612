"""Static int8 on CPU: PT2E quantization lowered by Inductor to oneDNN's AMX/VNNI int8 GEMMs.

torchao's `X86InductorQuantizer` (the PT2E flow that left torch.ao for torchao) quantizes
every Linear and the stem convolution: weights int8 per output channel, activations uint8 per
tensor with scales fixed by calibration. Inductor (with freezing) then lowers the graph to
oneDNN `qlinear_pointwise` calls with prepacked weights and fuses everything around them:

- each LayerNorm (with the residual add before it) and the uint8 quantization of its output,
  transpose included, is one pass;
- fc1's GELU runs in the GEMM's epilogue and writes uint8 for fc2; fc2 writes bf16 and adds
  the residual in its epilogue.
The rest runs in bf16 where the CPU has it ("int8 mixed bf16"), in fp32 elsewhere.

Where it runs: by default an AOTInductor package (aot_package.py). The build's child process
imports torchao, quantizes, calibrates, exports and compiles (`package_module`); the worker
only loads the package with torch's C++ runner: no torchao, no Inductor, no fp32 weights
kept. Its cache key adds `package_recipe` (recipe version, torchao's version, mixed bf16,
this file's and mixer.py's sources). Its outputs are those of the jit path (compile="jit",
quantized and compiled in this process), which keeps torchao, Inductor and a quantized copy
resident. The package's constants must be realigned (aot_runtime.AotModel): oneDNN's int8
GEMMs run slower on the runner's misaligned buffer. BENCHMARKS.md has the measured speed,
memory and start-up of both paths.

Two choices worth knowing:
- GELU: a tanh-GELU model is quantized with the erf GELU: oneDNN's erf epilogue is faster
  than its tanh one, and the two differ by far less than the uint8 step of fc1's output.
- Calibration needs no data: `calibration_images` are synthetic (smooth noise and sharp
  blobs) whose per-tensor ranges the histogram observers turn into scales. Top-1 on real
  images did not depend on the choice; the worst-case logits cosine did (BENCHMARKS.md).

Without torchao, or where compiling fails, `create(..., precision="int8")` falls back to
dynamically quantized Linears (torch_backend.DynamicInt8), with a log line saying why
(a package's build fails before the fp32 weights are released, so it can always fall back).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from models.backends.calibration import CALIBRATION_IMAGES, calibration_images
from models.backends.hardware import cpu_info, torchao_version
from models.backends.torch_helpers import compile_frozen, release_free_memory
from models.mixer import MlpMixer

log = logging.getLogger(__name__)
ENGINE = "pt2e-x86-inductor"  # the name `Predictor.int8_engine` reports for this path
# Bump when what package_module builds changes in a way its sources do not show (calibration
# images, quantizer settings are in this file and hashed too; this names the recipe).
RECIPE_VERSION = 1


def static_int8_available(load: bool = False) -> bool:
    """torchao (its PT2E quantizer; torch.ao's copy was removed in torch 2.10) is installed.

    Without `load` only its presence is checked: importing it costs a worker hundreds of MB
    for the life of the process, and a worker loading a cached int8 package never needs it. Where it
    is present but broken, building the package (or quantize_static) fails and says so.
    """
    if torchao_version() is None:
        return False
    if not load:
        return True
    try:
        import_quantizer()
    except Exception:  # missing, or built for another torch (ImportError, OSError, ...)
        return False
    return True


def import_quantizer() -> None:
    """Import torchao's PT2E quantizer without its start-up noise.

    torchao warns at import about its CUDA-only kernels (`_C_mxfp8...so`) on a CPU build of
    torch, and newer torch about how torchao registers an enum with the compiler; static int8
    uses neither, so a user should not read them as failures.
    """
    noisy = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    finally:
        for logger, level in zip(noisy, levels, strict=True):
            logger.setLevel(level)


def static_int8_usable() -> bool:
    """Static int8 runs here: torchao is installed and oneDNN has VNNI or AMX int8."""
    return cpu_info().vnni and static_int8_available()


class _LogitsAndFeatures(nn.Module):
    """The model as the predictor calls it: (logits, pooled features)."""

    def __init__(self, model: MlpMixer) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(images)
        return self.model.head(features), features


class _Autocast(nn.Module):
    """Runs `module` under CPU autocast to bf16 (int8 GEMMs then write bf16, not fp32)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.module(images)


def erf_gelu(model: nn.Module) -> nn.Module:
    """`model` (changed in place) with every tanh GELU replaced by the erf GELU."""
    for module in model.modules():
        if isinstance(module, nn.GELU):
            module.approximate = "none"
    return model


def quantize_static(
    model: MlpMixer, batch_size: int, calibration: torch.Tensor | None = None
) -> torch.fx.GraphModule:
    """`model` quantized by PT2E (int8 weights, uint8 activations), calibrated, not compiled.

    `model` itself is changed (GELU form) and its fp32 weights stay referenced only by it.
    """
    import_quantizer()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    config = model.config
    if calibration is None:
        calibration = calibration_images(config)
    size = config.image_size
    example = torch.zeros(batch_size, 3, size, size)
    quantizer = xiq.X86InductorQuantizer()
    # Static, per-channel weights, full uint8 range: VNNI/AMX need no reduce_range.
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = _LogitsAndFeatures(erf_gelu(model.float().eval()))
        # Not strict: strict export resets Dynamo, and compiled predictors whose frozen
        # weights were discarded in this process could not recompile.
        graph = torch.export.export(wrapped, (example,), strict=False).module()
        prepared = prepare_pt2e(graph, quantizer)
        for start in range(0, len(calibration), batch_size):
            part = calibration[start : start + batch_size]
            if len(part) < batch_size:  # the exported graph has one batch size
                part = torch.cat([part, part.new_zeros(batch_size - len(part), *part.shape[1:])])
            prepared(part)
        converted = drop_unused_parameters(convert_pt2e(prepared))
    del prepared, graph
    forget_quantized_modules()
    return converted


def forget_quantized_modules() -> None:
    """Clear the unbounded caches keyed by module in which PT2E keeps every module it saw.

    `assert_and_get_unique_device` (torchao and torch.ao copies) is an lru_cache without a
    size limit: it would hold the exported and the prepared graphs, and with them the fp32
    weights, for the life of the process.
    """
    import importlib

    for name in ("torchao.utils", "torch.ao.quantization.fx.utils"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for function in ("_assert_and_get_unique_device", "assert_and_get_unique_device"):
            cached = getattr(module, function, None)
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()


def drop_unused_parameters(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`graph` without the parameters no node reads (changed in place).

    convert_pt2e leaves every fp32 weight attached beside its int8 copy; dropping them lets
    the fp32 weights go (1x the model's size) once the source model is released.
    """
    read = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in list(graph.named_parameters()):
        if name not in read:
            owner, _, attribute = name.rpartition(".")
            del graph.get_submodule(owner)._parameters[attribute]
    return graph


def package_recipe(bf16: bool) -> dict[str, object]:
    """What decides an int8 AOT package besides weights and host: part of its cache key."""
    import hashlib
    from pathlib import Path

    from models import mixer

    sources = hashlib.sha256()
    for path in (__file__, mixer.__file__):  # the recipe here, the graph traced from there
        sources.update(Path(path).read_bytes())
    return {
        "kind": "static-int8",
        "version": RECIPE_VERSION,
        "calibration_images": CALIBRATION_IMAGES,
        "torchao": torchao_version(),
        "mixed_bf16": bool(bf16),
        "sources": sources.hexdigest(),
    }


def package_module(model: MlpMixer, batch_size: int, recipe: dict[str, object]) -> nn.Module:
    """The module an int8 AOT package compiles (in the build's child process): quantized,
    calibrated, under bf16 autocast where `recipe` says so; `model`'s fp32 weights are freed."""
    quantized = quantize_static(model, batch_size)
    model.to("meta")
    return _Autocast(quantized) if recipe.get("mixed_bf16") else quantized


def static_int8(
    model: MlpMixer,
    batch_size: int,
    bf16: bool,
    release_source: bool = False,
    calibration: torch.Tensor | None = None,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """A compiled static-int8 forward of `model` for batches of exactly `batch_size`.

    `bf16`: run the non-GEMM ops in bf16 (CPUs with native bf16). `release_source`: `model`
    belongs to the caller's predictor alone, so it is quantized in place and its fp32 weights
    are freed once converted. None (and a log line) where quantizing or compiling fails.
    """
    source = model if release_source else copy.deepcopy(model)
    try:
        quantized = quantize_static(source, batch_size, calibration)
    except Exception as err:  # an export or quantizer limit in this torch/torchao pair
        log.warning("static int8 quantization failed: %s", str(err).splitlines()[0])
        return None
    source.to("meta")  # the quantized graph holds its own int8 weights
    del source
    size = model.config.image_size
    example = torch.zeros(batch_size, 3, size, size)
    forward = compile_frozen(_Autocast(quantized) if bf16 else quantized, example)
    release_free_memory()
    return forward
