import pytest
import torch

from trtfalcon.plugins.ops import get_ops
from trtfalcon.plugins.ssd import SSD, dt_transform, ssd_chunked_ref, ssd_recurrent_ref, ssd_varlen_ref

from plugin_helpers import TOL, ragged

TRITON = get_ops("triton")


def make_inputs(n, H, P, G, N, dtype, num_slots=6, state_dtype=torch.float32):
    x = torch.randn(n, H, P).to(dtype)
    dt = (torch.randn(n, H) - 1.0).to(dtype)
    A = -torch.rand(H) - 0.5
    B = torch.randn(n, G, N).to(dtype)
    C = torch.randn(n, G, N).to(dtype)
    D = torch.randn(H)
    dt_bias = torch.randn(H) * 0.5
    state = torch.randn(num_slots, H, P, N).to(state_dtype)
    return x, dt, A, B, C, D, dt_bias, state


def scaled_tol(dtype, ref):
    """Tolerances relative to the output's magnitude (SSD outputs grow with the state)."""
    t = TOL[dtype]
    scale = max(1.0, ref.float().abs().max().item())
    return dict(atol=t["atol"] * scale, rtol=t["rtol"])


def run_both(kernel, inputs, cu, ctx, slots, chunk_size, dt_limit):
    x, dt, A, B, C, D, dt_bias, state = inputs
    s_ref, s_tri = state.clone(), state.clone()
    y_ref = ssd_varlen_ref(x, dt, A, B, C, D, dt_bias, s_ref, cu, ctx, slots, chunk_size, dt_limit)
    from trtfalcon.plugins.spec import launch

    y_tri = launch(SSD, x, dt, A, B, C, D, dt_bias, s_tri, cu, ctx, slots, chunk_size, dt_limit, kernel=kernel)
    return y_ref, y_tri, s_ref, s_tri


# (lens, context_lens, slots): fresh prefill, chunked prefill from a state, decode, empty sequence, reused slot.
BATCHES = [
    ([37], [0], [2]),
    ([5, 1, 0, 23], [0, 3, 2, 7], [2, 0, 4, 1]),
    ([1, 1, 1], [4, 9, 2], [3, 0, 5]),
]


@pytest.mark.parametrize("kernel", ["chunked", "recurrent"])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("batch", BATCHES)
def test_ssd_matches_reference(kernel, dtype, state_dtype, batch):
    lens, ctx, slots = batch
    H, P, G, N = 4, 8, 2, 16
    inputs = make_inputs(sum(lens), H, P, G, N, dtype, state_dtype=state_dtype)
    cu, ctx_t, slots_t = ragged(lens, ctx, slots)
    y_ref, y_tri, s_ref, s_tri = run_both(kernel, inputs, cu, ctx_t, slots_t, 16, (0.0, float("inf")))
    torch.testing.assert_close(y_tri.float(), y_ref.float(), **scaled_tol(dtype, y_ref))
    tol = TOL[state_dtype] if state_dtype == torch.bfloat16 else TOL[dtype]
    torch.testing.assert_close(s_tri.float(), s_ref.float(), **scaled_tol(state_dtype if state_dtype == torch.bfloat16 else dtype, s_ref))
    del tol
    state = inputs[-1]
    untouched = [s for s in range(state.shape[0]) if s not in [sl for sl, n in zip(slots, lens) if n > 0]]
    assert torch.equal(s_tri[untouched], state[untouched]), "slots outside the batch (or with no tokens) must not change"


@pytest.mark.parametrize("chunk_size", [8, 16, 32, 64])
def test_ssd_chunk_sizes_and_dt_limit(chunk_size):
    """Several chunk sizes (the kernel's chunk is min(cap, chunk_size) rounded to >= 16) and a time_step_limit."""
    lens, ctx, slots = [45, 3], [0, 6], [1, 0]
    inputs = make_inputs(sum(lens), 4, 8, 1, 16, torch.float32)
    cu, ctx_t, slots_t = ragged(lens, ctx, slots)
    y_ref, y_tri, s_ref, s_tri = run_both("chunked", inputs, cu, ctx_t, slots_t, chunk_size, (0.05, 0.4))
    torch.testing.assert_close(y_tri, y_ref, **scaled_tol(torch.float32, y_ref))
    torch.testing.assert_close(s_tri, s_ref, **scaled_tol(torch.float32, s_ref))


@pytest.mark.parametrize("kernel", ["chunked", "recurrent"])
def test_ssd_7b_shapes_against_loop(kernel):
    """The 7B's Mamba shapes (H=24, P=128, N=256, G=1) on a few tokens, against a loop over the sequences."""
    H, P, G, N = 24, 128, 1, 256
    lens, ctx, slots = [3, 1], [0, 4], [1, 0]
    x, dt, A, B, C, D, dt_bias, state = make_inputs(sum(lens), H, P, G, N, torch.bfloat16, num_slots=2)
    cu, ctx_t, slots_t = ragged(lens, ctx, slots)
    s_tri = state.clone()
    from trtfalcon.plugins.spec import launch

    y_tri = launch(SSD, x, dt, A, B, C, D, dt_bias, s_tri, cu, ctx_t, slots_t, 256, kernel=kernel)
    dtt = dt_transform(dt, dt_bias, (0.0, float("inf")))
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        init = state[slots[i]] if ctx[i] > 0 else None
        y, final = ssd_recurrent_ref(x[s:e], dtt[s:e], A, B[s:e], C[s:e], D, init)
        torch.testing.assert_close(y_tri[s:e].float(), y, **scaled_tol(torch.bfloat16, y))
        torch.testing.assert_close(s_tri[slots[i]], final, **scaled_tol(torch.float32, final))


def test_chunked_scan_equals_recurrence():
    """The chunked form (reference and kernel, several chunk lengths) equals the token-by-token recurrence."""
    n, H, P, G, N = 50, 4, 8, 2, 16
    x, dt, A, B, C, D, dt_bias, state = make_inputs(n, H, P, G, N, torch.float32)
    dtt = dt_transform(dt, dt_bias, (0.0, float("inf")))
    y_rec, s_rec = ssd_recurrent_ref(x, dtt, A, B, C, D, state[0])
    for q in (8, 16, 64):
        y_chk, s_chk = ssd_chunked_ref(x, dtt, A, B, C, D, q, state[0])
        torch.testing.assert_close(y_chk, y_rec, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s_chk, s_rec, atol=1e-4, rtol=1e-4)
    pool = state.clone()
    y_tri = TRITON.ssd(x, dt, A, B, C, D, dt_bias, pool, *ragged([n], [1], [0]), 16)
    torch.testing.assert_close(y_tri, y_rec, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pool[0], s_rec, atol=1e-4, rtol=1e-4)


def test_ssd_prefill_then_decode_equals_one_prefill():
    """Chunked prefill (two chunks) then decode steps, through get_ops('triton') (dispatch by shape), equals one
    long prefill: outputs and final state."""
    n, H, P, G, N = 30, 4, 8, 2, 16
    x, dt, A, B, C, D, dt_bias, _ = make_inputs(n, H, P, G, N, torch.float32)
    full = torch.zeros(1, H, P, N)
    y_full = TRITON.ssd(x, dt, A, B, C, D, dt_bias, full, *ragged([n], [0]), 16)
    pool = torch.full((1, H, P, N), 7.0)  # garbage in the slot: context_len 0 must ignore it
    parts = []
    for s, e in ((0, 11), (11, 24)):
        parts.append(TRITON.ssd(x[s:e], dt[s:e], A, B[s:e], C[s:e], D, dt_bias, pool, *ragged([e - s], [s]), 16))
    for i in range(24, n):
        parts.append(TRITON.ssd(x[i:i + 1], dt[i:i + 1], A, B[i:i + 1], C[i:i + 1], D, dt_bias, pool,
                                *ragged([1], [i]), 16))
    torch.testing.assert_close(torch.cat(parts), y_full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pool, full, atol=1e-4, rtol=1e-4)
