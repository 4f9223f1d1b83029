import pytest
import torch

from trtfalcon.plugins.ops import get_ops
from trtfalcon.plugins.ssd import SSD, dt_transform, ssd_chunked_ref, ssd_recurrent_ref, ssd_varlen_ref

from plugin_helpers import TOL, ragged, scaled_tol

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


# ---- corners (issue 15): each test failed before its fix ----------------------------------------------------------
@pytest.mark.parametrize("kernel", ["chunked", "recurrent"])
@pytest.mark.parametrize("dt_limit", [(0.0, 0.0), (0.5, 0.5), (0.0, 1e-3)])
def test_ssd_upper_time_step_limit_of_zero_is_a_limit(kernel, dt_limit):
    """time_step_limit [0, 0] passes the config check and transformers clamps dt into it (dt = 0: the state never
    moves, y = C.S + D x). The kernels used to read an upper limit of 0 as 'no limit' (relative error ~1)."""
    lens, ctx, slots = [20, 1], [0, 5], [1, 0]
    inputs = make_inputs(sum(lens), 4, 8, 2, 16, torch.float32)
    cu, ctx_t, slots_t = ragged(lens, ctx, slots)
    y_ref, y_tri, s_ref, s_tri = run_both(kernel, inputs, cu, ctx_t, slots_t, 16, dt_limit)
    torch.testing.assert_close(y_tri, y_ref, **scaled_tol(torch.float32, y_ref))
    torch.testing.assert_close(s_tri, s_ref, **scaled_tol(torch.float32, s_ref))


@pytest.mark.parametrize("limit,has_max", [((0.0, 0.0), True), ((0.0, float("inf")), False), ((0.5, 0.5), True)])
def test_upper_time_step_limit_reaches_the_kernel_through_every_format(limit, has_max):
    """The upper limit travels as the attribute dt_max (+inf = none) in the ONNX node and the TensorRT plugin
    fields (float32: 0 and inf survive), and becomes the kernels' explicit HAS_DT_MAX flag: 0 is a limit."""
    import onnx

    from trtfalcon.export.onnx import plugin_node_attrs
    from trtfalcon.plugins.spec import KernelContext
    from trtfalcon.runtime.executors.onnxruntime import PluginKernel

    node = onnx.helper.make_node("ssd", [], [], domain="trtfalcon",
                                 **plugin_node_attrs(SSD, dict(chunk_size=256, dt_min=limit[0], dt_max=limit[1])))
    raw = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = PluginKernel(SSD, SSD.ref).attributes(raw)  # what onnxruntime's op and TensorRT's plugin fields get
    assert attrs["dt_max"] == limit[1]
    assert SSD.ref_arguments({i.name: None for i in SSD.inputs}, attrs)["dt_limit"] == limit
    dims = dict(x=(1, 4, 8), B=(1, 2, 16))
    for ks in SSD.kernels:
        c = ks.constexprs(KernelContext(attrs, {}, {"D": True}, lambda t, a: dims[t][a]))
        assert c["HAS_DT_MAX"] is has_max and (not has_max or c["DT_MAX"] == limit[1])


@pytest.mark.parametrize("kernel", ["chunked", "recurrent"])
def test_ssd_softplus_is_stable_for_large_negative_inputs(kernel):
    """dt_raw + dt_bias down to -30: softplus is exp(x) there (torch's log1p form); log(1 + exp(x)) rounds 1 + e
    (17% off at -15) and is 0 below -16.6, which stopped the state from taking any input."""
    n, H, P, G, N = 6, 4, 8, 1, 16
    x, _, A, B, C, _, _, state = make_inputs(n, H, P, G, N, torch.float32)
    dt = torch.tensor([-4.0, -9.0, -15.0, -17.0, -22.0, -30.0])[:, None].expand(n, H).contiguous()
    dt_bias = torch.zeros(H)
    for lens in ([n], [1] * n):
        cu, ctx_t, slots_t = ragged(lens, [0] * len(lens))
        y_ref, y_tri, s_ref, s_tri = run_both(kernel, (x, dt, A, B, C, None, dt_bias, state), cu, ctx_t, slots_t,
                                              16, (0.0, float("inf")))
        assert (y_ref != 0).all()
        torch.testing.assert_close(y_tri, y_ref, rtol=2e-5, atol=0.0)  # relative, however small the values
        torch.testing.assert_close(s_tri, s_ref, rtol=2e-5, atol=0.0)


def test_ssd_chunk_state_carries_the_decay_its_outputs_use():
    """At extreme dt (dt_bias 60, A -12: decays of e^-720 per token) the state a chunk hands on must be the one its
    own last output reads: y_last = C_last . S_next. The kernel used to take the chunk's total decay from a
    separate sum instead of the running sum's last element; the two orders disagree by ~1e-4 there."""
    n, H, P, G, N = 16, 4, 8, 1, 16
    x, dt, A, B, C, _, _, state = make_inputs(n, H, P, G, N, torch.float32)
    A = -torch.tensor([11.7, 12.3, 9.1, 12.9])
    dt_bias = torch.tensor([61.3, 57.9, 63.1, 59.4])
    dt = torch.rand(n, H) * 3.0
    pool = state.clone()
    y = TRITON.ssd(x, dt, A, B, C, None, dt_bias, pool, *ragged([n], [0], [0]), 16)
    y_from_state = torch.einsum("hpn,hn->hp", pool[0], C[-1].repeat_interleave(H // G, dim=0))
    torch.testing.assert_close(y[-1], y_from_state, rtol=1e-6, atol=1e-6 * y[-1].abs().max().item())
