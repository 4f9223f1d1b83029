"""Paged attention with GQA over a paged KV cache, for a ragged batch of prefill chunks and decode tokens.

Layouts (the engine I/O contract, trtfalcon/runtime/contract.py):
    q:            (num_tokens, Hq, D)    RoPE already applied
    k, v:         (num_tokens, Hkv, D)   k with RoPE (and the folded key multiplier) applied
    kv_cache:     (2, num_blocks, block_size, Hkv, D)   [0] keys, [1] values; updated in place
    block_tables: (num_seqs, max_blocks_per_seq) int32  physical block of each logical block of a sequence
    cu_seqlens:   (num_seqs+1,) int32;  context_lens: (num_seqs,) int32 tokens already cached
Token i of sequence b sits at position p = context_lens[b] + i: its k/v are written to block
block_tables[b, p // block_size], row p % block_size, and it attends to positions 0..p (causal).
Returns (num_tokens, Hq, D) in q's dtype; softmax in fp32, scale = D**-0.5 unless given.
"""

from __future__ import annotations

import torch


def paged_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    num_tokens, hq, d = q.shape
    hkv = k.shape[1]
    block_size = kv_cache.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        s, e = cu[b], cu[b + 1]
        n = e - s
        if n == 0:
            continue
        total = ctx + n
        pos = torch.arange(ctx, total)
        blocks = block_tables[b, pos // block_size].long()
        rows = pos % block_size
        kv_cache[0, blocks, rows] = k[s:e].to(kv_cache.dtype)
        kv_cache[1, blocks, rows] = v[s:e].to(kv_cache.dtype)
        allpos = torch.arange(total)
        ab, ar = block_tables[b, allpos // block_size].long(), allpos % block_size
        keys = kv_cache[0, ab, ar].float().repeat_interleave(hq // hkv, dim=1)  # (total, Hq, D)
        vals = kv_cache[1, ab, ar].float().repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), keys) * scale
        causal = allpos[None, :] <= pos[:, None]  # (n, total)
        scores = scores.masked_fill(~causal[None], -torch.inf)
        out[s:e] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vals).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
from trtfalcon.plugins._triton import mma_operand, tl, triton  # noqa: E402


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v):
    """One FlashAttention-2 update with base-2 scores s (BLOCK_M, BLOCK_N) and values v (BLOCK_N, BLOCK_D)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at zero
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(mma_operand(p.to(v.dtype)), mma_operand(v))
    return acc, m_new, l_i


@triton.jit
def paged_attention_kernel(
    # inputs (the spec's order)
    q_ptr,  # (num_tokens, HQ, HEAD_DIM)
    k_ptr,  # (num_tokens, HKV, HEAD_DIM)
    v_ptr,  # (num_tokens, HKV, HEAD_DIM)
    kv_cache_ptr,  # (2, num_blocks, block_size, HKV, HEAD_DIM), read
    block_tables_ptr,  # (num_seqs, max_blocks) int32
    cu_seqlens_ptr,  # (num_seqs+1,) int32
    context_lens_ptr,  # (num_seqs,) int32
    # scalars (shape expressions)
    num_blocks,
    block_size,
    max_blocks,
    # outputs
    out_ptr,  # (num_tokens, HQ, HEAD_DIM)
    kv_cache_out_ptr,  # aliases kv_cache_ptr: the new K/V rows are written in place
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SCALE: tl.constexpr,
    TOKENS_PER_TILE: tl.constexpr,  # = BLOCK_M // (HQ // HKV)
    BLOCK_TT: tl.constexpr,  # next power of two >= TOKENS_PER_TILE
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program = TOKENS_PER_TILE query tokens of one sequence x all HQ/HKV query heads of one KV head.

    GQA packing: the BLOCK_M rows of the tile are (token, query head of the group) pairs, so every K/V row is
    loaded once for the whole group (6 query heads per KV head in the 7B) and decode still fills the MMA rows.
    Two passes, FlashAttention-2 style online softmax in fp32 (exp2, scale folded with log2 e):
      1. positions 0..context_len-1 from the paged cache (block_tables gather), no mask needed (all in the past);
      2. this step's new tokens straight from the k/v inputs, causal mask.
    Reading new tokens from the inputs rather than the cache is what makes the fused cache write safe: each
    program writes the K/V of its own tokens, and no program reads a cache row written in the same step, so
    there is no race between programs and no second kernel. (Blocks receiving new rows must be owned by this
    sequence alone; copy-on-write for shared prefixes is the cache manager's job.)
    RoPE stays outside: the model applies it with plain ops, where it fuses with the QKV projection's epilogue
    in TensorRT; fusing it here would force positions and the rope cache into the plugin for no bandwidth gain.
    """
    pm = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    QG: tl.constexpr = HQ // HKV
    start = tl.load(cu_seqlens_ptr + b)
    seqlen = tl.load(cu_seqlens_ptr + b + 1) - start
    ctx = tl.load(context_lens_ptr + b)
    t_first = pm * TOKENS_PER_TILE
    tile_valid = t_first < seqlen

    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    kv_stride_tok: tl.constexpr = HKV * HEAD_DIM
    v_cache_off = num_blocks.to(tl.int64) * block_size * kv_stride_tok  # kv_cache[1]

    # Write this tile's new K/V rows into their blocks: position context_len + i -> block_tables[b, pos // bs].
    tt = t_first + tl.arange(0, BLOCK_TT)
    tt_mask = (tl.arange(0, BLOCK_TT) < TOKENS_PER_TILE) & (tt < seqlen)
    pos_new = ctx + tt
    blk_new = tl.load(block_tables_ptr + b * max_blocks + pos_new // block_size, mask=tt_mask, other=0).to(tl.int64)
    dst = (blk_new * block_size + pos_new % block_size) * kv_stride_tok + kvh * HEAD_DIM
    src = (start + tt).to(tl.int64) * kv_stride_tok + kvh * HEAD_DIM
    m_tt = tt_mask[:, None] & dmask[None, :]
    k_new = tl.load(k_ptr + src[:, None] + offs_d[None, :], mask=m_tt, other=0.0)
    v_new = tl.load(v_ptr + src[:, None] + offs_d[None, :], mask=m_tt, other=0.0)
    tl.store(kv_cache_out_ptr + dst[:, None] + offs_d[None, :], k_new.to(kv_cache_out_ptr.dtype.element_ty), mask=m_tt)
    tl.store(kv_cache_out_ptr + v_cache_off + dst[:, None] + offs_d[None, :], v_new.to(kv_cache_out_ptr.dtype.element_ty), mask=m_tt)

    # Query rows: (token t_first + r // QG, head kvh * QG + r % QG).
    rows = tl.arange(0, BLOCK_M)
    q_tok = t_first + rows // QG
    row_valid = (rows < TOKENS_PER_TILE * QG) & (q_tok < seqlen)
    q_head = kvh * QG + rows % QG
    q_offs = ((start + q_tok).to(tl.int64) * HQ + q_head)[:, None] * HEAD_DIM + offs_d[None, :]
    # q stays in its dtype: for bf16 models both matmuls run on bf16 tensor cores with fp32 accumulation.
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None] & dmask[None, :], other=0.0)
    qk_scale = SCALE * 1.4426950408889634  # log2(e): softmax with exp2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # 1. cached positions 0 .. context_len-1 (none for a program past its sequence's end)
    hi_cached = tl.where(tile_valid, ctx, 0)
    for n0 in range(0, hi_cached, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < hi_cached
        blk = tl.load(block_tables_ptr + b * max_blocks + pos // block_size, mask=pmask, other=0).to(tl.int64)
        row_off = (blk * block_size + pos % block_size) * kv_stride_tok + kvh * HEAD_DIM
        m_kv = pmask[:, None] & dmask[None, :]
        k = tl.load(kv_cache_ptr + row_off[:, None] + offs_d[None, :], mask=m_kv, other=0.0).to(q.dtype)
        v = tl.load(kv_cache_ptr + v_cache_off + row_off[:, None] + offs_d[None, :], mask=m_kv, other=0.0).to(q.dtype)
        s = tl.dot(mma_operand(q), tl.trans(mma_operand(k))) * qk_scale
        s = tl.where(pmask[None, :], s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v)

    # 2. this step's tokens 0 .. last token of the tile, causal
    hi_new = tl.where(tile_valid, tl.minimum(seqlen, t_first + TOKENS_PER_TILE), 0)
    for n0 in range(0, hi_new, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        jmask = j < hi_new
        src_j = (start + j).to(tl.int64) * kv_stride_tok + kvh * HEAD_DIM
        m_kv = jmask[:, None] & dmask[None, :]
        # rounded through the cache dtype, as if read back from the cache (what the reference does)
        k = tl.load(k_ptr + src_j[:, None] + offs_d[None, :], mask=m_kv, other=0.0).to(kv_cache_ptr.dtype.element_ty).to(q.dtype)
        v = tl.load(v_ptr + src_j[:, None] + offs_d[None, :], mask=m_kv, other=0.0).to(kv_cache_ptr.dtype.element_ty).to(q.dtype)
        s = tl.dot(mma_operand(q), tl.trans(mma_operand(k))) * qk_scale
        visible = jmask[None, :] & (j[None, :] <= q_tok[:, None])
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dmask[None, :])
