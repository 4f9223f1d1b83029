"""Mamba2 SSD scan (state space duality, Dao & Gu 2024) with per-slot SSM states, on a ragged batch.

Per head h (group g = h // (H/G), repeat_interleave order), token t:
    dt_t = clamp(softplus(dt_raw_t + dt_bias), dt_min, dt_max)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * (x_t outer B_t)        S: (P, N)
    y_t  = S_t @ C_t + D * x_t
The chunked form computes the same thing chunk by chunk (intra-chunk quadratic form + inter-chunk recurrence
over chunk states); it is what transformers' torch_forward and mamba_ssm's ssd_minimal_discrete do.

Layouts (the engine I/O contract, trtfalcon/runtime/contract.py):
    x:            (num_tokens, H, P)
    dt:           (num_tokens, H)       raw, before dt_bias and softplus
    A:            (H,) fp32             = -exp(A_log)
    B, C:         (num_tokens, G, N)
    D, dt_bias:   (H,) fp32
    ssm_state:    (num_slots, H, P, N)  fp32 or bf16; updated in place for the slots in the batch
    cu_seqlens:   (num_seqs+1,) int32; context_lens, state_slots: (num_seqs,) int32 (context_len 0 = zero state)
Returns y: (num_tokens, H, P) in x's dtype (D skip included, no gating: the gated RMSNorm follows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dt_transform(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    """(..., H) raw dt -> clamp(softplus(dt + dt_bias), lo, hi) in fp32."""
    dt = F.softplus(dt.float() + dt_bias.float())
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a: (..., Q) -> (..., Q, Q) with out[i, j] = sum(a[j+1..i]) for j <= i, -inf above the diagonal."""
    q = a.shape[-1]
    a = a[..., None].expand(*a.shape, q)
    below = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)
    cs = torch.cumsum(a.masked_fill(~below, 0), dim=-2)
    return cs.masked_fill(~torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device)), -torch.inf)


def ssd_chunked_ref(
    x: torch.Tensor,  # (seqlen, H, P)
    dt: torch.Tensor,  # (seqlen, H) already transformed (dt_transform)
    A: torch.Tensor,  # (H,)
    B: torch.Tensor,  # (seqlen, G, N)
    C: torch.Tensor,  # (seqlen, G, N)
    D: torch.Tensor | None,  # (H,)
    chunk_size: int,
    initial_state: torch.Tensor | None = None,  # (H, P, N)
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, chunked SSD in fp32. Returns (y (seqlen, H, P) fp32, final_state (H, P, N) fp32)."""
    seqlen, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    x, dt, A = x.float(), dt.float(), A.float()
    B = B.float().repeat_interleave(H // G, dim=1)  # (L, H, N): head h reads group h // (H/G)
    C = C.float().repeat_interleave(H // G, dim=1)
    pad = (-seqlen) % chunk_size
    nc = (seqlen + pad) // chunk_size

    def chunks(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)).reshape(nc, chunk_size, *t.shape[1:])

    xdt = chunks(x * dt[..., None])  # (c, l, H, P)
    a = chunks(dt * A).permute(2, 0, 1)  # (H, c, l)
    Bc, Cc = chunks(B), chunks(C)  # (c, l, H, N)
    a_cum = torch.cumsum(a, dim=-1)

    # 1. intra-chunk (diagonal blocks)
    L = torch.exp(_segsum(a))  # (H, c, l, s)
    y_diag = torch.einsum("clhn,cshn,hcls,cshp->clhp", Cc, Bc, L, xdt)
    # 2. each chunk's state from its own inputs
    decay_states = torch.exp(a_cum[..., -1:] - a_cum)  # (H, c, l)
    states = torch.einsum("clhn,hcl,clhp->chpn", Bc, decay_states, xdt)
    # 3. inter-chunk recurrence, starting from the initial state
    init = initial_state.float()[None] if initial_state is not None else torch.zeros_like(states[:1])
    states = torch.cat([init, states], dim=0)  # (c+1, H, P, N)
    decay_chunk = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (H, c+1, c+1)
    new_states = torch.einsum("hzc,chpn->zhpn", decay_chunk, states)
    states, final_state = new_states[:-1], new_states[-1]
    # 4. state -> output within each chunk
    y_off = torch.einsum("clhn,chpn,hcl->clhp", Cc, states, torch.exp(a_cum))
    y = (y_diag + y_off).reshape(nc * chunk_size, H, P)[:seqlen]
    if D is not None:
        y = y + D.float()[:, None] * x
    return y, final_state


def ssd_recurrent_ref(
    x: torch.Tensor,  # (seqlen, H, P)
    dt: torch.Tensor,  # (seqlen, H) already transformed
    A: torch.Tensor,  # (H,)
    B: torch.Tensor,  # (seqlen, G, N)
    C: torch.Tensor,  # (seqlen, G, N)
    D: torch.Tensor | None,  # (H,)
    initial_state: torch.Tensor | None = None,  # (H, P, N)
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, token by token: the definition the chunked form must equal. Also the decode step."""
    seqlen, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    B = B.float().repeat_interleave(H // G, dim=1)
    C = C.float().repeat_interleave(H // G, dim=1)
    state = initial_state.float().clone() if initial_state is not None else x.new_zeros(H, P, N, dtype=torch.float32)
    ys = []
    for t in range(seqlen):
        dA = torch.exp(dt[t].float() * A.float())  # (H,)
        state = state * dA[:, None, None] + (dt[t].float()[:, None, None] * x[t].float()[:, :, None]) * B[t][:, None, :]
        y = torch.einsum("hpn,hn->hp", state, C[t])
        if D is not None:
            y = y + D.float()[:, None] * x[t].float()
        ys.append(y)
    return torch.stack(ys) if ys else x.new_zeros(0, H, P, dtype=torch.float32), state


def ssd_varlen_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_lens: torch.Tensor,
    state_slots: torch.Tensor,
    chunk_size: int,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """Ragged batch: a loop over the sequences (chunked scan for several tokens, one recurrence step for one)."""
    y = torch.empty_like(x)
    dt = dt_transform(dt, dt_bias, dt_limit)
    cu = cu_seqlens.tolist()
    for b, (slot, ctx) in enumerate(zip(state_slots.tolist(), context_lens.tolist())):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        init = ssm_state[slot] if ctx > 0 else None
        if e - s == 1:
            yb, final = ssd_recurrent_ref(x[s:e], dt[s:e], A, B[s:e], C[s:e], D, init)
        else:
            yb, final = ssd_chunked_ref(x[s:e], dt[s:e], A, B[s:e], C[s:e], D, chunk_size, init)
        y[s:e] = yb.to(y.dtype)
        ssm_state[slot] = final.to(ssm_state.dtype)
    return y
