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
