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
