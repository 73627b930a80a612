"""PyTorch on CPU (fp32, bf16, int8) and CUDA (fp32, bf16, fp16, fp8); no autograd anywhere.

CPU:
- fp32 and bf16 run `FusedMixer` (token-major, no transposes; bf16 *weights*, not autocast;
  GELU by table) compiled by Inductor with frozen weights: oneDNN gets prepacked weights with
  bias and residual add fused into its GEMMs, and each LayerNorm (with the residual add before
  it) and each GELU becomes one vectorized pass (BENCHMARKS.md: each step measured).
  Compilation is only worth it for models of about a GFLOP per image and more; small ones
  run the same module eagerly.
  A compiled predictor runs one batch shape: larger batches are split, a short last batch
  is padded, so nothing recompiles mid-shard.
  The compile is ahead of time (aot_package.py): an AOTInductor package built once in a
  child process, cached by weights, geometry, batch and host (locally, optionally on S3),
  loaded without importing the compiler: the speed of torch.compile in this process
  (compile="jit") at a fraction of its memory.
- int8 compiled is static int8 (torch_int8.py) where torchao is installed and the CPU has
  VNNI/AMX: an AOT package too (quantized, calibrated and compiled in the child process, so
  the worker imports no torchao and never holds a quantized fp32 copy), or compiled in this
  process with compile="jit". Otherwise int8 quantizes every Linear dynamically (int8
  weights, activations quantized per batch) on the oneDNN engine where the CPU has
  AMX/VNNI, fbgemm's x86 engine elsewhere.
CUDA: the same module at fp32/bf16/fp16 with the channel MLP's GELU in cuBLASLt's GEMM
epilogue (tanh-GELU models), compiled, replayed as a CUDA graph of one batch shape (static
input buffer, padded last batch); BENCHMARKS.md has each step measured on an H100.
fp8 (compute capability 8.9 and later): `Fp8Mixer` (torch_fp8.py), e4m3 GEMMs through
`torch._scaled_mm`, compiled and graphed the same way.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from models.backends.aot_package import load_or_build
from models.backends.auto import COMPILE_MIN_GFLOP
from models.backends.base import BackendError, Predictor
from models.backends.cache import CacheStore, default_cache_dir
from models.backends.hardware import compiler_available, cpu_info
from models.backends.torch_fused import FusedMixer
from models.backends.torch_helpers import (
    DTYPES,
    CudaGraphed,
    compile_frozen,
    configure_threads,
    quantize_linears,
    release_free_memory,
)
from models.backends.torch_int8 import ENGINE, package_recipe, static_int8, static_int8_usable
from models.mixer import MlpMixer

log = logging.getLogger(__name__)
CPU_PRECISIONS = ("fp32", "bf16", "int8")
CUDA_PRECISIONS = ("fp32", "bf16", "fp16", "fp8")


class TorchPredictor(Predictor):
    """A MlpMixer on torch; see the module docstring for what runs where."""

    name = "torch"

    def __init__(
        self,
        model: MlpMixer,
        precision: str = "fp32",
        device: str = "cpu",
        batch_size: int | None = None,
        compile: bool | str | None = None,
        cuda_graphs: bool | None = None,
        threads: int | None = None,
        release_source: bool = False,
        cache_dir: str | Path | None = None,
        cache_store: CacheStore | None = None,
    ) -> None:
        """`release_source`: free `model`'s weights once converted (create() sets it when it
        loaded the model itself), so they are not resident while compiling.
        `compile`: None (by model size), False, True or "aot" (on the CPU: a cached AOTInductor
        package, see aot_package.py; elsewhere torch.compile), "jit" (torch.compile in this
        process). `cache_dir` / `cache_store`: where AOT packages are kept."""
        super().__init__(model)
        if compile not in (None, True, False, "aot", "jit"):
            raise ValueError(f"compile must be True, False, 'aot' or 'jit', not {compile!r}")
        self._release_source = release_source
        self._cache_dir, self._cache_store = cache_dir, cache_store
        self.device = device
        self.precision = precision
        on_gpu = device.startswith("cuda")
        if precision == "fp8":  # before the list below: its error says what fp8 needs
            from models.backends.torch_fp8 import check_fp8_device

            check_fp8_device(device)
        allowed = CUDA_PRECISIONS if on_gpu else CPU_PRECISIONS
        if precision not in allowed:
            where = "CUDA" if on_gpu else "CPU"
            raise BackendError(
                f"torch on {where} runs precisions {', '.join(allowed)}, not {precision!r}"
            )
        if not on_gpu:
            configure_threads(threads)
        gflop = 2 * model.config.macs_per_image() / 1e9
        if compile is None:
            compile = gflop >= COMPILE_MIN_GFLOP and (precision != "int8" or static_int8_usable())
            compile = compile and (on_gpu or compiler_available())
        self.compiled = bool(compile)
        # On the CPU compiling means an AOTInductor package: built once, loaded in a second.
        self.aot = self.compiled and not on_gpu and compile != "jit"
        if compile == "aot" and not self.aot:
            raise BackendError("compile='aot' runs on the CPU only")
        if compile == "aot" and precision == "int8" and not static_int8_usable():
            raise BackendError("compile='aot' int8 needs static int8: torchao and a VNNI/AMX CPU")
        self.aot_info = None  # set by _load_aot
        self.cuda_graphs = on_gpu and (cuda_graphs is None or cuda_graphs)
        self.preferred_batch_size = batch_size or (256 if on_gpu else 16)
        # One fixed shape when compiled or graphed: split larger batches, pad smaller ones.
        self.fixed_batch = self.compiled or self.cuda_graphs
        self.max_batch_size = self.preferred_batch_size if self.fixed_batch else None
        with torch.no_grad():
            self._forward = self._build(model, precision, device)

    def _build(self, model: MlpMixer, precision: str, device: str):
        if precision == "int8":
            return self._build_int8(model)
        if self.aot:
            return self._load_aot(model, precision)
        dtype = DTYPES.get(precision, torch.bfloat16)  # fp8: its GEMMs only, the rest bf16
        by_table = self.compiled and dtype == torch.bfloat16 and device == "cpu"
        in_gemm = device.startswith("cuda") and self.config.gelu == "tanh"
        if precision == "fp8":
            from models.backends.torch_fp8 import Fp8Mixer

            module = Fp8Mixer(model)
        else:
            module = FusedMixer(model, dtype, gelu_by_table=by_table, gelu_in_gemm=in_gemm)
        module = module.to(device).eval()
        if self._release_source:
            model.to("meta")  # the fused module holds its own converted copy
        size = self.config.image_size
        example = torch.zeros(self.preferred_batch_size, 3, size, size, device=device)
        forward = module
        if self.compiled:
            forward = compile_frozen(module, example)
            if forward is None and self._release_source:
                raise BackendError("torch.compile failed (see the log); pass compile=False")
            if forward is None:  # no working compiler: run eagerly, slower but correct
                self.compiled = False
                self.fixed_batch = self.cuda_graphs
                self.max_batch_size = self.preferred_batch_size if self.fixed_batch else None
                if precision == "fp8":  # on CUDA freezing keeps the module's own weights
                    forward = module
                else:
                    forward = FusedMixer(model, dtype, gelu_in_gemm=in_gemm).to(device).eval()
            elif device == "cpu":
                release_free_memory()
        if self.cuda_graphs:
            forward = CudaGraphed(forward, example)
        return forward

    def _build_int8(self, model: MlpMixer):
        """Static int8 (torch_int8.py) when compiling: an AOT package (built in a child
        process, so this one never imports torchao) or, with compile="jit", compiled here.
        Else, or where that fails, dynamic quantization."""
        forward = None
        if self.compiled:
            if static_int8_usable():
                bf16 = cpu_info().native_bf16
                if self.aot:
                    forward = self._load_aot_int8(model, bf16)
                else:
                    forward = static_int8(
                        model, self.preferred_batch_size, bf16, self._release_source
                    )
                # The jit path quantizes an owned model in place; a package is built from
                # weights that stay until it loads: no fallback once they are gone.
                gone = self._release_source and not self.aot
                if forward is None and (gone or model.stem.weight.is_meta):
                    raise BackendError("static int8 failed (see the log); pass compile=False")
            else:
                log.info("int8: no static int8 here (needs torchao and VNNI/AMX); dynamic")
            if forward is None:
                self.compiled = self.fixed_batch = self.aot = False
                self.max_batch_size = None
        if forward is None:
            forward = DynamicInt8(model)
            self.int8_engine, self.int8_dynamic = forward.engine, True
        else:
            self.int8_engine, self.int8_dynamic = ENGINE, False
        return forward

    def _load_aot_int8(self, model: MlpMixer, bf16: bool):
        """The static int8 package of `model`; None (and a log line) where it cannot be built."""
        try:
            return self._load_aot(model, "int8", package_recipe(bf16))
        except BackendError as err:  # torchao broken for this torch, an export or compile limit
            log.warning("static int8 AOT package failed: %s", err)
            return None

    def _load_aot(self, model: MlpMixer, precision: str, recipe: dict[str, object] | None = None):
        folder = Path(self._cache_dir) if self._cache_dir else default_cache_dir()
        size = self.preferred_batch_size
        forward, self.aot_info = load_or_build(
            model,
            self.sha256,
            precision,
            size,
            folder / "aoti",
            self._cache_store,
            self._release_source,
            torch.get_num_threads(),
            recipe,
        )
        release_free_memory()
        return forward

    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(batch)
        if self.fixed_batch and n < self.preferred_batch_size:
            pad = batch.new_zeros(self.preferred_batch_size - n, *batch.shape[1:])
            batch = torch.cat([batch, pad])
        elif self.compiled and not self.aot and batch.is_inference():
            # The compiled graph was built for ordinary tensors; an inference-mode tensor has
            # other dispatch keys and would force a recompile (impossible: weights are frozen).
            batch = batch.clone()
        with torch.inference_mode():
            if self.device != "cpu" and not isinstance(self._forward, CudaGraphed):
                batch = batch.to(self.device, non_blocking=True)
            logits, features = self._forward(batch)
            return logits[:n].float().cpu(), features[:n].float().cpu()


class DynamicInt8(nn.Module):
    """A copy of `model` with every Linear dynamically quantized to int8, returning features."""

    def __init__(self, model: MlpMixer) -> None:
        super().__init__()
        self.quantized = quantize_linears(copy.deepcopy(model).float().eval())
        self.engine = f"dynamic-{torch.backends.quantized.engine}"

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.quantized.forward_features(batch)
        return self.quantized.head(features), features
