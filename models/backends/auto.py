"""Which backend and precision `auto` means on this machine, by a rule written down here.

The rule (each precision only where the hardware runs it natively, never emulated):

GPU (CUDA visible, device "auto" or "cuda"):
  backend   tensorrt if its builder imports, else torch (compiled, CUDA graphs)
  precision bf16 on compute capability >= 8.0 (Ampere and later: bf16 tensor cores, fp32
            range, so no overflow in the residual stream); fp16 on 7.x (tensor cores without
            bf16); fp32 below 7.0.

CPU:
  backend   torch (oneDNN; onnxruntime's CPU provider is slower here and has no bf16 GEMM)
  precision int8 where the CPU has AMX int8 (amx_int8, Sapphire Rapids and later) and static
            int8 runs here (torchao installed, see torch_int8.py; its package is built once in
            a child process and workers load it without importing torchao). Measured
            on a 2-core AMX Xeon, B/16, one process: 1.5x the compiled bf16 predictor (its
            int8 GEMM is 2x bf16's), top-1 >= 99.7% on real images (demo model), logits
            cosine 0.9999 on B/16. Only for models big enough to compile (>= 1 GFLOP per
            image, torch_backend.COMPILE_MIN_GFLOP): smaller ones would run int8 dynamically
            quantized and eagerly, measured 0.7x bf16 eager on the demo model.
            bf16 where the CPU has a bf16 dot-product instruction: AMX (amx_bf16, Sapphire
            Rapids and later) or AVX512-BF16 (Cooper Lake, Zen 4). Measured on a 2-core AMX
            Xeon: bf16 GEMM 6x fp32. (VNNI-only int8 versus AVX512-BF16, as on Zen 4, is
            not measured, so those keep bf16.)
            int8 (dynamically quantized linears) where there is no native bf16 but AVX2 or
            VNNI integer dot products: bf16 would be emulated (6x *slower* than fp32 on an
            AVX2-only EPYC) while int8 runs 1.6x faster than fp32.
            fp32 otherwise (no AVX2: old or non-x86 CPUs without these flags).
  The flags come from /proc/cpuinfo; the software must be able to use them too: int8 needs a
  torch that dispatches to AVX2 or better (torch.backends.cpu.get_cpu_capability()), bf16 a
  oneDNN not capped below its bf16 instructions by ONEDNN_MAX_CPU_ISA, AMX int8 one not
  capped below AMX.
  fp16 is never chosen on CPU: x86 CPUs before AVX512-FP16 only convert it.

Every chosen reduced precision must keep top-1 agreement >= 99% with fp32; `mixer-label bench`
measures it (and BENCHMARKS.md records it) for each precision.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
VNNI_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


@dataclass(frozen=True)
class CpuInfo:
    """What the CPU can do natively, from /proc/cpuinfo and torch's dispatch level."""

    model_name: str
    flags: frozenset[str] = field(default_factory=frozenset)
    capability: str = "DEFAULT"  # torch.backends.cpu.get_cpu_capability(): AVX512, AVX2, ...
    cpus: int = 1  # CPUs this process may run on

    @property
    def native_bf16(self) -> bool:
        """A bf16 dot-product instruction that oneDNN is allowed to use."""
        return any(f in self.flags for f in BF16_CPU_FLAGS) and self.onednn_isa_allows_bf16

    @property
    def onednn_isa_allows_bf16(self) -> bool:
        """ONEDNN_MAX_CPU_ISA (or DNNL_) can cap oneDNN below the bf16 instructions."""
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
        cap = cap.strip().upper()
        return not cap or cap == "ALL" or "BF16" in cap or "AMX" in cap or "AVX10" in cap

    @property
    def amx_int8(self) -> bool:
        """AMX int8 tiles that oneDNN is allowed to use (static int8's fast path)."""
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
        cap = cap.strip().upper()
        allowed = not cap or cap == "ALL" or "AMX" in cap or "AVX10" in cap
        return "amx_int8" in self.flags and allowed and self.capability.upper().startswith("AVX512")

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_int8" in self.flags

    @property
    def int8_dot(self) -> bool:
        """VNNI / AMX int8 dot products, or AVX2's pmaddubsw (fbgemm's path), and a torch
        build that dispatches to AVX2 or better (the quantized kernels need it)."""
        has_isa = any(f in self.flags for f in VNNI_CPU_FLAGS) or "avx2" in self.flags
        return has_isa and self.capability.upper().startswith(("AVX2", "AVX512"))

    def describe(self) -> dict[str, object]:
        interesting = [f for f in (*BF16_CPU_FLAGS, *VNNI_CPU_FLAGS, "avx512f", "avx2")]
        return {
            "model": self.model_name,
            "cpus": self.cpus,
            "torch_capability": self.capability,
            "flags": [f for f in interesting if f in self.flags],
        }


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device: its name and compute capability."""

    name: str
    capability: tuple[int, int]
    memory_bytes: int = 0

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "capability": f"{self.capability[0]}.{self.capability[1]}",
            "memory_gib": round(self.memory_bytes / 2**30, 1),
        }


@dataclass(frozen=True)
class Choice:
    """A resolved (backend, precision, device) and the reason the rule gave."""

    backend: str
    precision: str
    device: str
    reason: str


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (cached: it does not change while the process runs)."""
    return parse_cpuinfo(_read_cpuinfo(), torch.backends.cpu.get_cpu_capability(), usable_cpus())


def parse_cpuinfo(text: str, capability: str = "DEFAULT", cpus: int = 1) -> CpuInfo:
    """A CpuInfo from the text of /proc/cpuinfo (the first processor's entry)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.processor(), platform.machine()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model or "unknown", flags, capability, cpus)


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: flags unknown, so the rule falls back to fp32
        return ""


def usable_cpus() -> int:
    """CPUs this process may use (affinity mask, e.g. a container's or Ray's), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def gpu_info(index: int = 0) -> GpuInfo | None:
    """CUDA device `index`, or None where torch sees no CUDA."""
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    props = torch.cuda.get_device_properties(index)
    return GpuInfo(props.name, (props.major, props.minor), props.total_memory)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda:0' when CUDA is visible, else 'cpu'; 'cuda' -> 'cuda:0'."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return "cuda:0"
    if device == "cpu" or device.startswith("cuda:"):
        return device
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")


def gpu_precision(gpu: GpuInfo) -> tuple[str, str]:
    """The precision the rule picks for `gpu`, and why."""
    major, minor = gpu.capability
    cc = f"compute capability {major}.{minor}"
    if major >= 8:
        return "bf16", f"{gpu.name}: {cc} has bf16 tensor cores"
    if major == 7:
        return "fp16", f"{gpu.name}: {cc} has fp16 (not bf16) tensor cores"
    return "fp32", f"{gpu.name}: {cc} has no tensor cores"


def cpu_precision(cpu: CpuInfo, static_int8: bool = False) -> tuple[str, str]:
    """The precision the rule picks for `cpu`, and why; `static_int8`: torchao is installed."""
    if cpu.amx_int8 and static_int8:
        return "int8", f"{cpu.model_name}: AMX int8 with static quantization (1.5x bf16)"
    if cpu.native_bf16:
        have = [f for f in BF16_CPU_FLAGS if f in cpu.flags]
        return "bf16", f"{cpu.model_name}: native bf16 dot products ({', '.join(have)})"
    if cpu.int8_dot:
        have = [f for f in (*VNNI_CPU_FLAGS, "avx2") if f in cpu.flags]
        return "int8", (
            f"{cpu.model_name}: no native bf16 (it would be emulated), "
            f"integer dot products ({', '.join(have)})"
        )
    return "fp32", f"{cpu.model_name}: neither native bf16 nor AVX2/VNNI int8"


def choose(
    backend: str = "auto",
    precision: str = "auto",
    device: str = "auto",
    available: tuple[str, ...] | None = None,
    cpu: CpuInfo | None = None,
    gpu: GpuInfo | None = None,
    static_int8: bool | None = None,
    gflop: float | None = None,
) -> Choice:
    """Resolve 'auto' in backend, precision and device by the rule in this module's docstring.

    `available` lists the backends that import here (default: probe); `cpu` and `gpu` default
    to this machine's, and tests pass others to check the rule for hardware not present;
    `static_int8` (default: probe) says whether static int8 runs here (torchao's quantizer
    and a C++ compiler); `gflop` per image of the model, where known (small models are not
    compiled, so they get no static int8).
    """
    from models.backends import available_backends

    device = resolve_device(device)
    if available is None:
        available = available_backends(device)
    on_gpu = device.startswith("cuda")
    if on_gpu and gpu is None:
        gpu = gpu_info(int(device.partition(":")[2] or 0))
        if gpu is None:
            raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    reasons = []
    if backend == "auto":
        if on_gpu and "tensorrt" in available:
            backend = "tensorrt"
            reasons.append("TensorRT builder present")
        else:
            backend = "torch"
            reasons.append("torch: oneDNN on CPU" if not on_gpu else "torch: no TensorRT here")
    if precision == "auto":
        if on_gpu:
            precision, why = gpu_precision(gpu)
        else:
            if static_int8 is None and backend == "torch":
                from models.backends.torch_backend import COMPILE_MIN_GFLOP, compiler_available
                from models.backends.torch_int8 import static_int8_available

                big = gflop is None or gflop >= COMPILE_MIN_GFLOP
                static_int8 = big and compiler_available() and static_int8_available()
            precision, why = cpu_precision(cpu or cpu_info(), bool(static_int8))
        if backend == "onnxruntime" and precision in ("bf16", "int8"):
            # onnxruntime has no bf16 GEMM on CPU and its CUDA provider runs fp16 best
            precision, why = ("fp16", why + "; onnxruntime: fp16") if on_gpu else ("fp32", why)
        if backend == "tensorrt" and precision == "int8":
            precision = "fp16"
        reasons.append(why)
    return Choice(backend, precision, device, "; ".join(reasons) or "as requested")
