"""Causal depthwise conv1d over xBC with a per-slot conv state, on a ragged batch.

Layouts (the engine I/O contract, trtfalcon/runtime/contract.py):
    x:           (num_tokens, conv_dim)          tokens of all sequences concatenated
    weight:      (conv_dim, d_conv)              depthwise taps, oldest first (HF conv1d.weight squeezed)
    bias:        (conv_dim,) or None
    conv_state:  (num_slots, conv_dim, d_conv-1) the last d_conv-1 inputs of each slot's sequence, oldest first
    cu_seqlens:  (num_seqs+1,) int32             token offsets of each sequence in x
    context_lens:(num_seqs,) int32               tokens of the sequence processed before this step; 0 = a new
                                                 sequence, whose history is zeros whatever its slot holds
    state_slots: (num_seqs,) int32               the slot holding each sequence's state
Returns silu(conv(x) + bias) of x's dtype; conv_state[state_slots] is updated in place; other slots untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor,  # (seqlen, conv_dim)
    weight: torch.Tensor,  # (conv_dim, d_conv)
    bias: torch.Tensor | None,  # (conv_dim,)
    history: torch.Tensor | None,  # (conv_dim, d_conv-1): previous inputs; None = zeros (sequence start)
    activation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence. Returns (out (seqlen, conv_dim), new history (conv_dim, d_conv-1)), math in fp32."""
    seqlen, conv_dim = x.shape
    k = weight.shape[1]
    if history is None:
        history = x.new_zeros(conv_dim, k - 1)
    xs = torch.cat([history.float(), x.float().t()], dim=1)  # (conv_dim, k-1+seqlen)
    out = F.conv1d(xs[None], weight.float()[:, None, :], bias.float() if bias is not None else None, groups=conv_dim)
    out = out[0].t()  # (seqlen, conv_dim)
    if activation:
        out = F.silu(out)
    return out.to(x.dtype), xs[:, -(k - 1):]


def causal_conv1d_varlen_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_lens: torch.Tensor,
    state_slots: torch.Tensor,
    activation: bool = True,
) -> torch.Tensor:
    """Ragged batch: a loop over the sequences, each through `causal_conv1d_ref`. See the module docstring."""
    out = torch.empty_like(x)
    cu = cu_seqlens.tolist()
    for b, (slot, ctx) in enumerate(zip(state_slots.tolist(), context_lens.tolist())):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        hist = conv_state[slot] if ctx > 0 else None
        out[s:e], new_hist = causal_conv1d_ref(x[s:e], weight, bias, hist, activation)
        conv_state[slot] = new_hist.to(conv_state.dtype)
    return out
