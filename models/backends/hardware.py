"""What this machine is and has: the one place that probes hardware and installed runtimes.

Everything a backend decision depends on is read here, once per process where it cannot
change: the CPU (model, flags from /proc/cpuinfo, torch's dispatch level, usable cores, the
oneDNN ISA cap from the environment), CUDA devices (name, compute capability), a C++
compiler (Inductor needs one to compile, not to load), and the optional runtimes
(onnxruntime's providers, a TensorRT builder, torchao). The `auto` rule (auto.py) takes
these facts as plain values, so tests can pass any machine's.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
VNNI_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def onednn_isa_cap() -> str:
    """ONEDNN_MAX_CPU_ISA (or its old name DNNL_), upper-cased; "" where unset."""
    for name in ISA_CAP_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return value.upper()
    return ""


@dataclass(frozen=True)
class CpuInfo:
    """What the CPU can do natively, from /proc/cpuinfo, torch's dispatch level and oneDNN's cap."""

    model_name: str
    flags: frozenset[str] = field(default_factory=frozenset)
    capability: str = "DEFAULT"  # torch.backends.cpu.get_cpu_capability(): AVX512, AVX2, ...
    cpus: int = 1  # CPUs this process may run on
    isa_cap: str = ""  # ONEDNN_MAX_CPU_ISA as read at probe time ("" = no cap)

    @property
    def onednn_isa_allows_bf16(self) -> bool:
        """The cap leaves oneDNN its bf16 instructions."""
        cap = self.isa_cap
        return not cap or cap == "ALL" or "BF16" in cap or "AMX" in cap or "AVX10" in cap

    @property
    def native_bf16(self) -> bool:
        """A bf16 dot-product instruction that oneDNN is allowed to use."""
        return any(f in self.flags for f in BF16_CPU_FLAGS) and self.onednn_isa_allows_bf16

    @property
    def amx_int8(self) -> bool:
        """AMX int8 tiles that oneDNN is allowed to use (static int8's fast path)."""
        cap = self.isa_cap
        allowed = not cap or cap == "ALL" or "AMX" in cap or "AVX10" in cap
        return "amx_int8" in self.flags and allowed and self.capability.upper().startswith("AVX512")

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_int8" in self.flags

    @property
    def vnni(self) -> bool:
        """VNNI or AMX int8 dot products: oneDNN's int8 engine (static int8) runs natively."""
        return self.amx or "avx512_vnni" in self.flags

    @property
    def int8_dot(self) -> bool:
        """VNNI / AMX int8 dot products, or AVX2's pmaddubsw (fbgemm's path), and a torch
        build that dispatches to AVX2 or better (the quantized kernels need it)."""
        has_isa = any(f in self.flags for f in VNNI_CPU_FLAGS) or "avx2" in self.flags
        return has_isa and self.capability.upper().startswith(("AVX2", "AVX512"))

    def describe(self) -> dict[str, object]:
        interesting = [*BF16_CPU_FLAGS, *VNNI_CPU_FLAGS, "avx512f", "avx2"]
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
class Runtimes:
    """The optional software present: what can run, not what is fastest."""

    onnxruntime_providers: tuple[str, ...] = ()
    tensorrt: str | None = None  # version of a TensorRT with its builder
    torchao: str | None = None  # version (static int8's quantizer)
    compiler: bool = False  # a C++ compiler for Inductor


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (cached: it does not change while the process runs)."""
    return parse_cpuinfo(
        _read_cpuinfo(), torch.backends.cpu.get_cpu_capability(), usable_cpus(), onednn_isa_cap()
    )


def parse_cpuinfo(
    text: str, capability: str = "DEFAULT", cpus: int = 1, isa_cap: str = ""
) -> CpuInfo:
    """A CpuInfo from the text of /proc/cpuinfo (the first processor's entry)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.processor(), platform.machine()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model or "unknown", flags, capability, cpus, isa_cap)


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


def cuda_available() -> bool:
    return torch.cuda.is_available()


def compiler_available() -> bool:
    """Inductor on CPU writes C++: is there a compiler to build it?"""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def onnxruntime_providers() -> tuple[str, ...]:
    """onnxruntime's execution providers in this install (() if it does not import)."""
    try:
        import onnxruntime
    except ImportError:
        return ()
    return tuple(onnxruntime.get_available_providers())


def tensorrt_version() -> str | None:
    """The version of an importable TensorRT that has its builder; None otherwise."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    if not hasattr(trt, "Builder"):  # tensorrt_lean / tensorrt_dispatch: runtime only
        return None
    return str(trt.__version__)


def torchao_version() -> str | None:
    """The installed torchao's version, without importing it (it stays resident); None if absent."""
    try:
        if importlib.util.find_spec("torchao") is None:
            return None
        return importlib.metadata.version("torchao")
    except (ImportError, ValueError):  # hidden (sys.modules entry None) or no metadata
        return None


def runtimes(device: str = "cpu") -> Runtimes:
    """The optional runtimes present for `device` (TensorRT is only probed for CUDA)."""
    return Runtimes(
        onnxruntime_providers=onnxruntime_providers(),
        tensorrt=tensorrt_version() if device.startswith("cuda") else None,
        torchao=torchao_version(),
        compiler=compiler_available(),
    )
