"""Falcon-H1's Mamba output gate: y * silu(z), with an optional grouped RMSNorm before or after the gate.

transformers' FalconH1RMSNormGated: with norm_before_gate=False (the real 7B) the gate comes FIRST, then an
RMSNorm over each group of d_ssm/G channels, weight viewed (G, d_ssm/G); all math in fp32.
With mamba_rms_norm=False there is no norm: y * silu(z).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_rms_norm_ref(
    y: torch.Tensor,  # (num_tokens, d_ssm)
    z: torch.Tensor,  # (num_tokens, d_ssm)
    weight: torch.Tensor | None,  # (d_ssm,); None = no norm, gate only
    n_groups: int,
    eps: float,
    norm_before_gate: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    y = y.float()
    gate = F.silu(z.float())
    if weight is None:
        return (y * gate).to(out_dtype)
    if not norm_before_gate:
        y = y * gate
    t, d = y.shape
    yg = y.view(t, n_groups, d // n_groups)
    yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + eps)
    y = (weight.float().view(n_groups, d // n_groups) * yg).view(t, d)
    if norm_before_gate:
        y = y * gate
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
from trtfalcon.plugins.triton_lang import tl, triton  # noqa: E402


@triton.jit
def gated_rms_norm_kernel(
    y_ptr,  # (num_tokens, d_ssm)
    z_ptr,  # (num_tokens, d_ssm)
    weight_ptr,  # (d_ssm,) (ignored when HAS_NORM is False)
    d_ssm,
    out_ptr,  # (num_tokens, d_ssm)
    GROUP_SIZE: tl.constexpr,  # d_ssm / n_groups
    EPS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= GROUP_SIZE
):
    """One program = one token x one group: gate, sum of squares, rsqrt, weight, cast, in registers.

    Fused because every step is elementwise or a row reduction over the same row: unfused (silu, mul, pow,
    mean, rsqrt, mul, mul, cast in fp32) it moves the (num_tokens, d_ssm) activations 8+ times through memory;
    fused it reads y and z once and writes out once (a 3072-wide row is 12 KiB in fp32: registers hold it).
    """
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    cols = grp * GROUP_SIZE + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < GROUP_SIZE
    y = tl.load(y_ptr + row * d_ssm + cols, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * d_ssm + cols, mask=mask, other=0.0).to(tl.float32)
    gate = z * tl.sigmoid(z)
    if HAS_NORM:
        if not NORM_BEFORE_GATE:
            y = y * gate
        var = tl.sum(y * y, axis=0) / GROUP_SIZE
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = y * tl.rsqrt(var + EPS) * w
        if NORM_BEFORE_GATE:
            y = y * gate
    else:
        y = y * gate
    tl.store(out_ptr + row * d_ssm + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# The declaration (plugins/spec.py): every backend's view of this op
# ----------------------------------------------------------------------------------------------------------------
from trtfalcon.dtypes import lookup  # noqa: E402
from trtfalcon.plugins.spec import (  # noqa: E402
    FLOATS, TENSOR_DTYPES, Attr, KernelSpec, OpSpec, OutputArg, TensorArg, cexpr, dim, dtype_name, pow2,
)

GATED_RMS_NORM = OpSpec(
    name="gated_rms_norm",
    doc=__doc__ or "",
    inputs=(
        TensorArg("y", ("num_tokens", "d_ssm"), FLOATS),
        TensorArg("z", ("num_tokens", "d_ssm"), FLOATS),
        TensorArg("weight", ("d_ssm",), FLOATS, optional=True, fill=1.0),
    ),
    outputs=(OutputArg("out", like="y", dtype_attr="out_dtype"),),
    attributes=(
        Attr("n_groups", int, 1), Attr("eps", float, 1e-5), Attr("norm_before_gate", bool, False),
        Attr("has_norm", bool, True, "False: y * silu(z) only (mamba_rms_norm false); weight is ignored",
             presence_of="weight"),
        Attr("out_dtype", str, "bfloat16", encode=dtype_name, decode=lambda name: lookup(name, "long", among=TENSOR_DTYPES).torch),
    ),
    ref=gated_rms_norm_ref,
    kernels=(
        KernelSpec(
            name="rows",
            fn=gated_rms_norm_kernel,
            grid=(dim("y", 0), cexpr("N_GROUPS")),
            scalars=(("d_ssm", dim("y", 1)),),
            constexprs=lambda c: dict(
                GROUP_SIZE=c.dim("y", 1) // c.attrs["n_groups"], EPS=float(c.attrs["eps"]),
                HAS_NORM=bool(c.attrs["has_norm"]), NORM_BEFORE_GATE=bool(c.attrs["norm_before_gate"]),
                BLOCK=pow2(c.dim("y", 1) // c.attrs["n_groups"]), N_GROUPS=int(c.attrs["n_groups"]),
            ),
            num_warps=lambda k: 8 if k["BLOCK"] >= 2048 else 4,
        ),
    ),
)
