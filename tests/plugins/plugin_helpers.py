"""Shared by the plugin kernel tests (imported by name: pytest puts this folder on sys.path)."""

import torch

# fp32: both sides compute in fp32 (kernel order of sums differs); bf16: inputs rounded to bf16, outputs too.
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def ragged(lens: list[int], ctx: list[int], slots: list[int] | None = None):
    """cu_seqlens, context_lens, state_slots (int32) for a batch of sequences with `lens` new tokens each."""
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    ctx_t = torch.tensor(ctx, dtype=torch.int32)
    slots_t = torch.tensor(slots if slots is not None else list(range(len(lens))), dtype=torch.int32)
    return cu, ctx_t, slots_t


def scaled_tol(dtype, ref):
    """TOL[dtype] with the absolute part scaled by the result's magnitude (SSD outputs grow with the state)."""
    t = TOL[dtype]
    scale = max(1.0, ref.float().abs().max().item()) if ref.numel() else 1.0
    return dict(atol=t["atol"] * scale, rtol=t["rtol"])
