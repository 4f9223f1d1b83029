"""Vectorized torch versions of the plugin ops: the CPU path of the torch executor (`kernels="torch"`).

The `*_ref` functions loop over the sequences of a ragged batch, which keeps them plainly correct but costs
a Python iteration (and several small ops) per sequence and layer: at batch 64 that dominates a CPU step. These
do the same work with a handful of batched ops per layer:
- conv1d: every sequence padded into one (num_seqs, conv_dim, d_conv-1 + max_len) tensor, one grouped conv;
- SSD: the decode sequences (one token each, the steady state of generation) advance their states in one batched
  recurrence step; prefill chunks still go through the chunked reference one sequence at a time;
- attention: new K/V scattered into their blocks at once; decode queries attend over their gathered, masked
  contexts in one batched product; prefill chunks one sequence at a time.
Same arguments, same in-place updates, same results as the references (tests/test_torch_batched_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtfalcon.plugins.attention import check_kv_scales, from_cache, to_cache
from trtfalcon.plugins.ssd import dt_transform, ssd_chunked_ref


def _token_index(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (lens (B,), seq_of_token (T,), offset_of_token (T,)) as int64."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.shape[0], device=cu.device), lens)
    offset = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][seq]
    return lens, seq, offset


def causal_conv1d_batched(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_lens: torch.Tensor,
    state_slots: torch.Tensor,
    activation: bool = True,
) -> torch.Tensor:
    num_tokens, c = x.shape
    k1 = weight.shape[1] - 1
    lens, seq, offset = _token_index(cu_seqlens)
    b = lens.shape[0]
    slots = state_slots.long()
    fresh = (context_lens == 0).view(b, 1, 1)
    hist = conv_state[slots].float().masked_fill(fresh, 0.0)  # (B, C, K-1): a new sequence starts from zeros
    lmax = int(lens.max()) if b else 0
    full = torch.zeros(b, c, k1 + lmax, dtype=torch.float32, device=x.device)
    full[:, :, :k1] = hist
    full[seq, :, k1 + offset] = x.float()
    out = F.conv1d(full, weight.float()[:, None, :], bias.float() if bias is not None else None, groups=c)
    out = out[seq, :, offset]  # output j of sequence b sees full[b, :, j : j + K]
    if activation:
        out = F.silu(out)
    # the last K-1 inputs of (history ++ tokens) sit at full[b, :, lens[b] : lens[b] + K-1]
    idx = (lens[:, None] + torch.arange(k1, device=x.device)[None]).unsqueeze(1).expand(b, c, k1)
    conv_state[slots] = torch.gather(full, 2, idx).to(conv_state.dtype)
    return out.to(x.dtype)


def ssd_batched(
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
    h, g = x.shape[1], B.shape[1]
    y = torch.empty_like(x)
    dt = dt_transform(dt, dt_bias, dt_limit)
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    decode = torch.nonzero(lens == 1).flatten()
    if decode.numel():
        tok = cu[:-1][decode]
        slots = state_slots.long()[decode]
        fresh = (context_lens[decode] == 0).view(-1, 1, 1, 1)
        s = ssm_state[slots].float().masked_fill(fresh, 0.0)  # (b, H, P, N)
        dtt, xt = dt[tok], x[tok].float()  # (b, H), (b, H, P)
        bt = B[tok].float().repeat_interleave(h // g, dim=1)  # (b, H, N): head h reads group h // (H/G)
        ct = C[tok].float().repeat_interleave(h // g, dim=1)
        s = s * torch.exp(dtt * A.float())[..., None, None] + (dtt[..., None] * xt)[..., None] * bt[:, :, None, :]
        yt = torch.einsum("bhpn,bhn->bhp", s, ct)
        if D is not None:
            yt = yt + D.float()[:, None] * xt
        y[tok] = yt.to(y.dtype)
        ssm_state[slots] = s.to(ssm_state.dtype)
    for bi in torch.nonzero(lens > 1).flatten().tolist():
        s0, e0 = int(cu[bi]), int(cu[bi + 1])
        slot = int(state_slots[bi])
        init = ssm_state[slot] if int(context_lens[bi]) > 0 else None
        yb, final = ssd_chunked_ref(x[s0:e0], dt[s0:e0], A, B[s0:e0], C[s0:e0], D, chunk_size, init)
        y[s0:e0] = yb.to(y.dtype)
        ssm_state[slot] = final.to(ssm_state.dtype)
    return y


def paged_attention_batched(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    check_kv_scales(k_scale, v_scale)
    num_tokens, hq, d = q.shape
    hkv = k.shape[1]
    bs = kv_cache.shape[2]
    scale = d**-0.5 if scale is None else scale
    tables = block_tables.long()
    ctx = context_lens.long()
    lens, seq, offset = _token_index(cu_seqlens)
    # 1. every new K/V into its block at once
    pos = ctx[seq] + offset  # (T,) position of each token in its sequence
    blk = tables[seq, pos // bs]
    kv_cache[0, blk, pos % bs] = to_cache(k, kv_cache.dtype, k_scale)  # fp8(k / k_scale) for an FP8 cache
    kv_cache[1, blk, pos % bs] = to_cache(v, kv_cache.dtype, v_scale)
    out = torch.empty_like(q)
    cu = cu_seqlens.long()
    # 2. decode sequences (one token each): one masked, batched attention over their gathered contexts
    decode = torch.nonzero(lens == 1).flatten()
    if decode.numel():
        tok = cu[:-1][decode]
        last = ctx[decode]  # (b,) the new token's position: it attends to 0..last
        out[tok] = _attend(q[tok][:, None], kv_cache, tables[decode], last[:, None], scale, k_scale,
                           v_scale)[:, 0]
    # 3. prefill chunks: one sequence at a time (causal within the chunk, full over the cached prefix)
    for bi in torch.nonzero(lens > 1).flatten().tolist():
        s0, e0 = int(cu[bi]), int(cu[bi + 1])
        qpos = torch.arange(int(ctx[bi]), int(ctx[bi]) + e0 - s0, device=q.device)
        out[s0:e0] = _attend(q[s0:e0][None], kv_cache, tables[bi:bi + 1], qpos[None], scale, k_scale,
                              v_scale)[0]
    return out


def _attend(q: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor, qpos: torch.Tensor, scale: float,
            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q: (b, n, Hq, D) at positions qpos (b, n); keys/values gathered from each row's blocks up to max(qpos),
    dequantized as cache * scale (attention.from_cache)."""
    b, n, hq, d = q.shape
    hkv, bs = kv_cache.shape[3], kv_cache.shape[2]
    lmax = int(qpos.max()) + 1
    allpos = torch.arange(lmax, device=q.device)
    ab = tables[:, allpos // bs]  # (b, Lmax); entries past a sequence's length are masked below
    keys = from_cache(kv_cache[0][ab, allpos % bs], k_scale)  # (b, Lmax, Hkv, D)
    vals = from_cache(kv_cache[1][ab, allpos % bs], v_scale)
    qg = q.float().view(b, n, hkv, hq // hkv, d)  # GQA: query head h uses kv head h // (Hq/Hkv)
    scores = torch.einsum("bnkgd,blkd->bnkgl", qg, keys) * scale
    causal = allpos[None, None, :] <= qpos[:, :, None]  # (b, n, Lmax)
    scores = scores.masked_fill(~causal[:, :, None, None, :], -torch.inf)
    o = torch.einsum("bnkgl,blkd->bnkgd", torch.softmax(scores, dim=-1), vals)
    return o.reshape(b, n, hq, d).to(q.dtype)
