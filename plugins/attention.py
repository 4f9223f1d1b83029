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

FP8 KV cache (kv_cache float8_e4m3fn, trtfalcon/checkpoint/deploy_fp8.py): k_scale, v_scale are the layer's fp32
scalars (shape ()) calibrated by ModelOpt; a row is written as fp8(clamp(k / k_scale, -448, 448)) (round to
nearest even, saturating, exactly quantize_fp8) and read as cache * k_scale (v likewise); absent scales mean 1.
Only an FP8 cache reads the scales: a bf16/fp32 cache ignores them (graph formats always pass them, as 1.0), so it
computes exactly what it did before they existed, with the very same kernel code.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from trtfalcon.checkpoint.deploy_fp8 import FP8_DTYPE, quantize_fp8


def to_cache(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """New K or V rows as the cache stores them: fp8(x / scale) saturated for an FP8 cache, else x cast."""
    if dtype == FP8_DTYPE:
        return quantize_fp8(x, scale if scale is not None else torch.ones((), device=x.device))
    return x.to(dtype)


def from_cache(c: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cache rows as fp32 values: cache * scale for an FP8 cache (the dequantization of to_cache), else as stored."""
    return c.float() * scale.float() if c.dtype == FP8_DTYPE and scale is not None else c.float()


def check_kv_scales(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """Both scales or neither, each an fp32 scalar: a half-given pair is a caller's bug, not a default."""
    if (k_scale is None) != (v_scale is None):
        state = {n: "absent" if t is None else "given" for n, t in (("k_scale", k_scale), ("v_scale", v_scale))}
        raise ValueError(f"paged_attention: k_scale and v_scale go together; found k_scale {state['k_scale']}, "
                         f"v_scale {state['v_scale']}")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is not None and (t.dim() != 0 or t.dtype != torch.float32):
            raise ValueError(f"paged_attention: {name} expected an fp32 scalar (shape ()), found {t.dtype} "
                             f"of shape {tuple(t.shape)}")


def paged_attention_ref(
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
        kv_cache[0, blocks, rows] = to_cache(k[s:e], kv_cache.dtype, k_scale)
        kv_cache[1, blocks, rows] = to_cache(v[s:e], kv_cache.dtype, v_scale)
        allpos = torch.arange(total)
        ab, ar = block_tables[b, allpos // block_size].long(), allpos % block_size
        keys = from_cache(kv_cache[0, ab, ar], k_scale).repeat_interleave(hq // hkv, dim=1)  # (total, Hq, D)
        vals = from_cache(kv_cache[1, ab, ar], v_scale).repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), keys) * scale
        causal = allpos[None, :] <= pos[:, None]  # (n, total)
        scores = scores.masked_fill(~causal[None], -torch.inf)
        out[s:e] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vals).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
from trtfalcon.plugins.triton_lang import mma_operand, tl, to_fp8e4m3, triton  # noqa: E402


@triton.jit
def _cache_value(x, scale, CACHE_TY: tl.constexpr, KV_FP8: tl.constexpr, HAS_KV_SCALE: tl.constexpr):
    """x -> the value the cache stores (to_cache above): fp8(clamp(x / scale, +-448)) for an FP8 cache, with an
    IEEE division (div_rn: Triton's `/` is approximate on the GPU, and a last-bit difference can flip an fp8 tie,
    so the cache would not hold exactly quantize_fp8's bytes); a plain cast otherwise."""
    if KV_FP8:
        if HAS_KV_SCALE:
            y = tl.div_rn(x.to(tl.float32), scale)
        else:
            y = x.to(tl.float32)
        return to_fp8e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
    else:
        return x.to(CACHE_TY)


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
    k_scale_ptr,  # () fp32, read when HAS_KV_SCALE (an FP8 cache; graph formats always pass it, 1.0 when unused)
    v_scale_ptr,  # () fp32
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
    KV_FP8: tl.constexpr,  # kv_cache is float8_e4m3fn
    HAS_KV_SCALE: tl.constexpr,  # an FP8 cache with k_scale / v_scale given (else 1: never read)
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
    FP8 cache: K/V stay in fp8 units inside the loops (fp8 -> bf16/fp32 is exact, so the tensor-core dot sees
    exactly the cached values) and the scales fold into the scores (qk_scale * k_scale) and the output
    (acc * v_scale): two multiplies per row instead of one per element. New tokens go through the same rounding
    as the cache rows they become (_cache_value), so the output does not depend on where the step was chunked.
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
    CACHE_TY: tl.constexpr = kv_cache_out_ptr.dtype.element_ty
    if HAS_KV_SCALE:
        k_scale = tl.load(k_scale_ptr).to(tl.float32)
        v_scale = tl.load(v_scale_ptr).to(tl.float32)
    else:
        k_scale = 1.0
        v_scale = 1.0
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
    tl.store(kv_cache_out_ptr + dst[:, None] + offs_d[None, :],
             _cache_value(k_new, k_scale, CACHE_TY, KV_FP8, HAS_KV_SCALE), mask=m_tt)
    tl.store(kv_cache_out_ptr + v_cache_off + dst[:, None] + offs_d[None, :],
             _cache_value(v_new, v_scale, CACHE_TY, KV_FP8, HAS_KV_SCALE), mask=m_tt)

    # Query rows: (token t_first + r // QG, head kvh * QG + r % QG).
    rows = tl.arange(0, BLOCK_M)
    q_tok = t_first + rows // QG
    row_valid = (rows < TOKENS_PER_TILE * QG) & (q_tok < seqlen)
    q_head = kvh * QG + rows % QG
    q_offs = ((start + q_tok).to(tl.int64) * HQ + q_head)[:, None] * HEAD_DIM + offs_d[None, :]
    # q stays in its dtype: for bf16 models both matmuls run on bf16 tensor cores with fp32 accumulation.
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None] & dmask[None, :], other=0.0)
    qk_scale = SCALE * 1.4426950408889634 * k_scale  # log2(e): softmax with exp2; k_scale: K in cache units

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
        # rounded through the cache dtype (and scale), as if read back from the cache (what the reference does)
        k = tl.load(k_ptr + src_j[:, None] + offs_d[None, :], mask=m_kv, other=0.0)
        v = tl.load(v_ptr + src_j[:, None] + offs_d[None, :], mask=m_kv, other=0.0)
        k = _cache_value(k, k_scale, CACHE_TY, KV_FP8, HAS_KV_SCALE).to(q.dtype)
        v = _cache_value(v, v_scale, CACHE_TY, KV_FP8, HAS_KV_SCALE).to(q.dtype)
        s = tl.dot(mma_operand(q), tl.trans(mma_operand(k))) * qk_scale
        visible = jmask[None, :] & (j[None, :] <= q_tok[:, None])
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * v_scale / l_safe[:, None]  # v_scale: V in cache units
    tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# The declaration (plugins/spec.py): every backend's view of this op, and its tiles
# ----------------------------------------------------------------------------------------------------------------
from trtfalcon.plugins.spec import (  # noqa: E402
    FLOATS, Attr, KernelContext, KernelSpec, OpSpec, OutputArg, TensorArg, cdiv, cexpr, dim, int32_input,
    mma_sync_only, pow2,
)


def _constexprs(block_m: int, block_n: int, mma_sync_tile: tuple[int, int]
                ) -> Callable[[KernelContext], dict[str, Any]]:
    def make(c: KernelContext) -> dict[str, Any]:
        hq, hkv, d = c.dim("q", 1), c.dim("k", 1), c.dim("q", 2)
        qg = hq // hkv
        scale = c.attrs["scale"] or d**-0.5
        # only an FP8 cache reads its scales: bf16/fp32 kernels stay the code they were (no loads, no division)
        fp8 = c.dtypes["kv_cache"] == "float8_e4m3fn"
        # fp32 operands take twice the registers: halve the key tile (and for heads wider than 128)
        bn = block_n // (2 if c.dtypes["q"] == "float32" else 1) // (2 if d > 128 else 1)
        rows = block_m
        if mma_sync_only(c.cc) and (fp8 or c.dtypes["q"] == "float32"):
            # fp8 -> bf16 conversions of K/V, or fp32 operands, beside register-held dot operands: at 7B heads the
            # default tile spills on sm_80/86/89/120 (ptxas -v, plugins/aot.py); mma_sync_tile = (rows, keys) caps
            rows, bn = min(rows, mma_sync_tile[0]), min(bn, mma_sync_tile[1])
        bm = max(rows, pow2(qg))
        return dict(HQ=hq, HKV=hkv, HEAD_DIM=d, SCALE=float(scale), TOKENS_PER_TILE=bm // qg,
                    BLOCK_TT=pow2(bm // qg), BLOCK_M=bm, BLOCK_N=max(16, bn), BLOCK_D=max(16, pow2(d)),
                    KV_FP8=fp8, HAS_KV_SCALE=fp8 and bool(c.present["k_scale"]))
    return make


_GRID = (cdiv(dim("q", 0), cexpr("TOKENS_PER_TILE")), dim("context_lens", 0), dim("k", 1))
_SCALARS = (("num_blocks", dim("kv_cache", 1)), ("block_size", dim("kv_cache", 2)),
            ("max_blocks", dim("block_tables", 1)))

PAGED_ATTENTION = OpSpec(
    name="paged_attention",
    doc=__doc__ or "",
    inputs=(
        TensorArg("q", ("num_tokens", "Hq", "D"), FLOATS),
        TensorArg("k", ("num_tokens", "Hkv", "D"), FLOATS),
        TensorArg("v", ("num_tokens", "Hkv", "D"), FLOATS),
        TensorArg("kv_cache", ("2", "num_blocks", "block_size", "Hkv", "D"), FLOATS + ("float8_e4m3fn",)),
        int32_input("block_tables", ("num_seqs", "max_blocks")), int32_input("cu_seqlens", ("num_seqs+1",)),
        int32_input("context_lens", ("num_seqs",)),
        # FP8 KV cache: cache = fp8(k / k_scale), read as cache * k_scale (checkpoint/deploy_fp8.py); 1.0 = unscaled
        TensorArg("k_scale", (), ("float32",), optional=True, fill=1.0),
        TensorArg("v_scale", (), ("float32",), optional=True, fill=1.0),
    ),
    outputs=(OutputArg("out", like="q"), OutputArg("kv_cache_out", like="kv_cache", alias="kv_cache")),
    attributes=(Attr("scale", float, 0.0, "softmax scale; 0 = head_dim ** -0.5",
                     encode=lambda s: float(s) if s is not None else 0.0, decode=lambda s: s or None),),
    ref=paged_attention_ref,
    kernels=(
        KernelSpec(name="prefill", fn=paged_attention_kernel, grid=_GRID, scalars=_SCALARS,
                   constexprs=_constexprs(64, 32, (32, 32)), num_warps=lambda k: 8 if k["BLOCK_M"] >= 64 else 4,
                   doc="any batch; 64 (token, head) rows per program (32 on sm_80/86/89/120 for FP8 caches and "
                       "fp32)"),
        KernelSpec(name="decode", fn=paged_attention_kernel, grid=_GRID, scalars=_SCALARS,
                   constexprs=_constexprs(16, 32, (16, 16)), num_warps=lambda k: 4,
                   doc="any batch; 16 rows per program, chosen when num_tokens == num_seqs"),
    ),
    select=lambda s: "decode" if s["q"][0] == s["context_lens"][0] else "prefill",
    check=lambda a: check_kv_scales(a["k_scale"], a["v_scale"]),
)
