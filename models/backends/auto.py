"""Which backend and precision `auto` means, as a pure rule over the facts of hardware.py.

The rule (each precision only where the hardware runs it natively, never emulated):

GPU (CUDA visible, device "auto" or "cuda"):
  backend   tensorrt if its builder imports, else torch (compiled, CUDA graphs)
  precision bf16 on compute capability >= 8.0 (Ampere and later: bf16 tensor cores, fp32
            range, so no overflow in the residual stream); fp16 on 7.x (tensor cores without
            bf16); fp32 below 7.0.

CPU:
  backend   torch (oneDNN; onnxruntime's CPU provider is slower here and has no bf16 GEMM)
  precision int8 where the CPU has AMX int8 (amx_int8, Sapphire Rapids and later) and static
            int8 runs here (torchao installed, a compiler, and a model big enough to compile,
            COMPILE_MIN_GFLOP; see torch_int8.py): its int8 GEMM is twice bf16's there.
            bf16 where the CPU has a bf16 dot-product instruction: AMX (amx_bf16) or
            AVX512-BF16 (Cooper Lake, Zen 4).
            int8 (dynamically quantized linears) where there is no native bf16 but AVX2 or
            VNNI integer dot products: bf16 would be emulated there, slower than fp32.
            fp32 otherwise (no AVX2: old or non-x86 CPUs without these flags).
  The software must be able to use the flags too: int8 needs a torch that dispatches to AVX2
  or better, bf16 a oneDNN not capped below its bf16 instructions by ONEDNN_MAX_CPU_ISA, AMX
  int8 one not capped below AMX.
  fp16 is never chosen on CPU: x86 CPUs before AVX512-FP16 only convert it.

Every chosen reduced precision must keep top-1 agreement >= 99% with fp32; `mixer-label bench`
measures it, and BENCHMARKS.md records what each rule choice measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.backends.hardware import (
    BF16_CPU_FLAGS,
    VNNI_CPU_FLAGS,
    CpuInfo,
    GpuInfo,
    Runtimes,
    cpu_info,
    cuda_available,
    gpu_info,
    runtimes,
)

COMPILE_MIN_GFLOP = 1.0  # below this per image, compiling costs more than it saves
# The reduced precisions auto measures on CUDA, each from the compute capability whose tensor
# cores run it natively (fp8: Ada / Hopper and later). A new precision joins here; each
# backend's own precision list (`runs` in candidates) decides where it is offered.
CUDA_CANDIDATES: tuple[tuple[tuple[int, int], str], ...] = (
    ((7, 0), "fp16"),
    ((8, 0), "bf16"),
    ((8, 9), "fp8"),
)


@dataclass(frozen=True)
class Choice:
    """A resolved (backend, precision, device) and the reason the rule gave."""

    backend: str
    precision: str
    device: str
    reason: str


def resolve_device(device: str, cuda: bool | None = None) -> str:
    """'auto' -> 'cuda:0' when CUDA is visible, else 'cpu'; 'cuda' -> 'cuda:0'."""
    if device == "auto":
        visible = cuda_available() if cuda is None else cuda
        return "cuda:0" if visible else "cpu"
    if device == "cuda":
        return "cuda:0"
    if device == "cpu" or device.startswith("cuda:"):
        return device
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")


def backends_present(device: str, runtimes: Runtimes) -> tuple[str, ...]:
    """The backends that can run on `device` given the runtimes present, in preference order."""
    on_gpu = device.startswith("cuda")
    found = ["torch"]
    wanted = "CUDAExecutionProvider" if on_gpu else "CPUExecutionProvider"
    if wanted in runtimes.onnxruntime_providers:
        found.append("onnxruntime")
    if on_gpu and runtimes.tensorrt:
        found.append("tensorrt")
    return tuple(found)


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
    """The precision the rule picks for `cpu`, and why; `static_int8`: it runs here."""
    if cpu.amx_int8 and static_int8:
        return "int8", f"{cpu.model_name}: AMX int8 with static quantization"
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


def static_int8_runs(cpu: CpuInfo, runtimes: Runtimes, gflop: float | None) -> bool:
    """Static int8 (torch_int8.py) runs here: oneDNN's int8 engine, torchao, a compiler,
    and a model big enough to be compiled at all (`gflop` per image; None: assume so).

    Without VNNI/AMX oneDNN's u8s8 GEMM goes through AVX2's pmaddubsw, whose int16 pair sums
    saturate: faster than dynamic int8 but off fp32 by far more than auto's cosine check
    allows (BENCHMARKS.md, Zen 3), so it is not worth building there as a candidate.
    """
    big = gflop is None or gflop >= COMPILE_MIN_GFLOP
    return big and cpu.vnni and runtimes.torchao is not None and runtimes.compiler


def rule(
    backend: str,
    precision: str,
    device: str,
    available: tuple[str, ...],
    cpu: CpuInfo,
    gpu: GpuInfo | None,
    static_int8: bool,
) -> Choice:
    """The rule of this module's docstring on given facts; `device` already resolved."""
    on_gpu = device.startswith("cuda")
    if on_gpu and gpu is None:
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
            precision, why = cpu_precision(cpu, static_int8 and backend == "torch")
        if backend == "onnxruntime" and precision in ("bf16", "int8"):
            # onnxruntime has no bf16 GEMM on CPU and its CUDA provider runs fp16 best
            precision, why = ("fp16", why + "; onnxruntime: fp16") if on_gpu else ("fp32", why)
        if backend == "tensorrt" and precision == "int8":
            precision = "fp16"
        reasons.append(why)
    return Choice(backend, precision, device, "; ".join(reasons) or "as requested")


def candidates(
    device: str,
    available: tuple[str, ...],
    cpu: CpuInfo,
    gpu: GpuInfo | None,
    static_int8: bool,
    runs: dict[str, tuple[str, ...]] | None = None,
) -> list[Choice]:
    """What measured auto tries here, fp32 first (the reference): the precisions the hardware
    runs natively, on the backends present; `runs` (backend -> precisions it offers) drops
    what no backend implements (fp8 before issue 20's backend lands)."""
    on_gpu = device.startswith("cuda")
    found = [Choice("torch", "fp32", device, "the reference")]
    if on_gpu:
        if gpu is None:
            raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
        native = [p for cc, p in CUDA_CANDIDATES if gpu.capability >= cc]
        for backend in ("torch", "tensorrt"):
            if backend in available:
                found += [Choice(backend, p, device, f"{gpu.name}: native {p}") for p in native]
    else:
        # bf16 only with a bf16 dot product (else emulated, slower than fp32); int8 with
        # integer dot products (dynamic) or oneDNN's static path.
        if cpu.native_bf16:
            found.append(Choice("torch", "bf16", device, f"{cpu.model_name}: native bf16"))
        if cpu.int8_dot or static_int8:
            found.append(Choice("torch", "int8", device, f"{cpu.model_name}: int8 dot products"))
    if runs is not None:
        found = [c for c in found if c.precision in runs.get(c.backend, ())]
    return found


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
    """Resolve 'auto' in backend, precision and device by the rule, on this machine's facts.

    Every fact defaults to this machine's (hardware.py); tests pass others to check the rule
    for hardware not present. `available`: the backends that import; `static_int8`: whether
    static int8 runs here; `gflop` per image of the model, where known (small models are
    not compiled, so they get no static int8).
    """
    device = resolve_device(device)
    cpu = cpu or cpu_info()
    if available is None or static_int8 is None:
        present = runtimes(device)
        if available is None:
            available = backends_present(device, present)
        if static_int8 is None:
            static_int8 = static_int8_runs(cpu, present, gflop)
    if device.startswith("cuda") and gpu is None:
        gpu = gpu_info(int(device.partition(":")[2] or 0))
    return rule(backend, precision, device, available, cpu, gpu, static_int8)
