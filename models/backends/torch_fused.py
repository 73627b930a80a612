"""The Mixer rewritten for inference speed: token-major layout, no transposes, GELU by table.

The same arithmetic as `models.mixer.MlpMixer` (tests hold them equal in fp32), arranged for
the hardware:

- Activations live token-major, `(tokens * batch, channels)`. Channel mixing is then one GEMM
  over all rows, and token mixing is one GEMM with the weight on the left,
  `W (D_S, S) @ Y (S, batch * C)`, so neither sub-block needs a transpose (in the paper's
  layout each block transposes twice, and those copies cost more than the token GEMMs).
- The stem is a GEMM over flattened patches (kernel = stride = patch size), no convolution.
- With `gelu_by_table` (bf16, compiled) the GELU is a 65,536-entry table indexed by the
  input's bits: exactly the model's GELU (tanh or erf) rounded to bf16, but one gather
  instead of a tanh per element. On CPU the tanh form otherwise costs about as much as the
  GEMM that feeds it. Eagerly, the table's index arithmetic takes several passes, so eager
  runs call F.gelu.
- With `gelu_in_gemm` (CUDA, tanh GELU) the channel MLP's first GEMM applies its bias and
  GELU in cuBLASLt's epilogue (`torch._addmm_activation`, tanh form on CUDA), so its output,
  the widest activation, is written once instead of written, read and written again by a
  separate GELU kernel; the second GEMM takes the residual as its accumulator. (On the CPU
  that op computes the erf form.)
- `token_gelu_in_gemm` (CUDA, tanh GELU; measured only as a bench/gpu_variants.py variant so
  far) does the same for the token MLP: its first GEMM is computed transposed,
  `Y^T (B*C, S) @ W^T (S, D_S)`, so the bias runs along columns as the epilogue wants, and the
  second GEMM reads that result transposed; cuBLAS takes transposed operands in place, so
  nothing is copied. BENCHMARKS.md has both epilogues measured on an H100.
- `residual_in_gemm` (CUDA; measured only as a bench/gpu_variants.py variant so far) gives the
  second GEMM of each sub-block the residual stream as its accumulator (`addmm(x, ...)`, so
  cuBLAS adds it in the epilogue) and leaves that GEMM's bias to the next LayerNorm's pass,
  which adds it to the stream and normalizes in one read: one pass per sub-block over the
  residual stream instead of a bias/residual pass and a norm pass (issue 20 item 3).
- The pooled features are averaged in fp32. `norm_in_fp32` also runs every LayerNorm in fp32
  (the ONNX export for TensorRT's strongly typed builds casts around each norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.mixer import MlpMixer


def gelu_table(approximate: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """GELU of every 16-bit pattern of `dtype`, indexed by the pattern as an unsigned int."""
    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).float()
    return F.gelu(values, approximate=approximate).to(dtype)


class FusedMixer(nn.Module):
    """Inference-only MlpMixer at one dtype; `forward` returns (fp32 logits, fp32 features)."""

    def __init__(
        self,
        model: MlpMixer,
        dtype: torch.dtype,
        gelu_by_table: bool = False,
        norm_in_fp32: bool = False,
        gelu_in_gemm: bool = False,
        token_gelu_in_gemm: bool = False,
        residual_in_gemm: bool = False,
    ) -> None:
        super().__init__()
        config = model.config
        self.patch = config.patch_size
        self.channels = config.hidden_dim
        self.dtype = dtype
        self.approximate = "tanh" if config.gelu == "tanh" else "none"
        self.gelu_by_table = gelu_by_table
        if gelu_by_table and dtype.itemsize != 2:
            raise ValueError(f"a GELU table needs a 16-bit dtype, not {dtype}")
        if (gelu_in_gemm or token_gelu_in_gemm) and self.approximate != "tanh":
            raise ValueError("the GEMM epilogue computes the tanh GELU; this model uses erf")
        self.gelu_in_gemm = gelu_in_gemm
        self.token_gelu_in_gemm = token_gelu_in_gemm
        self.residual_in_gemm = residual_in_gemm

        self.norm_dtype = torch.float32 if norm_in_fp32 else dtype

        def weight(t: torch.Tensor, as_dtype: torch.dtype = dtype) -> nn.Parameter:
            return nn.Parameter(t.detach().to(as_dtype).contiguous(), requires_grad=False)

        def norm_weight(t: torch.Tensor) -> nn.Parameter:
            return weight(t, self.norm_dtype)

        self.stem_weight = weight(model.stem.weight.reshape(config.hidden_dim, -1))
        self.stem_bias = weight(model.stem.bias)
        self.blocks = nn.ModuleList()
        for block in model.blocks:
            fused = nn.Module()
            fused.token_norm_weight = norm_weight(block.token_norm.weight)
            fused.token_norm_bias = norm_weight(block.token_norm.bias)
            fused.token_fc1_weight = weight(block.token_mixing.fc1.weight)
            fused.token_fc1_bias = weight(block.token_mixing.fc1.bias[:, None])  # per row
            fused.token_fc2_weight = weight(block.token_mixing.fc2.weight)
            fused.token_fc2_bias = weight(block.token_mixing.fc2.bias[:, None])
            fused.channel_norm_weight = norm_weight(block.channel_norm.weight)
            fused.channel_norm_bias = norm_weight(block.channel_norm.bias)
            fused.channel_fc1_weight = weight(block.channel_mixing.fc1.weight)
            fused.channel_fc1_bias = weight(block.channel_mixing.fc1.bias)
            fused.channel_fc2_weight = weight(block.channel_mixing.fc2.weight)
            fused.channel_fc2_bias = weight(block.channel_mixing.fc2.bias)
            self.blocks.append(fused)
        self.norm_weight = norm_weight(model.pre_head_norm.weight)
        self.norm_bias = norm_weight(model.pre_head_norm.bias)
        self.head_weight = weight(model.head.weight)
        self.head_bias = weight(model.head.bias)
        if self.gelu_by_table:
            self.register_buffer("gelu_values", gelu_table(self.approximate, dtype))

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu_by_table:
            index = x.view(torch.int16).to(torch.int32) & 0xFFFF
            return self.gelu_values[index]
        return F.gelu(x, approximate=self.approximate)

    def norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.to(self.norm_dtype), (self.channels,), weight, bias, eps=1e-6)
        return y.to(self.dtype)

    def token_mixing(self, b: nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`x + W2 @ gelu(W1 @ y + b1) + b2`, all `(S, B * C)`: the token MLP with its residual
        (without `+ b2` under `residual_in_gemm`: the next norm's pass adds it)."""
        if self.token_gelu_in_gemm:
            bias = b.token_fc1_bias.view(-1)
            h = torch._addmm_activation(bias, y.t(), b.token_fc1_weight.t(), use_gelu=True).t()
        else:
            h = self.gelu(torch.mm(b.token_fc1_weight, y) + b.token_fc1_bias)
        if self.residual_in_gemm:
            return torch.addmm(x, b.token_fc2_weight, h)
        if self.token_gelu_in_gemm:
            return torch.addmm(x + b.token_fc2_bias, b.token_fc2_weight, h)
        return x + (torch.mm(b.token_fc2_weight, h) + b.token_fc2_bias)

    def channel_mixing(self, b: nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`x + MLP(y)` over `(S * B, C)` rows: the channel MLP with its residual (without the
        last bias under `residual_in_gemm`)."""
        if self.gelu_in_gemm:
            h = torch._addmm_activation(
                b.channel_fc1_bias, y, b.channel_fc1_weight.t(), use_gelu=True
            )
        else:
            h = self.gelu(F.linear(y, b.channel_fc1_weight, b.channel_fc1_bias))
        if self.residual_in_gemm:
            return torch.addmm(x, h, b.channel_fc2_weight.t())
        if self.gelu_in_gemm:
            return torch.addmm(x, h, b.channel_fc2_weight.t()).add_(b.channel_fc2_bias)
        return x + F.linear(h, b.channel_fc2_weight, b.channel_fc2_bias)

    def add_carried(self, x: torch.Tensor, bias: torch.Tensor | None, tokens: int) -> torch.Tensor:
        """`x` (S * B, C) plus a bias shaped to broadcast over (S, B, C); compiled, this add and
        the LayerNorm after it are one pass."""
        if bias is None:
            return x
        return (x.view(tokens, -1, self.channels) + bias).view(x.shape)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = images.shape
        p, c = self.patch, self.channels
        rows, cols = height // p, width // p
        tokens = rows * cols
        # (B, 3, rows, p, cols, p) -> token-major patches (rows * cols * B, 3 * p * p)
        patches = images.to(self.dtype).reshape(batch, 3, rows, p, cols, p)
        patches = patches.permute(2, 4, 0, 1, 3, 5).reshape(tokens * batch, 3 * p * p)
        x = F.linear(patches, self.stem_weight, self.stem_bias)  # (S * B, C)
        carried = None  # under residual_in_gemm: the bias the last GEMM left to the next norm
        for b in self.blocks:
            x = self.add_carried(x, carried, tokens)
            y = self.norm(x, b.token_norm_weight, b.token_norm_bias).view(tokens, batch * c)
            x = self.token_mixing(b, y, x.view(tokens, batch * c)).view(tokens * batch, c)
            carried = b.token_fc2_bias.view(tokens, 1, 1) if self.residual_in_gemm else None
            x = self.add_carried(x, carried, tokens)
            y = self.norm(x, b.channel_norm_weight, b.channel_norm_bias)
            x = self.channel_mixing(b, y, x)
            carried = b.channel_fc2_bias if self.residual_in_gemm else None
        x = self.add_carried(x, carried, tokens)
        x = F.layer_norm(x.to(self.norm_dtype), (c,), self.norm_weight, self.norm_bias, eps=1e-6)
        features = x.view(tokens, batch, c).float().mean(dim=0)
        logits = F.linear(features.to(self.dtype), self.head_weight, self.head_bias)
        return logits.float(), features
