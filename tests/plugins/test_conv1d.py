import pytest
import torch

from trtfalcon.plugins.conv1d import causal_conv1d_ref, causal_conv1d_varlen_ref
from trtfalcon.plugins.ops import get_ops

from plugin_helpers import TOL, ragged

TRITON = get_ops("triton")

# (lens, context_lens, slots): prefill from zero, chunked prefill with history, decode, an empty sequence,
# sequences shorter than the state (d_conv - 1), a reused slot whose old contents must be ignored (ctx 0).
BATCHES = [
    ([7], [0], [1]),
    ([5, 1, 0, 9], [0, 3, 2, 7], [2, 0, 4, 1]),
    ([1, 1, 1], [4, 9, 2], [3, 0, 5]),
    ([2, 1, 12], [0, 0, 5], [5, 2, 3]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("with_bias,activation", [(True, True), (False, True), (True, False)])
def test_conv1d_matches_reference(dtype, batch, with_bias, activation):
    lens, ctx, slots = batch
    conv_dim, k, num_slots = 40, 4, 6
    cu, ctx_t, slots_t = ragged(lens, ctx, slots)
    x = torch.randn(sum(lens), conv_dim).to(dtype)
    w = torch.randn(conv_dim, k).to(dtype)
    b = torch.randn(conv_dim).to(dtype) if with_bias else None
    state = torch.randn(num_slots, conv_dim, k - 1).to(dtype)
    s_ref, s_tri = state.clone(), state.clone()
    y_ref = causal_conv1d_varlen_ref(x, w, b, s_ref, cu, ctx_t, slots_t, activation)
    y_tri = TRITON.causal_conv1d(x, w, b, s_tri, cu, ctx_t, slots_t, activation)
    torch.testing.assert_close(y_tri.float(), y_ref.float(), **TOL[dtype])
    torch.testing.assert_close(s_tri.float(), s_ref.float(), **TOL[dtype])
    untouched = [s for s in range(num_slots) if s not in slots]
    assert torch.equal(s_tri[untouched], state[untouched]), "slots outside the batch must not change"


def test_conv1d_7b_width_against_loop():
    """The 7B's conv_dim (3584) and d_conv 4, a few tokens, checked against a loop over the sequences."""
    conv_dim, k = 3584, 4
    lens, ctx, slots = [3, 1], [0, 5], [1, 0]
    cu, ctx_t, slots_t = ragged(lens, ctx, slots)
    x = torch.randn(sum(lens), conv_dim, dtype=torch.bfloat16)
    w, b = torch.randn(conv_dim, k, dtype=torch.bfloat16), torch.randn(conv_dim, dtype=torch.bfloat16)
    state = torch.randn(2, conv_dim, k - 1, dtype=torch.bfloat16)
    s_tri = state.clone()
    y_tri = TRITON.causal_conv1d(x, w, b, s_tri, cu, ctx_t, slots_t)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        hist = state[slots[i]] if ctx[i] > 0 else None
        y, new_state = causal_conv1d_ref(x[s:e], w, b, hist)
        torch.testing.assert_close(y_tri[s:e].float(), y.float(), **TOL[torch.bfloat16])
        torch.testing.assert_close(s_tri[slots[i]].float(), new_state.float(), **TOL[torch.bfloat16])


def test_conv1d_prefill_then_decode_equals_one_prefill():
    conv_dim, k, n = 24, 4, 11
    x = torch.randn(n, conv_dim)
    w, b = torch.randn(conv_dim, k), torch.randn(conv_dim)
    full_state = torch.zeros(1, conv_dim, k - 1)
    y_full = TRITON.causal_conv1d(x, w, b, full_state, *ragged([n], [0]))
    state = torch.zeros(1, conv_dim, k - 1)
    parts = [TRITON.causal_conv1d(x[:6], w, b, state, *ragged([6], [0]))]
    for i in range(6, n):
        parts.append(TRITON.causal_conv1d(x[i:i + 1], w, b, state, *ragged([1], [i])))
    torch.testing.assert_close(torch.cat(parts), y_full, **TOL[torch.float32])
    torch.testing.assert_close(state, full_state, **TOL[torch.float32])
