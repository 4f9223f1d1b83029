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


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
from trtfalcon.plugins.triton_lang import tl, triton  # noqa: E402


@triton.jit
def causal_conv1d_kernel(
    # inputs (the spec's order)
    x_ptr,  # (num_tokens, conv_dim)
    weight_ptr,  # (conv_dim, K)
    bias_ptr,  # (conv_dim,) (dummy when HAS_BIAS is False)
    conv_state_ptr,  # (num_slots, conv_dim, K-1), read
    cu_seqlens_ptr,  # (num_seqs+1,) int32
    context_lens_ptr,  # (num_seqs,) int32
    state_slots_ptr,  # (num_seqs,) int32
    # scalars (shape expressions only: TensorRT's AOT plugins allow nothing else)
    conv_dim,
    # outputs
    out_ptr,  # (num_tokens, conv_dim)
    conv_state_out_ptr,  # aliases conv_state_ptr: written in place
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next power of two >= K-1
):
    """One program = one sequence x BLOCK_C channels; it walks the sequence's tokens in tiles of BLOCK_T.

    Fused: the history gather (from the slot, or zeros when context_len == 0), the K taps, bias, SiLU and the
    state update, in one pass over x: x is read once per tap from L1/L2 and written once, where an unfused
    version (cat history, conv, add bias, silu, slice the new state) moves the activations 4-5 times.
    The program that reads a slot's old state is the one that writes its new state, so the in-place update
    needs only a barrier inside the program, never across programs.
    """
    b = tl.program_id(0)
    pc = tl.program_id(1)
    start = tl.load(cu_seqlens_ptr + b)
    seqlen = tl.load(cu_seqlens_ptr + b + 1) - start
    # History entries with index < hist_lo are zeros: all of them for a new sequence (context_len == 0).
    # (Scalar conditions enter masks as index bounds: vector masks only, which the interpreter also accepts.)
    hist_lo = tl.where(tl.load(context_lens_ptr + b) > 0, 0, K - 1)
    slot = tl.load(state_slots_ptr + b).to(tl.int64)

    S: tl.constexpr = K - 1
    cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < conv_dim
    # 64-bit scalar bases, 32-bit vector offsets (num_tokens * conv_dim < 2**31): half the address registers.
    state_slot_ptr = conv_state_ptr + slot * conv_dim * S
    state_slot_out_ptr = conv_state_out_ptr + slot * conv_dim * S
    x_seq_ptr = x_ptr + start.to(tl.int64) * conv_dim
    out_seq_ptr = out_ptr + start.to(tl.int64) * conv_dim
    state_row = cols * S  # (BLOCK_C,) offset of each channel's history in the slot

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_C], dtype=tl.float32)

    # The new state (the last K-1 inputs of the extended sequence [history | x]) is read BEFORE any write.
    si = tl.arange(0, BLOCK_S)
    sp = seqlen - S + si  # position (in this step's tokens) of new-state entry si; < 0 => from the old history
    smask = (si < S)[None, :] & cmask[:, None]
    new_x = tl.load(
        x_seq_ptr + sp[None, :] * conv_dim + cols[:, None],
        mask=smask & (sp >= 0)[None, :], other=0.0,
    ).to(tl.float32)
    new_h = tl.load(
        state_slot_ptr + state_row[:, None] + (S + sp)[None, :],
        mask=smask & ((sp < 0) & (S + sp >= hist_lo))[None, :], other=0.0,
    ).to(tl.float32)
    new_state = new_x + new_h

    for t0 in range(0, seqlen, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < seqlen
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32) + bias[None, :]
        for j in tl.static_range(K):
            w = tl.load(weight_ptr + cols * K + j, mask=cmask, other=0.0).to(tl.float32)  # L1-resident
            p = t + (j - S)  # input position read by tap j for output t; < 0 => history entry S + p
            m2 = tmask[:, None] & cmask[None, :]
            xv = tl.load(
                x_seq_ptr + p[:, None] * conv_dim + cols[None, :],
                mask=m2 & (p >= 0)[:, None], other=0.0,
            ).to(tl.float32)
            hv = tl.load(
                state_slot_ptr + state_row[None, :] + (S + p)[:, None],
                mask=m2 & ((p < 0) & (S + p >= hist_lo))[:, None], other=0.0,
            ).to(tl.float32)
            acc += (xv + hv) * w[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(
            out_seq_ptr + t[:, None] * conv_dim + cols[None, :],
            acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :],
        )

    # Every read of the old history (above, by any thread of this program) happens before the write below.
    tl.debug_barrier()
    n_write = tl.where(seqlen > 0, S, 0)  # an empty sequence leaves its slot untouched, as the reference does
    tl.store(
        state_slot_out_ptr + state_row[:, None] + si[None, :],
        new_state.to(conv_state_out_ptr.dtype.element_ty), mask=(si < n_write)[None, :] & cmask[:, None],
    )


# ----------------------------------------------------------------------------------------------------------------
# The declaration (plugins/spec.py): every backend's view of this op
# ----------------------------------------------------------------------------------------------------------------
from trtfalcon.plugins.spec import (  # noqa: E402
    FLOATS, Attr, KernelSpec, OpSpec, OutputArg, TensorArg, cdiv, cexpr, dim, int32_input, pow2,
)

CAUSAL_CONV1D = OpSpec(
    name="causal_conv1d",
    doc=__doc__ or "",
    inputs=(
        TensorArg("x", ("num_tokens", "conv_dim"), FLOATS),
        TensorArg("weight", ("conv_dim", "d_conv"), FLOATS),
        TensorArg("bias", ("conv_dim",), FLOATS, optional=True, fill=0.0),
        TensorArg("conv_state", ("num_slots", "conv_dim", "d_conv-1"), FLOATS),
        int32_input("cu_seqlens", ("num_seqs+1",)), int32_input("context_lens", ("num_seqs",)),
        int32_input("state_slots", ("num_seqs",)),
    ),
    outputs=(OutputArg("out", like="x"), OutputArg("conv_state_out", like="conv_state", alias="conv_state")),
    attributes=(Attr("activation", bool, True, "apply SiLU after the bias"),),
    ref=causal_conv1d_varlen_ref,
    kernels=(
        KernelSpec(
            name="varlen",
            fn=causal_conv1d_kernel,
            grid=(dim("context_lens", 0), cdiv(dim("x", 1), cexpr("BLOCK_C"))),
            scalars=(("conv_dim", dim("x", 1)),),
            constexprs=lambda c: dict(
                K=c.dim("weight", 1), HAS_BIAS=c.present["bias"], SILU=c.attrs["activation"],
                BLOCK_T=8, BLOCK_C=64, BLOCK_S=max(2, pow2(c.dim("weight", 1) - 1)),
            ),
            doc="prefill chunks and decode tokens alike: one program per sequence x 64 channels",
        ),
    ),
)
