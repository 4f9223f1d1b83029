import pytest
import torch

from trtfalcon.plugins.attention import paged_attention_ref
from trtfalcon.plugins.ops import get_ops
from trtfalcon.plugins.spec import PAGED_ATTENTION, launch

from plugin_helpers import TOL, ragged

TRITON = get_ops("triton")


def make_cache(num_seqs, max_blocks, num_blocks, block_size, hkv, d, dtype):
    cache = torch.randn(2, num_blocks, block_size, hkv, d).to(dtype)
    perm = torch.randperm(num_blocks)[: num_seqs * max_blocks]  # distinct physical blocks, shuffled
    return cache, perm.reshape(num_seqs, max_blocks).to(torch.int32)


BATCHES = [
    ([9], [0]),  # prefill from nothing
    ([5, 1, 0, 13], [0, 3, 2, 7]),  # prefill, decode, empty, chunked prefill after cached blocks
    ([1, 1, 1], [4, 17, 0]),  # decode only (dispatches to the decode kernel)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("heads", [(4, 2, 16), (6, 2, 32), (4, 4, 16)])
def test_paged_attention_matches_reference(dtype, batch, heads):
    lens, ctx = batch
    hq, hkv, d = heads
    block_size, max_blocks = 4, 8
    cu, ctx_t, _ = ragged(lens, ctx)
    n = sum(lens)
    q, k, v = (torch.randn(n, h, d).to(dtype) for h in (hq, hkv, hkv))
    cache, tables = make_cache(len(lens), max_blocks, 40, block_size, hkv, d, dtype)
    c_ref, c_tri = cache.clone(), cache.clone()
    o_ref = paged_attention_ref(q, k, v, c_ref, tables, cu, ctx_t)
    o_tri = TRITON.paged_attention(q, k, v, c_tri, tables, cu, ctx_t)
    torch.testing.assert_close(o_tri.float(), o_ref.float(), **TOL[dtype])
    assert torch.equal(c_tri, c_ref), "the new K/V rows (and nothing else) must be written into their blocks"


@pytest.mark.parametrize("kernel", ["prefill", "decode"])
def test_paged_attention_7b_heads(kernel):
    """The 7B's attention (12 query / 2 KV heads x 128), a few tokens, both kernels, against the reference."""
    lens, ctx = [3, 1], [5, 9]
    cu, ctx_t, _ = ragged(lens, ctx)
    n = sum(lens)
    q, k, v = (torch.randn(n, h, 128, dtype=torch.bfloat16) for h in (12, 2, 2))
    cache, tables = make_cache(2, 4, 10, 4, 2, 128, torch.bfloat16)
    c_ref, c_tri = cache.clone(), cache.clone()
    o_ref = paged_attention_ref(q, k, v, c_ref, tables, cu, ctx_t, scale=0.1)
    o_tri = launch(PAGED_ATTENTION, q, k, v, c_tri, tables, cu, ctx_t, scale=0.1, kernel=kernel)
    torch.testing.assert_close(o_tri.float(), o_ref.float(), **TOL[torch.bfloat16])
    assert torch.equal(c_tri, c_ref)


def test_paged_attention_prefill_then_decode_equals_one_prefill():
    hq, hkv, d, n, bs = 4, 2, 16, 14, 4
    q, k, v = (torch.randn(n, h, d) for h in (hq, hkv, hkv))
    tables = torch.tensor([[3, 0, 5, 1]], dtype=torch.int32)
    full = torch.zeros(2, 6, bs, hkv, d)
    o_full = TRITON.paged_attention(q, k, v, full, tables, *ragged([n], [0])[:2])
    cache = torch.zeros(2, 6, bs, hkv, d)
    parts = [TRITON.paged_attention(q[:6], k[:6], v[:6], cache, tables, *ragged([6], [0])[:2])]
    parts.append(TRITON.paged_attention(q[6:11], k[6:11], v[6:11], cache, tables, *ragged([5], [6])[:2]))
    for i in range(11, n):
        parts.append(TRITON.paged_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], cache, tables, *ragged([1], [i])[:2]))
    torch.testing.assert_close(torch.cat(parts), o_full, **TOL[torch.float32])
    torch.testing.assert_close(cache, full)
