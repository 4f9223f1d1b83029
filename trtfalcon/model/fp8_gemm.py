"""FP8 linears as FP8 GEMMs (torch._scaled_mm) instead of fake quantization: what the torch executor runs on a GPU.

The FP8 deploy format (checkpoint/deploy_fp8.py) stores, per FP8 linear X: X.weight E4M3 (N, K), X.weight_scale fp32 (N,)
per output row, X.input_scale fp32 () per tensor. The GEMM computes

    y[m, n] = sum_k fp8(x[m, k] / input_scale) * weight[n, k]  *  input_scale * weight_scale[n]

which is the fake-quantized linear's value (deploy_fp8's semantics) without rounding the dequantized operands to
the compute dtype. torch._scaled_mm takes either both scales per tensor or both row-wise, so the per-tensor
activation scale is folded into the weight's row scales once (scale_b = input_scale * weight_scale) and scale_a is
a column of ones.

What CUDA's _scaled_mm accepts (torch 2.9 - 2.13, aten/src/ATen/native/cuda/ScaledBlas.cpp, row-wise recipe;
`scaled_mm_problem` checks exactly this, so a CPU test proves the arguments a GPU will get):
    a: (M, K) float8_e4m3fn, row-major;  b: (K, N) float8_e4m3fn, column-major (b = W.t() of a row-major W)
    K % 16 == 0 and N % 16 == 0 (M is free);  data pointers 16-byte aligned
    scale_a: fp32 (M, 1) contiguous;  scale_b: fp32 (1, N) with unit stride along N
    out_dtype: bf16, fp16 or fp32 (the row-wise kernels' outputs); sm_89 or newer
N that is not a multiple of 16 (the 7B's Mamba in_proj: 6680 rows) is padded with zero rows once, at load, and the
output sliced; K that is not (no Falcon-H1 preset) keeps the fake-quantized linear, named in `fallbacks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trtfalcon.model.weights import DeployWeights
from trtfalcon.checkpoint.deploy_fp8 import FP8_DTYPE, quantize_fp8

ALIGN = 16  # K and N multiples, and data pointer alignment in bytes
SCALED_MM_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

ScaledMm = Callable[..., torch.Tensor]  # torch._scaled_mm's signature


def scaled_mm_problem(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                      out_dtype: torch.dtype) -> str | None:
    """Why CUDA's row-wise torch._scaled_mm would reject these arguments, or None when it accepts them."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        return f"a (M, K) and b (K, N) expected, found {tuple(a.shape)} and {tuple(b.shape)}"
    m, k = a.shape
    n = b.shape[1]
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        return f"a and b must be float8_e4m3fn, found {a.dtype} and {b.dtype}"
    if k % ALIGN or n % ALIGN:
        return f"K ({k}) and N ({n}) must be multiples of {ALIGN}"
    if a.stride() != (k, 1):
        return f"a must be row-major (strides ({k}, 1)), found {a.stride()}"
    if b.stride() != (1, k):
        return f"b must be column-major (strides (1, {k}): the transpose of a row-major weight), found {b.stride()}"
    for name, t in (("a", a), ("b", b)):
        if t.data_ptr() % ALIGN:
            return f"{name}'s data pointer must be {ALIGN}-byte aligned"
    if scale_a.dtype != torch.float32 or scale_b.dtype != torch.float32:
        return f"scales must be float32, found {scale_a.dtype} and {scale_b.dtype}"
    if tuple(scale_a.shape) != (m, 1) or not scale_a.is_contiguous():
        return f"scale_a must be a contiguous ({m}, 1) column, found {tuple(scale_a.shape)} strides {scale_a.stride()}"
    if tuple(scale_b.shape) != (1, n) or (n > 1 and scale_b.stride(1) != 1):
        return f"scale_b must be a (1, {n}) row with unit stride, found {tuple(scale_b.shape)} strides {scale_b.stride()}"
    if out_dtype not in SCALED_MM_OUT_DTYPES:
        return f"out_dtype must be one of {SCALED_MM_OUT_DTYPES}, found {out_dtype}"
    return None


def scaled_mm_emulated(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """The row-wise _scaled_mm's math in fp32 (exact E4M3 products, fp32 sums, then both scales): the CPU oracle."""
    return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)


@dataclass
class Fp8Gemm:
    """One FP8 linear prepared for _scaled_mm."""

    weight_t: torch.Tensor  # (K, N_padded) float8, column-major: the transpose of the row-major (N_padded, K) weight
    scale_b: torch.Tensor  # (1, N_padded) fp32 = input_scale * weight_scale (1 on padding rows)
    input_scale: torch.Tensor  # () fp32
    out_features: int  # N before padding
    bias: torch.Tensor | None


class ScaledMmLinears:
    """`linear(x, w, name)` for the FP8 linears of `weights`, as FP8 GEMMs; `names()` are the ones it runs.

    Built once per model on the weights' device. `mm` is torch._scaled_mm (tests pass a checked emulation). The
    per-row scale_a of ones is one buffer reused by every call (grown, never freed: a captured CUDA graph keeps
    the address it was captured with).
    """

    def __init__(self, weights: DeployWeights, mm: ScaledMm | None = None, use_fast_accum: bool = False):
        self.mm = mm or torch._scaled_mm
        self.use_fast_accum = use_fast_accum
        self.gemms: dict[str, Fp8Gemm] = {}
        self.fallbacks: dict[str, str] = {}  # linear -> why it stays fake-quantized
        for key in sorted(weights.tensors):
            if not key.endswith(".input_scale"):
                continue
            name = key.removesuffix(".input_scale")
            weight = weights[f"{name}.weight"]
            if weight.dtype != FP8_DTYPE:
                continue
            if weight.shape[1] % ALIGN:
                self.fallbacks[name] = f"K = {weight.shape[1]} is not a multiple of {ALIGN}"
                continue
            self.gemms[name] = self._prepare(weights, name, weight)
        device = next(iter(weights.tensors.values())).device
        self._ones: list[torch.Tensor] = [torch.ones(256, 1, device=device)]

    @staticmethod
    def _prepare(weights: DeployWeights, name: str, weight: torch.Tensor) -> Fp8Gemm:
        n, k = weight.shape
        n_pad = -(-n // ALIGN) * ALIGN
        input_scale = weights[f"{name}.input_scale"].float()
        scale = input_scale * weights[f"{name}.weight_scale"].float()
        if n_pad != n:
            padded = torch.zeros(n_pad, k, dtype=FP8_DTYPE, device=weight.device)
            padded[:n] = weight
            weights.tensors[f"{name}.weight"] = padded[:n]  # one copy of the weight in memory, not two
            weight = padded
            scale = torch.cat([scale, scale.new_ones(n_pad - n)])
        else:
            weight = weight.contiguous()
        return Fp8Gemm(weight.t(), scale.reshape(1, n_pad).contiguous(), input_scale, n,
                       weights.get(f"{name}.bias"))

    def names(self) -> list[str]:
        return list(self.gemms)

    def ones(self, m: int) -> torch.Tensor:
        if self._ones[-1].shape[0] < m:
            self._ones.append(torch.ones(max(m, 2 * self._ones[-1].shape[0]), 1, device=self._ones[-1].device))
        return self._ones[-1][:m]

    def arguments(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """a, b, scale_a, scale_b of linear `name` for input x (M, K)."""
        g = self.gemms[name]
        return quantize_fp8(x, g.input_scale).contiguous(), g.weight_t, self.ones(x.shape[0]), g.scale_b

    def __contains__(self, name: str) -> bool:
        return name in self.gemms

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor:
        g = self.gemms[name]
        a, b, scale_a, scale_b = self.arguments(x, name)
        y = self.mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=x.dtype, use_fast_accum=self.use_fast_accum)
        if y.shape[1] != g.out_features:
            y = y[:, : g.out_features]
        return y if g.bias is None else y + g.bias
