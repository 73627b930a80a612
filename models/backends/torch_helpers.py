"""Torch plumbing the torch predictors share: threads, compiling, CUDA graphs, int8 engines.

Small functions with no model knowledge: torch_backend.py, torch_int8.py and the AOT build
call them, and the benchmarks reuse them so they time what the predictors run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch

from models.backends.hardware import cpu_info, usable_cpus

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: `threads`, else OMP_NUM_THREADS, else the usable CPUs.

    torch's default counts the host's cores, not this process's share (a container, a Ray
    actor's CPUs), and oversubscribed OpenMP threads wait on each other at every barrier.
    """
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        threads = min(torch.get_num_threads(), usable_cpus())
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def release_free_memory() -> None:
    """Hand memory that malloc keeps after compiling back to the OS (glibc only).

    Compiling frees a few hundred MB of transient buffers that glibc would otherwise keep in
    its heap, counted in the actor's resident memory for its whole life.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc: nothing to do
        pass


def compile_frozen(module: torch.nn.Module, example: torch.Tensor):
    """torch.compile with frozen weights, warmed up on `example`; None if compiling fails."""
    import torch._inductor.config as inductor_config

    # Default mode on CUDA too: its GEMMs are cuBLAS's either way, max-autotune adds minutes of
    # tuning per actor, and CUDA graphs are ours (CudaGraphed), not Inductor's.
    compiled = torch.compile(module, dynamic=False, fullgraph=True)
    # Freezing folds the weights into constants (oneDNN prepacks them). On the CPU it also
    # drops the originals, so the predictor holds one copy of its weights; on CUDA (torch 2.11
    # seen on an H100) the erased originals fail Dynamo's guards on the next call, and the
    # GPU has room for both copies.
    discard = example.device.type == "cpu"
    patch = inductor_config.patch(freezing=True, freezing_discard_parameters=discard)
    try:
        with patch, torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled(example)
            compiled(example)  # the second call runs what was built, not the builder
    except Exception as err:  # a missing or broken compiler toolchain, an unsupported op
        log.warning("torch.compile failed, running eagerly: %s", str(err).splitlines()[0])
        return None
    return compiled


class CudaGraphed:
    """Replays one captured CUDA graph of `fn` on a static input buffer of `example`'s shape."""

    def __init__(self, fn, example: torch.Tensor) -> None:
        self.static_input = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture: allocations, autotuning
            for _ in range(3):
                fn(self.static_input)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = fn(self.static_input)

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.static_input.copy_(batch, non_blocking=True)
        self.graph.replay()
        return self.static_output


def int8_engine() -> str:
    """The quantized engine for int8 linears: oneDNN where AMX/VNNI, else fbgemm's x86."""
    engine = "onednn" if cpu_info().vnni else "x86"
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        engine = "x86" if "x86" in supported else "fbgemm"
    return engine


def quantize_linears(module: torch.nn.Module) -> torch.nn.Module:
    """`module` (changed in place) with every Linear dynamically quantized to int8."""
    torch.backends.quantized.engine = int8_engine()  # process-wide: packing and running agree
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
        )


@contextlib.contextmanager
def quantized_engine(engine: str):
    """Temporarily select a torch quantized engine (tests and the GEMM benchmark)."""
    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = saved
