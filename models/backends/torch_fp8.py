"""fp8 (e4m3) GEMMs for CUDA devices of compute capability 8.9 and later, simulated on the CPU.

The recipe, one GEMM at a time (`Fp8Linear`):
- weights in `torch.float8_e4m3fn`, one scale per output channel (amax / 448), quantized once;
- activations quantized when they are made, one scale per row of the GEMM's left operand
  (`scaling="row"`; `"tensor"`: one scale for the whole matrix, spread over the rows, since
  `torch._scaled_mm` takes either both scales as scalars or both as vectors);
- the product accumulated in fp32, both scales and the bias applied in the epilogue, the
  result rounded once to bf16 (`torch._scaled_mm(..., out_dtype=torch.bfloat16)`). That
  epilogue takes scales and a bias, no activation, so the GELU is fused (compiled) into the
  pass that quantizes the next GEMM's input, which reads the GEMM's output anyway.
Everything else stays in bf16 as in `FusedMixer`: the stem (its input is the raw image, and it
is 1% of the FLOPs), every LayerNorm, the residual stream, the GELU, the pooling (fp32) and
the head.

`torch._scaled_mm` wants its left operand row-major and its right one column-major (both
contiguous along K), K and N multiples of 16, fp32 scales shaped (M, 1) and (1, N), and a bf16
bias for a bf16 output. The token MLP therefore runs transposed, `Y^T (B*C, S) @ W1^T`, on a
copy of the normalized activations that the quantizing pass writes anyway, and S = 196 (B/16)
is zero-padded to 208.

On the CPU (`simulate=True`, or any non-CUDA tensor) the same module runs the same scales and
the same casts; only the GEMM is `fp8 -> fp32` matmuls with the scales and bias applied after,
then one rounding to bf16: that is the arithmetic of the CUDA epilogue, up to the order of the
fp32 sums. The tests hold that simulation to the issue's agreement bars.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.backends.base import BackendError
from models.backends.torch_fused import FusedMixer
from models.mixer import MlpMixer

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90): fp8 tensor cores
SCALINGS = ("row", "tensor")
ALIGN = 16  # torch._scaled_mm: K and N multiples of 16
# A row of zeros has amax 0; its scale must stay finite (its values quantize to 0 either way).
MIN_AMAX = 1e-12


def check_fp8_device(device: str) -> None:
    """Raise BackendError (one line) unless `device` is a CUDA device with fp8 tensor cores."""
    capability = name = None
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.partition(":")[2] or 0)
        if index < torch.cuda.device_count():
            capability = torch.cuda.get_device_capability(index)
            name = torch.cuda.get_device_name(index)
    refusal = fp8_refusal(device, capability, name)
    if refusal:
        raise BackendError(refusal)


def fp8_refusal(device: str, capability: tuple[int, int] | None, name: str | None) -> str | None:
    """Why `device` (of that compute capability and name, None: not seen) cannot run fp8."""
    need = "a CUDA device of compute capability 8.9 or later (Ada, Hopper and newer)"
    if not device.startswith("cuda"):
        return f"precision 'fp8' needs {need}; device {device!r} is not one"
    if capability is None:
        return f"precision 'fp8' needs {need}; torch sees no CUDA device {device!r} here"
    if tuple(capability) < MIN_CAPABILITY:
        major, minor = capability
        has = f"compute capability {major}.{minor}"
        return f"precision 'fp8' needs {need}; {device} ({name}) has {has}"
    return None


def quantize(x: torch.Tensor, scaling: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (M, K) as e4m3 values `q` and fp32 scales (M, 1) with `x ~= q * scale`.

    "row": each row's amax maps to 448; "tensor": the whole matrix's does (the same scale
    repeated on every row). The CUDA path and the CPU simulation both quantize here.
    """
    magnitude = x.abs().float()
    if scaling == "row":
        amax = magnitude.amax(dim=1, keepdim=True)
    elif scaling == "tensor":
        amax = magnitude.amax().expand(x.shape[0], 1)
    else:
        raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, not {scaling!r}")
    scale = (amax.clamp(min=MIN_AMAX) / E4M3_MAX).contiguous()
    # Clamped: x / scale can land a rounding step above 448, and e4m3fn has no inf (it is NaN).
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Fp8Linear(nn.Module):
    """`x @ W^T + b` with W in e4m3 (per output channel) and x quantized per row; bf16 out."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        scaling: str = "row",
        simulate: bool = False,
        fast_accum: bool = False,
    ) -> None:
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, not {scaling!r}")
        self.out_features, self.in_features = weight.shape
        n, k = padded(self.out_features), padded(self.in_features)
        # Zero rows and columns pad N and K to the GEMM's alignment; they add nothing.
        w = F.pad(weight.detach().float(), (0, k - self.in_features, 0, n - self.out_features))
        q, scale = quantize(w, "row")  # per output channel: the rows of W (N, K)
        self.register_buffer("weight", q)  # (N, K) row-major: W^T is column-major, as wanted
        self.register_buffer("weight_scale", scale.view(1, n).contiguous())
        b = F.pad(bias.detach().float(), (0, n - self.out_features))
        self.register_buffer("bias", b.to(torch.bfloat16))
        self.scaling = scaling
        self.simulate = simulate
        self.fast_accum = fast_accum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.weight.shape[1]:
            x = F.pad(x, (0, self.weight.shape[1] - x.shape[1]))
        q, scale = quantize(x, self.scaling)
        out = scaled_mm(
            q, self.weight.t(), scale, self.weight_scale, self.bias, self.simulate, self.fast_accum
        )
        return out if out.shape[1] == self.out_features else out[:, : self.out_features]


def scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor,
    simulate: bool = False,
    fast_accum: bool = False,
) -> torch.Tensor:
    """`(a * scale_a) @ (b * scale_b) + bias` in bf16: `torch._scaled_mm`, or its simulation."""
    if simulate or a.device.type != "cuda":
        out = torch.mm(a.float(), b.float()) * scale_a * scale_b + bias.float()
        return out.to(torch.bfloat16)
    return torch._scaled_mm(
        a.contiguous(),
        b,
        scale_a,
        scale_b,
        bias=bias,
        out_dtype=torch.bfloat16,
        use_fast_accum=fast_accum,
    )


class Fp8Mixer(FusedMixer):
    """`FusedMixer` in bf16 with its four GEMMs per block in fp8; same outputs, same layout."""

    def __init__(
        self,
        model: MlpMixer,
        scaling: str = "row",
        simulate: bool = False,
        fast_accum: bool = False,
    ) -> None:
        super().__init__(model, torch.bfloat16)
        options = dict(scaling=scaling, simulate=simulate, fast_accum=fast_accum)
        self.scaling = scaling
        for fused, block in zip(self.blocks, model.blocks, strict=True):
            for name in ("token_fc1", "token_fc2", "channel_fc1", "channel_fc2"):
                delattr(fused, f"{name}_weight")  # the bf16 copies: the fp8 ones replace them
                delattr(fused, f"{name}_bias")
            token, channel = block.token_mixing, block.channel_mixing
            fused.token_fc1 = Fp8Linear(token.fc1.weight, token.fc1.bias, **options)
            fused.token_fc2 = Fp8Linear(token.fc2.weight, token.fc2.bias, **options)
            fused.channel_fc1 = Fp8Linear(channel.fc1.weight, channel.fc1.bias, **options)
            fused.channel_fc2 = Fp8Linear(channel.fc2.weight, channel.fc2.bias, **options)

    def token_mixing(self, b: nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`x + (W2 @ gelu(W1 @ y + b1) + b2)` over `(S, B*C)`, computed transposed."""
        h = self.gelu(b.token_fc1(y.t()))  # (B*C, D_S): rows are what the GEMM contracts
        return x + b.token_fc2(h).t()

    def channel_mixing(self, b: nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + b.channel_fc2(self.gelu(b.channel_fc1(y)))
