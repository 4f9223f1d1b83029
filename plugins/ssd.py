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

Where the one-token (decode) path deliberately differs from an anchor: this project clamps dt into
time_step_limit on every path, the one-token step included, as transformers' torch_forward did in its decode
branch (4.x) and as every chunked scan does (transformers' and mamba_ssm's mamba_chunk_scan_combined take
dt_limit). mamba_ssm's fused selective_state_update takes no dt_limit and does not clamp; transformers 5.x's
cached decode (mamba2_selective_state_update: that kernel or its torch fallback) follows it, so there a cached
decode step differs from the full-sequence forward whenever the limit bites (measured with transformers 5.23,
limit (0.02, 0.08): the layer's Mamba output off by 10x its magnitude). Clamping everywhere keeps
prefill-then-decode equal to one prefill, which the runtime relies on. For the default limit (0, inf) the clamp
is the identity and every anchor agrees.

Numerics shared by the references and the kernels (and checked against a plain float64 recurrence by
tests/plugins/test_sweep_mamba.py): softplus is torch's (x above 20, else log1p(e^x) to a few ulps, e^x itself
in the far tail); an upper limit of 0 is a limit (dt = 0); the chunked kernel's state carries the very decay its
outputs use (the running sum's last element).
"""

from __future__ import annotations

from typing import Any

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


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
from trtfalcon.plugins.triton_lang import mma_operand, tl, triton  # noqa: E402


@triton.jit
def _softplus(x):
    """log(1 + e^x) in fp32 as torch computes it: x above 20, else log1p(e^x).

    log(1 + e) rounds 1 + e first: 17% off at x = -15 and 0 below x = -16.6, where softplus is e^x. Triton has no
    log1p the interpreter also runs, so it is Goldberg's form ("What every computer scientist should know about
    floating-point arithmetic", theorem 4): log1p(e) = log(u) * e / (u - 1) with u = 1 + e, a few ulps from
    exact, and e itself where u rounds to 1 (e < 2**-24, where log1p(e) = e to fp32 precision)."""
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    # u - 1 is 0 or >= 2**-23: the floor only keeps the unselected lane finite (no 0/0 computed, no NaN)
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.maximum(u - 1.0, 1e-30)))
    return tl.where(x > 20.0, x, log1p_e)


@triton.jit
def _dt_transform(dt_raw, dt_bias, DT_MIN: tl.constexpr, HAS_DT_MAX: tl.constexpr, DT_MAX: tl.constexpr):
    """clamp(softplus(dt + dt_bias), DT_MIN, DT_MAX) in fp32. The upper limit has its own flag: every value of
    DT_MAX, 0 included, is a limit someone may configure (time_step_limit [0, 0] gives dt = 0)."""
    dt = _softplus(dt_raw + dt_bias)
    if DT_MIN > 0.0:  # a lower limit of 0 changes nothing: softplus >= 0
        dt = tl.maximum(dt, DT_MIN)
    if HAS_DT_MAX:
        dt = tl.minimum(dt, DT_MAX)
    # fp32 whatever the clamps did: Triton 3.6's interpreter widens a tensor compared with a float constexpr to fp64,
    # which tl.dot then refuses beside fp32 operands (a no-op when compiled)
    return dt.to(tl.float32)


@triton.jit
def _program_prologue(A_ptr, D_ptr, dt_bias_ptr, ssm_state_ptr, cu_seqlens_ptr, context_lens_ptr, state_slots_ptr,
                      H: tl.constexpr, P: tl.constexpr, G: tl.constexpr, N: tl.constexpr, HAS_D: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """What both SSD kernels do first: program (sequence b, head h, channel block pb) -> its group, token range,
    per-head A / dt_bias / D, and the state tile (BLOCK_P, BLOCK_N) read from the sequence's slot in fp32.

    Returns (h, g, start, seqlen, offs_p, offs_n, pmask, nmask, A, dt_bias, Dh, state_base, state_offs, smask,
    state); Dh is 0 when HAS_D is False (never read then)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    pb = tl.program_id(2)
    g = h // (H // G)  # repeat_interleave order: consecutive heads share a group
    start = tl.load(cu_seqlens_ptr + b)
    seqlen = tl.load(cu_seqlens_ptr + b + 1) - start
    ctx = tl.load(context_lens_ptr + b)
    slot = tl.load(state_slots_ptr + b).to(tl.int64)

    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < P
    nmask = offs_n < N
    A = tl.load(A_ptr + h).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32)
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)
    else:
        Dh = 0.0

    # 64-bit scalar bases, 32-bit vector offsets (num_tokens * H * P < 2**31): half the address registers.
    state_base = (slot * H + h) * P * N
    state_offs = offs_p[:, None] * N + offs_n[None, :]
    smask = pmask[:, None] & nmask[None, :]
    p_lo = tl.where(ctx > 0, 0, P)  # context_len 0: a zero initial state whatever the slot holds
    state = tl.load(ssm_state_ptr + state_base + state_offs, mask=smask & (offs_p >= p_lo)[:, None],
                    other=0.0).to(tl.float32)
    return (h, g, start, seqlen, offs_p, offs_n, pmask, nmask, A, dt_bias, Dh, state_base, state_offs, smask,
            state)


@triton.jit
def _store_state(ssm_state_out_ptr, state, state_base, state_offs, smask, offs_p, seqlen, P: tl.constexpr):
    """Write the final state back to the slot it was read from (in place: after a barrier, so every read of the
    old state in this program is done); an empty sequence leaves its slot untouched, as the reference does."""
    tl.debug_barrier()
    n_write = tl.where(seqlen > 0, P, 0)
    tl.store(ssm_state_out_ptr + state_base + state_offs, state.to(ssm_state_out_ptr.dtype.element_ty),
             mask=smask & (offs_p < n_write)[:, None])


@triton.jit
def ssd_chunked_kernel(
    # inputs (the spec's order)
    x_ptr,  # (num_tokens, H, P)
    dt_ptr,  # (num_tokens, H) raw
    A_ptr,  # (H,) fp32
    B_ptr,  # (num_tokens, G, N)
    C_ptr,  # (num_tokens, G, N)
    D_ptr,  # (H,) fp32 (dummy when HAS_D is False)
    dt_bias_ptr,  # (H,) fp32
    ssm_state_ptr,  # (num_slots, H, P, N), read
    cu_seqlens_ptr,  # (num_seqs+1,) int32
    context_lens_ptr,  # (num_seqs,) int32
    state_slots_ptr,  # (num_seqs,) int32
    # outputs
    y_ptr,  # (num_tokens, H, P)
    ssm_state_out_ptr,  # aliases ssm_state_ptr: written in place
    H: tl.constexpr,
    P: tl.constexpr,
    G: tl.constexpr,
    N: tl.constexpr,
    HAS_D: tl.constexpr,
    DT_MIN: tl.constexpr,
    HAS_DT_MAX: tl.constexpr,  # False: no upper limit (time_step_limit[1] = inf); DT_MAX is then not read
    DT_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr,  # the kernel's chunk length
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    """Chunked SSD scan of one sequence x one head x BLOCK_P channels; the state (BLOCK_P, N) stays in registers.

    Per chunk of BLOCK_T tokens (a_t = dt_t * A, a_cum its inclusive cumsum in the chunk, S the state entering it):
        y      = (C @ S^T) * exp(a_cum)                                 # inter-chunk: the carried state
               + ((C @ B^T) * exp(a_cum_i - a_cum_j) [j <= i]) @ (x*dt)  # intra-chunk: the quadratic (SSD) form
               + D * x
        S_next = exp(a_cum_last) * S + ((x*dt) * exp(a_cum_last - a_cum))^T @ B
    which is ssd_minimal's four steps with the inter-chunk recurrence run sequentially inside the program.
    Fused in one launch (mamba_ssm uses five: dt cumsum, chunk states, state passing, CB bmm, chunk scan):
    dt softplus/bias/clamp, the D skip, the initial state read from the slot and the final state written back,
    so x, B, C are read once and no per-chunk state ever goes to memory. The price: parallelism is
    num_seqs x H x P/BLOCK_P programs (48 per sequence for the 7B), enough for batched prefill, thin for one
    long prompt. The chunk length is a tiling choice: the result equals the recurrence for any chunk length.
    """
    (h, g, start, seqlen, offs_p, offs_n, pmask, nmask, A, dt_bias, Dh, state_base, state_offs, smask,
     state) = _program_prologue(A_ptr, D_ptr, dt_bias_ptr, ssm_state_ptr, cu_seqlens_ptr, context_lens_ptr,
                                state_slots_ptr, H, P, G, N, HAS_D, BLOCK_P, BLOCK_N)
    x_base = x_ptr + start.to(tl.int64) * H * P + h * P
    y_base = y_ptr + start.to(tl.int64) * H * P + h * P
    B_base = B_ptr + start.to(tl.int64) * G * N + g * N
    C_base = C_ptr + start.to(tl.int64) * G * N + g * N
    dt_base = dt_ptr + start.to(tl.int64) * H + h

    for t0 in range(0, seqlen, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < seqlen
        dt_raw = tl.load(dt_base + t * H, mask=tmask, other=0.0).to(tl.float32)
        dt = _dt_transform(dt_raw, dt_bias, DT_MIN, HAS_DT_MAX, DT_MAX)
        dt = tl.where(tmask, dt, 0.0)  # padding tokens: no decay (exp(0) = 1) and no input
        a_cum = tl.cumsum(dt * A, axis=0)  # (BLOCK_T,)
        # The chunk's total decay IS the running sum's last element (padding adds 0): a separate tl.sum adds in
        # another order, and at extreme dt the state handed on would disagree with the outputs inside the chunk.
        a_last = tl.sum(tl.where(tl.arange(0, BLOCK_T) == BLOCK_T - 1, a_cum, 0.0), axis=0)

        xp_mask = tmask[:, None] & pmask[None, :]
        x = tl.load(x_base + t[:, None] * (H * P) + offs_p[None, :], mask=xp_mask, other=0.0).to(tl.float32)
        bc_offs = t[:, None] * (G * N) + offs_n[None, :]
        bc_mask = tmask[:, None] & nmask[None, :]
        # B and C stay in their input dtype: C @ B^T runs on bf16 tensor cores for bf16 models (fp32 accumulate).
        Bm = tl.load(B_base + bc_offs, mask=bc_mask, other=0.0)
        Cm = tl.load(C_base + bc_offs, mask=bc_mask, other=0.0)
        xdt = x * dt[:, None]

        y = tl.dot(Cm.to(tl.float32), tl.trans(state)) * tl.exp(a_cum)[:, None]  # (T, P), fp32 state (tf32 MMA)
        CB = tl.dot(mma_operand(Cm), tl.trans(mma_operand(Bm))).to(tl.float32)  # (T, T)
        causal = t[:, None] >= t[None, :]
        seg = tl.where(causal, a_cum[:, None] - a_cum[None, :], float("-inf"))
        y += tl.dot(CB * tl.exp(seg), xdt)
        if HAS_D:
            y += Dh * x
        tl.store(y_base + t[:, None] * (H * P) + offs_p[None, :], y.to(y_ptr.dtype.element_ty), mask=xp_mask)

        decay = tl.exp(a_last - a_cum)  # (T,)
        state = state * tl.exp(a_last) + tl.dot(tl.trans(xdt * decay[:, None]), Bm.to(tl.float32))  # (P, N)

    _store_state(ssm_state_out_ptr, state, state_base, state_offs, smask, offs_p, seqlen, P)


@triton.jit
def ssd_recurrent_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, ssm_state_ptr, cu_seqlens_ptr, context_lens_ptr,
    state_slots_ptr,
    y_ptr, ssm_state_out_ptr,
    H: tl.constexpr,
    P: tl.constexpr,
    G: tl.constexpr,
    N: tl.constexpr,
    HAS_D: tl.constexpr,
    DT_MIN: tl.constexpr,
    HAS_DT_MAX: tl.constexpr,  # False: no upper limit (time_step_limit[1] = inf); DT_MAX is then not read
    DT_MAX: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Token-by-token recurrence (same arguments as ssd_chunked_kernel): the decode step.

    S = exp(dt*A) * S + dt * x outer B;  y = S @ C + D * x, for each token of the sequence in turn.
    Correct for any batch, fastest when every sequence has one token (decode): then it is one read and one write
    of the state (the whole cost: 3 MiB fp32 per sequence per layer for the 7B) with dt transform, D skip and
    the slot gather/scatter fused, and num_seqs x H x P/BLOCK_P programs to spread that traffic over the GPU.
    """
    (h, g, start, seqlen, offs_p, offs_n, pmask, nmask, A, dt_bias, Dh, state_base, state_offs, smask,
     state) = _program_prologue(A_ptr, D_ptr, dt_bias_ptr, ssm_state_ptr, cu_seqlens_ptr, context_lens_ptr,
                                state_slots_ptr, H, P, G, N, HAS_D, BLOCK_P, BLOCK_N)

    for i in range(0, seqlen):
        tok = (start + i).to(tl.int64)
        dt = _dt_transform(tl.load(dt_ptr + tok * H + h).to(tl.float32), dt_bias, DT_MIN, HAS_DT_MAX, DT_MAX)
        x = tl.load(x_ptr + (tok * H + h) * P + offs_p, mask=pmask, other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + (tok * G + g) * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + (tok * G + g) * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
        state = state * tl.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
        y = tl.sum(state * Cv[None, :], axis=1)
        if HAS_D:
            y += Dh * x
        tl.store(y_ptr + (tok * H + h) * P + offs_p, y.to(y_ptr.dtype.element_ty), mask=pmask)

    _store_state(ssm_state_out_ptr, state, state_base, state_offs, smask, offs_p, seqlen, P)


# ----------------------------------------------------------------------------------------------------------------
# The declaration (plugins/spec.py): every backend's view of this op, and its tiles
# ----------------------------------------------------------------------------------------------------------------
from trtfalcon.plugins.spec import (  # noqa: E402
    FLOATS, Attr, KernelContext, KernelSpec, OpSpec, OutputArg, TensorArg, cdiv, cexpr, dim, int32_input, pow2,
)


def ssd_kernel_chunk(chunk_size: int, d_state: int) -> int:
    """The chunked kernel's chunk length: the model's chunk_size capped where the per-program tiles
    (chunk x d_state for B and C, plus the state) would spill registers; at least 16 (tl.dot's minimum).
    The scan's result does not depend on it (the chunked form equals the recurrence for any chunk length)."""
    cap = 64 if d_state <= 64 else 16  # for d_state 256: no register spill on sm_90 in fp32 and bf16
    return max(16, min(cap, pow2(chunk_size)))


def _common_constexprs(c: KernelContext) -> dict[str, Any]:
    H, P, N = c.dim("x", 1), c.dim("x", 2), c.dim("B", 2)
    dt_max = c.attrs["dt_max"]
    return dict(
        H=H, P=P, G=c.dim("B", 1), N=N, HAS_D=c.present["D"], DT_MIN=float(c.attrs["dt_min"]),
        # an explicit flag: 0 is a legal upper limit; DT_MAX stays finite (and the AOT manifest valid JSON)
        HAS_DT_MAX=dt_max != float("inf"), DT_MAX=float(dt_max) if dt_max != float("inf") else 0.0,
        BLOCK_N=pow2(N),
    )


_GRID = (dim("context_lens", 0), dim("x", 1), cdiv(dim("x", 2), cexpr("BLOCK_P")))

SSD = OpSpec(
    name="ssd",
    doc=__doc__ or "",
    inputs=(
        TensorArg("x", ("num_tokens", "H", "P"), FLOATS),
        TensorArg("dt", ("num_tokens", "H"), FLOATS),
        TensorArg("A", ("H",), ("float32",)),
        TensorArg("B", ("num_tokens", "G", "N"), FLOATS),
        TensorArg("C", ("num_tokens", "G", "N"), FLOATS),
        TensorArg("D", ("H",), ("float32",), optional=True, fill=0.0),
        TensorArg("dt_bias", ("H",), ("float32",)),
        TensorArg("ssm_state", ("num_slots", "H", "P", "N"), ("float32", "bfloat16")),
        int32_input("cu_seqlens", ("num_seqs+1",)), int32_input("context_lens", ("num_seqs",)),
        int32_input("state_slots", ("num_seqs",)),
    ),
    outputs=(OutputArg("y", like="x"), OutputArg("ssm_state_out", like="ssm_state", alias="ssm_state")),
    attributes=(
        Attr("chunk_size", int, 256, "the model's chunk length; the kernel's chunk is ssd_kernel_chunk() of it"),
        Attr("dt_min", float, 0.0, "time_step_limit[0]", param="dt_limit", index=0),
        Attr("dt_max", float, float("inf"), "time_step_limit[1]; inf = no upper clamp", param="dt_limit", index=1),
    ),
    ref=ssd_varlen_ref,
    kernels=(
        KernelSpec(
            name="chunked",
            fn=ssd_chunked_kernel,
            grid=_GRID,
            constexprs=lambda c: dict(
                _common_constexprs(c), BLOCK_T=ssd_kernel_chunk(c.attrs["chunk_size"], c.dim("B", 2)),
                BLOCK_P=min(16 if c.dim("B", 2) > 64 else 32, pow2(c.dim("x", 2))),
            ),
            num_warps=lambda k: 8 if k["BLOCK_N"] >= 128 else 4,
            num_stages=1,  # software pipelining would double the live B/C/x tiles and spill
            doc="any batch (prefill chunks, decode tokens, mixed)",
        ),
        KernelSpec(
            name="recurrent",
            fn=ssd_recurrent_kernel,
            grid=_GRID,
            constexprs=lambda c: dict(_common_constexprs(c), BLOCK_P=min(16, pow2(c.dim("x", 2)))),
            num_warps=lambda k: 4,
            doc="any batch, token by token; chosen when num_tokens == num_seqs (decode)",
        ),
    ),
    # num_tokens == num_seqs: every sequence has one token in a decode step (the recurrent kernel is correct
    # for any batch, so an odd batch with the same counts is still computed right).
    select=lambda s: "recurrent" if s["x"][0] == s["context_lens"][0] else "chunked",
)
