"""The vectorized torch ops (the torch executor's CPU path) equal the loop references on ragged batches."""

import pytest
import torch

from trtfalcon.plugins.attention import paged_attention_ref
from trtfalcon.plugins.conv1d import causal_conv1d_varlen_ref
from trtfalcon.plugins.ssd import ssd_varlen_ref
from trtfalcon.plugins.torch_batched import causal_conv1d_batched, paged_attention_batched, ssd_batched

# (tokens this step, tokens already cached) per sequence: decode, fresh prefill, continued chunk, fresh 1-token
MIXES = {
    "decode_only": [(1, 5), (1, 9), (1, 1), (1, 17)],
    "mixed": [(1, 5), (7, 0), (1, 0), (9, 12), (1, 30), (2, 3)],
}


def _batch(mix, num_slots, g):
    lens = torch.tensor([n for n, _ in mix])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lens, 0).int()])
    ctx = torch.tensor([c for _, c in mix], dtype=torch.int32)
    slots = torch.randperm(num_slots, generator=g)[: len(mix)].int()
    return cu, ctx, slots


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d(mix, dtype):
    g = torch.Generator().manual_seed(0)
    cu, ctx, slots = _batch(MIXES[mix], 8, g)
    T, C, K = int(cu[-1]), 12, 4
    x = torch.randn(T, C, generator=g).to(dtype)
    w, b = torch.randn(C, K, generator=g), torch.randn(C, generator=g)
    state = torch.randn(8, C, K - 1, generator=g).to(dtype)
    s1, s2 = state.clone(), state.clone()
    y1 = causal_conv1d_varlen_ref(x, w, b, s1, cu, ctx, slots)
    y2 = causal_conv1d_batched(x, w, b, s2, cu, ctx, slots)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y2, y1, atol=tol, rtol=tol)
    torch.testing.assert_close(s2, s1, atol=tol, rtol=tol)  # slots outside the batch untouched in both


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_ssd(mix, state_dtype):
    g = torch.Generator().manual_seed(1)
    cu, ctx, slots = _batch(MIXES[mix], 8, g)
    T, H, P, G, N = int(cu[-1]), 4, 8, 2, 16
    x, dt = torch.randn(T, H, P, generator=g), torch.randn(T, H, generator=g)
    A, D, dtb = -torch.rand(H, generator=g) - 0.5, torch.randn(H, generator=g), torch.randn(H, generator=g)
    B, C = torch.randn(T, G, N, generator=g), torch.randn(T, G, N, generator=g)
    state = torch.randn(8, H, P, N, generator=g).to(state_dtype)
    s1, s2 = state.clone(), state.clone()
    y1 = ssd_varlen_ref(x, dt, A, B, C, D, dtb, s1, cu, ctx, slots, 4, (0.0, float("inf")))
    y2 = ssd_batched(x, dt, A, B, C, D, dtb, s2, cu, ctx, slots, 4, (0.0, float("inf")))
    torch.testing.assert_close(y2, y1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s2, s1, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_paged_attention(mix):
    g = torch.Generator().manual_seed(2)
    cu, ctx, _ = _batch(MIXES[mix], 8, g)
    T, Hq, Hkv, D, bs, nblk = int(cu[-1]), 6, 2, 8, 4, 64
    q, k, v = torch.randn(T, Hq, D, generator=g), torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g)
    tables = torch.randperm(nblk, generator=g)[: len(MIXES[mix]) * 10].view(len(MIXES[mix]), 10).int()
    cache = torch.randn(2, nblk, bs, Hkv, D, generator=g)
    c1, c2 = cache.clone(), cache.clone()
    o1 = paged_attention_ref(q, k, v, c1, tables, cu, ctx)
    o2 = paged_attention_batched(q, k, v, c2, tables, cu, ctx)
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c2, c1)


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_fp8_cache(mix, dtype):
    """An FP8 (E4M3) cache with per-layer k/v scales: the same outputs and the same cache bytes as the reference;
    the scales are small enough that some new rows saturate at +-448."""
    g = torch.Generator().manual_seed(3)
    cu, ctx, _ = _batch(MIXES[mix], 8, g)
    T, Hq, Hkv, D, bs, nblk = int(cu[-1]), 6, 2, 8, 4, 64
    q, k, v = (torch.randn(T, h, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    tables = torch.randperm(nblk, generator=g)[: len(MIXES[mix]) * 10].view(len(MIXES[mix]), 10).int()
    cache = (torch.randn(2, nblk, bs, Hkv, D, generator=g) * 100).to(torch.float8_e4m3fn)
    k_scale, v_scale = torch.tensor(0.005), torch.tensor(0.02)  # |k| / 0.005 > 448 for |k| > 2.24
    c1, c2 = cache.clone(), cache.clone()
    o1 = paged_attention_ref(q, k, v, c1, tables, cu, ctx, None, k_scale, v_scale)
    o2 = paged_attention_batched(q, k, v, c2, tables, cu, ctx, None, k_scale, v_scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o2, o1, atol=tol, rtol=tol)
    assert torch.equal(c2.view(torch.uint8), c1.view(torch.uint8))
    assert (c1.float().abs() == 448).sum() > (cache.float().abs() == 448).sum(), "expected saturated new rows"
