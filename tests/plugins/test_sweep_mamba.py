"""Property-based sweep of the Mamba plugin kernels: causal conv1d, SSD (chunked and recurrent), gated RMSNorm.

Each draw is a config a Falcon-H1 model may have (sizes, groups, every time_step_limit including zero and equal
limits, dt_bias and A at their extremes, D and bias present or absent) and a ragged batch (sequence lengths of 0,
1, the kernel's chunk +- 1 and several chunks, fresh sequences in reused slots whose old contents must be ignored,
sequences continuing from their slot's state). It runs the Triton kernel (interpreted on the CPU) and checks it
against the op's `*_ref` AND against a plain definition written here, in float64, from the papers' equations,
so that a defect shared by a kernel and its reference is caught too.

CI runs a fixed, bounded set of draws; `TRTFALCON_KERNEL_SWEEP=long python -m pytest tests/plugins/test_sweep_mamba.py`
runs 10 times more with a fresh seed (plugin_helpers.sweep_settings). A failure prints the case; keep it below as
an @example.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from trtfalcon.plugins.conv1d import CAUSAL_CONV1D, causal_conv1d_varlen_ref
from trtfalcon.plugins.gated_norm import GATED_RMS_NORM, gated_rms_norm_ref
from trtfalcon.plugins.spec import launch
from trtfalcon.plugins.ssd import SSD, ssd_kernel_chunk, ssd_varlen_ref

from plugin_helpers import BOUND_RTOL, assert_within, ragged, sweep_settings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INF = float("inf")


def _batch(draw, lens_choices: list[int], num_slots: int):
    """(lens, context_lens, slots): 1 to 3 sequences in distinct slots, each fresh (context 0: its slot holds another
    request's leftovers) or continuing from its slot."""
    n = draw(st.integers(1, 3))
    lens = tuple(draw(st.sampled_from(lens_choices)) for _ in range(n))
    ctx = tuple(draw(st.sampled_from([0, 0, 1, 7])) for _ in range(n))
    slots = tuple(draw(st.permutations(range(num_slots)))[:n])
    return lens, ctx, slots


def _untouched(pool_before, pool_after, slots, lens):
    """Slots outside the batch, and those of sequences with no tokens, keep their bytes."""
    busy = {s for s, n in zip(slots, lens) if n > 0}
    for s in range(pool_before.shape[0]):
        if s not in busy:
            assert torch.equal(pool_after[s], pool_before[s]), f"slot {s} changed"


# ---------------------------------------------------------------------------------------------------------------
# causal conv1d
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvCase:
    conv_dim: int
    d_conv: int
    has_bias: bool
    activation: bool
    dtype: str
    state_dtype: str
    lens: tuple[int, ...]
    ctx: tuple[int, ...]
    slots: tuple[int, ...]
    seed: int


@st.composite
def conv_cases(draw):
    k = draw(st.integers(2, 4))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    # lengths around the state (K-1) and the kernel's token tile (8)
    lens, ctx, slots = _batch(draw, [0, 1, k - 1, k, 7, 8, 9, 17], num_slots=4)
    return ConvCase(conv_dim=draw(st.sampled_from([1, 5, 64, 65, 130])), d_conv=k, has_bias=draw(st.booleans()),
                    activation=draw(st.booleans()), dtype=dtype,
                    state_dtype=draw(st.sampled_from(sorted({dtype, "float32"}))), lens=lens, ctx=ctx, slots=slots,
                    seed=draw(st.integers(0, 2**16)))


def plain_conv1d(x, w, b, pool, lens, ctx, slots, activation):
    """out_t = act(b + sum_k w_k * u_{t+k}) over u = (the slot's last K-1 inputs, or zeros) ++ x, per channel;
    the slot keeps the last K-1 of u; act(v) = v / (1 + e^-v) (SiLU). float64, one channel vector at a time.
    Returns (out, |b| + sum_k |w_k u_{t+k}| (the size of what each output sums), pool)."""
    x, w = x.double(), w.double()
    out, out_abs = torch.zeros_like(x), torch.zeros_like(x)
    pool = pool.double().clone()
    k = w.shape[1]
    start = 0
    for n, c, s in zip(lens, ctx, slots):
        if n:
            hist = pool[s].t() if c > 0 else torch.zeros(k - 1, x.shape[1], dtype=torch.float64)
            u = torch.cat([hist, x[start:start + n]])  # (K-1+n, conv_dim)
            for t in range(n):
                acc = (b.double() if b is not None else 0.0) + sum(w[:, j] * u[t + j] for j in range(k))
                out_abs[start + t] = (b.double().abs() if b is not None else 0.0) + sum(
                    (w[:, j] * u[t + j]).abs() for j in range(k))
                out[start + t] = acc / (1.0 + torch.exp(-acc)) if activation else acc
            pool[s] = u[-(k - 1):].t()
        start += n
    return out, out_abs, pool


# Corners every CI run checks whatever the draws: a two-tap conv (one state column) over three channel blocks with
# an empty row, a decode row continuing from its slot and a fresh row longer than a token tile in a reused slot;
# the 7B's four taps on one channel with sequences shorter than the state.
CONV_CORNERS = [
    ConvCase(conv_dim=130, d_conv=2, has_bias=True, activation=True, dtype="bfloat16", state_dtype="float32",
             lens=(0, 1, 9), ctx=(7, 7, 0), slots=(1, 3, 0), seed=5),
    ConvCase(conv_dim=1, d_conv=4, has_bias=False, activation=False, dtype="float32", state_dtype="float32",
             lens=(2, 1, 3), ctx=(1, 0, 1), slots=(2, 0, 3), seed=6),
]


@sweep_settings(ci_examples=40)
@example(case=CONV_CORNERS[0])
@example(case=CONV_CORNERS[1])
@given(case=conv_cases())
def test_conv1d_sweep(case):
    g = torch.Generator().manual_seed(case.seed)
    dt, sdt = DTYPES[case.dtype], DTYPES[case.state_dtype]
    c, k = case.conv_dim, case.d_conv
    x = torch.randn(sum(case.lens), c, generator=g).to(dt)
    w = torch.randn(c, k, generator=g).to(dt)
    b = torch.randn(c, generator=g).to(dt) if case.has_bias else None
    pool = (torch.randn(4, c, k - 1, generator=g) * 3).to(sdt)
    cu, ctx_t, slots_t = ragged(list(case.lens), list(case.ctx), list(case.slots))
    p_ref, p_tri = pool.clone(), pool.clone()
    y_ref = causal_conv1d_varlen_ref(x, w, b, p_ref, cu, ctx_t, slots_t, case.activation)
    y_tri = launch(CAUSAL_CONV1D, x, w, b, p_tri, cu, ctx_t, slots_t, case.activation)
    y_def, y_abs, p_def = plain_conv1d(x, w, b, pool, case.lens, case.ctx, case.slots, case.activation)
    allowed = BOUND_RTOL[dt] * y_abs * (1.1 if case.activation else 1.0)  # SiLU's slope is within [-0.1, 1.1]
    assert_within(y_tri, y_ref, allowed, "out vs the reference")
    assert_within(y_tri, y_def, allowed, "out vs the definition")
    # the state is the inputs themselves: the same values, bit for bit
    assert torch.equal(p_tri, p_ref) and torch.equal(p_tri, p_def.to(sdt)), "conv_state differs"
    _untouched(pool, p_tri, case.slots, case.lens)


# ---------------------------------------------------------------------------------------------------------------
# SSD
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SSDCase:
    heads: int
    head_dim: int
    groups: int
    d_state: int
    chunk_size: int
    dtype: str
    state_dtype: str
    dt_limit: tuple[float, float]
    dt_bias: tuple[float, ...]  # per head
    A_log: tuple[float, ...]  # per head: A = -exp(A_log)
    dt_spread: float  # raw dt ~ N(0, dt_spread)
    has_D: bool
    lens: tuple[int, ...]
    ctx: tuple[int, ...]
    slots: tuple[int, ...]
    seed: int


_LIMIT_VALUES = [0.0, 1e-3, 0.05, 0.5, 2.0]
time_step_limits = st.one_of(
    st.just((0.0, INF)),  # the default: no clamp
    st.just((0.0, 0.0)),  # dt = 0: the state never moves
    st.sampled_from(_LIMIT_VALUES).map(lambda v: (v, v)),  # equal limits: dt is constant
    st.tuples(st.sampled_from(_LIMIT_VALUES), st.sampled_from(_LIMIT_VALUES + [INF])).map(lambda t: tuple(sorted(t))),
    st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 4.0)).map(lambda t: tuple(sorted(t))),
)
# dt_bias and A_log at their extremes and between, by regime so that extreme pairs come up often: softplus from
# e^-30 (its exp branch, where log(1 + e^x) used to round to 0) past its linear branch (> 20); A from -0.02 to -20:
# decays from almost none to e^-1200 per token, dt * A summing to hundreds within a chunk
DT_BIAS_RANGES = {"exp_tail": (-30.0, -12.0), "moderate": (-3.0, 3.0), "linear": (20.0, 60.0), "any": (-30.0, 60.0)}
A_LOG_RANGES = {"slow": (-4.0, -1.0), "moderate": (-1.0, 1.0), "fast": (1.0, 3.0)}


def _per_head(draw, ranges: dict[str, tuple[float, float]], heads: int) -> tuple[float, ...]:
    lo, hi = ranges[draw(st.sampled_from(sorted(ranges)))]
    return tuple(draw(st.one_of(st.sampled_from([lo, hi]), st.floats(lo, hi))) for _ in range(heads))


@st.composite
def ssd_cases(draw, kernel: str):
    h = draw(st.sampled_from([1, 2, 4]))
    n_state = draw(st.sampled_from([16, 32, 64, 128, 256]))
    chunk = draw(st.sampled_from([16, 32, 64, 256]))
    t = ssd_kernel_chunk(chunk, n_state)  # the chunked kernel's chunk: 16 to 64
    # the recurrent kernel walks token by token (slow when interpreted): short sequences, its use is decode
    lens_choices = [0, 1, 1, 2, t - 1, t, t + 1, 2 * t, 2 * t + 1] if kernel == "chunked" else [0, 1, 1, 2, 5, 17]
    lens, ctx, slots = _batch(draw, lens_choices, num_slots=4)
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    return SSDCase(
        heads=h, head_dim=draw(st.sampled_from([4, 6, 8])),
        groups=draw(st.sampled_from([g for g in (1, 2, 4) if h % g == 0])),
        d_state=n_state, chunk_size=chunk, dtype=dtype, state_dtype=draw(st.sampled_from(sorted(DTYPES))),
        dt_limit=draw(time_step_limits), dt_bias=_per_head(draw, DT_BIAS_RANGES, h),
        A_log=_per_head(draw, A_LOG_RANGES, h), dt_spread=draw(st.sampled_from([0.5, 3.0])),
        has_D=draw(st.booleans()), lens=lens, ctx=ctx, slots=slots, seed=draw(st.integers(0, 2**16)))


def plain_ssd(x, dt_raw, A, B, C, D, dt_bias, pool, lens, ctx, slots, dt_limit):
    """Mamba2 (Dao & Gu 2024, eq. 1 with the scalar-times-identity A), one token at a time in float64:
    dt_t = clamp(softplus(dt_raw_t + dt_bias), lo, hi); h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t;
    y_t = C_t h_t + D x_t; head h reads group h // (H / G). softplus(v) = log(e^0 + e^v).

    Also the same recurrence on absolute values (|h|, |B x|, |C|, |D x|): a bound on every partial sum the kernels
    form, so that a rounding error can be judged against it element by element, however small the element.
    Returns (y, y_bound, pool, pool_bound)."""
    x, dt_raw, A, B, C = x.double(), dt_raw.double(), A.double(), B.double(), C.double()
    heads, groups = x.shape[1], B.shape[1]
    y, y_bound = torch.zeros_like(x), torch.zeros_like(x)
    pool = pool.double().clone()
    pool_bound = pool.abs()
    lo, hi = dt_limit
    start = 0
    for n, c, s in zip(lens, ctx, slots):
        if n:
            h = pool[s].clone() if c > 0 else torch.zeros_like(pool[s])  # (H, P, N)
            h_abs = h.abs()
            for t in range(start, start + n):
                dt = torch.logaddexp(dt_raw[t] + dt_bias.double(), torch.zeros(heads, dtype=torch.float64))
                dt = dt.clamp(min=lo, max=hi)
                for hd in range(heads):
                    g = hd // (heads // groups)
                    decay = torch.exp(dt[hd] * A[hd])
                    h[hd] = decay * h[hd] + dt[hd] * torch.outer(x[t, hd], B[t, g])
                    h_abs[hd] = decay * h_abs[hd] + dt[hd] * torch.outer(x[t, hd].abs(), B[t, g].abs())
                    skip = D[hd].double() * x[t, hd] if D is not None else torch.zeros_like(x[t, hd])
                    y[t, hd] = h[hd] @ C[t, g] + skip
                    y_bound[t, hd] = h_abs[hd] @ C[t, g].abs() + skip.abs()
            pool[s], pool_bound[s] = h, h_abs
        start += n
    return y, y_bound, pool, pool_bound


def _ssd_check(case: SSDCase, kernel: str):
    g = torch.Generator().manual_seed(case.seed)
    dt, sdt = DTYPES[case.dtype], DTYPES[case.state_dtype]
    H, P, G, N, n = case.heads, case.head_dim, case.groups, case.d_state, sum(case.lens)
    x = torch.randn(n, H, P, generator=g).to(dt)
    dt_raw = (torch.randn(n, H, generator=g) * case.dt_spread).to(dt)
    A = -torch.exp(torch.tensor(case.A_log, dtype=torch.float32))
    B = torch.randn(n, G, N, generator=g).to(dt)
    C = torch.randn(n, G, N, generator=g).to(dt)
    D = torch.randn(H, generator=g) if case.has_D else None
    dt_bias = torch.tensor(case.dt_bias, dtype=torch.float32)
    pool = (torch.randn(4, H, P, N, generator=g) * 2).to(sdt)
    cu, ctx_t, slots_t = ragged(list(case.lens), list(case.ctx), list(case.slots))
    p_ref, p_tri = pool.clone(), pool.clone()
    args = (A, B, C, D, dt_bias)
    y_ref = ssd_varlen_ref(x, dt_raw, *args, p_ref, cu, ctx_t, slots_t, case.chunk_size, case.dt_limit)
    y_tri = launch(SSD, x, dt_raw, *args, p_tri, cu, ctx_t, slots_t, case.chunk_size, case.dt_limit, kernel=kernel)
    y_def, y_bound, p_def, p_bound = plain_ssd(x, dt_raw, *args, pool, case.lens, case.ctx, case.slots,
                                               case.dt_limit)
    busy = [s for s, k in zip(case.slots, case.lens) if k > 0]
    # 1. the reference and 2. the definition, element by element against the size of the terms each element sums
    # (a tiny output counts as much as a large one); slots without tokens keep their bytes
    y_allowed, p_allowed = BOUND_RTOL[dt] * y_bound, BOUND_RTOL[sdt] * p_bound[busy]
    assert_within(y_tri, y_ref, y_allowed, "y vs the reference")
    assert_within(p_tri[busy], p_ref[busy], p_allowed, "ssm_state vs the reference")
    assert_within(y_tri, y_def, y_allowed, "y vs the plain recurrence")
    assert_within(p_tri[busy], p_def[busy], p_allowed, "ssm_state vs the plain recurrence")
    _untouched(pool, p_tri, case.slots, case.lens)
    # 3. where the state leaves the kernel right after a token's output (a sequence's end for the recurrent kernel;
    # the end of a chunk for the chunked one), that output reads that state: y = C . S + D x to rounding
    if dt == sdt == torch.float32:
        t_chunk = ssd_kernel_chunk(case.chunk_size, N)
        ends = [(int(cu[b + 1]) - 1, s) for b, (k, s) in enumerate(zip(case.lens, case.slots))
                if k > 0 and (kernel == "recurrent" or k % t_chunk == 0)]
        for t, s in ends:
            c_heads = C[t].double().repeat_interleave(H // G, dim=0)  # (H, N)
            y_state = torch.einsum("hpn,hn->hp", p_tri[s].double(), c_heads)
            if D is not None:
                y_state = y_state + D.double()[:, None] * x[t].double()
            assert_within(y_tri[t], y_state, 1e-5 * y_bound[t], f"y at token {t} vs C . (the state it hands on)")


def _ssd(**kw) -> SSDCase:
    """A case with the sweep's smallest shapes unless said otherwise."""
    base = dict(heads=1, head_dim=4, groups=1, d_state=16, chunk_size=16, dtype="bfloat16", state_dtype="bfloat16",
                dt_limit=(0.0, INF), dt_bias=(-30.0,), A_log=(1.0,), dt_spread=0.5, has_D=False, lens=(1,), ctx=(0,),
                slots=(0,), seed=0)
    return SSDCase(**{**base, **kw})


# Found by this sweep (TRTFALCON_KERNEL_SWEEP=long) with each of issue 15's fixes reverted, shrunk by hypothesis:
FOUND_ZERO_UPPER_LIMIT = _ssd(dt_limit=(0.0, 0.0), lens=(0, 1), ctx=(0, 0), slots=(0, 1))  # limit 0 read as none
FOUND_SOFTPLUS_TAIL = _ssd()  # softplus(-30 + ...) was 0: the state took no input
FOUND_CHUNK_DECAY = _ssd(state_dtype="float32", dt_bias=(60.0,), lens=(0, 15), ctx=(0, 0), slots=(0, 1))  # tl.sum
# Corners every CI run checks whatever the draws: a mixed batch (empty row, decode, chunk + 1) at d_state 256
# with one group per head, equal limits, D and initial states; several chunks from a state at extreme decay.
MIXED_BATCH = _ssd(heads=4, head_dim=6, groups=4, d_state=256, dtype="float32", dt_limit=(0.5, 0.5),
                   dt_bias=(-30.0, 0.0, 20.0, 60.0), A_log=(-4.0, 0.0, 1.0, 3.0), has_D=True, lens=(0, 17, 1),
                   ctx=(1, 0, 7), slots=(3, 0, 2), seed=7)
SEVERAL_CHUNKS = _ssd(heads=2, groups=1, d_state=64, chunk_size=256, dtype="float32", state_dtype="float32",
                      dt_limit=(0.05, INF), dt_bias=(5.0, 60.0), A_log=(3.0, 3.0), dt_spread=3.0, has_D=True,
                      lens=(128,), ctx=(7,), slots=(2,), seed=3)


@sweep_settings(ci_examples=80)
@example(case=FOUND_ZERO_UPPER_LIMIT)
@example(case=FOUND_SOFTPLUS_TAIL)
@example(case=FOUND_CHUNK_DECAY)
@example(case=MIXED_BATCH)
@example(case=SEVERAL_CHUNKS)
@given(case=ssd_cases("chunked"))
def test_ssd_chunked_sweep(case):
    _ssd_check(case, "chunked")


@sweep_settings(ci_examples=40)
@example(case=dataclasses.replace(FOUND_ZERO_UPPER_LIMIT, lens=(1,), ctx=(0,), slots=(0,)))
@example(case=FOUND_SOFTPLUS_TAIL)
@example(case=dataclasses.replace(MIXED_BATCH, lens=(0, 5, 1), dtype="bfloat16", state_dtype="float32"))
@given(case=ssd_cases("recurrent"))
def test_ssd_recurrent_sweep(case):
    _ssd_check(case, "recurrent")


# ---------------------------------------------------------------------------------------------------------------
# gated RMSNorm
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormCase:
    num_tokens: int
    n_groups: int
    group_size: int
    has_norm: bool
    norm_before_gate: bool
    eps: float
    dtype: str
    out_dtype: str
    seed: int


@st.composite
def norm_cases(draw):
    return NormCase(num_tokens=draw(st.sampled_from([0, 1, 3])), n_groups=draw(st.integers(1, 4)),
                    group_size=draw(st.sampled_from([1, 7, 16, 33, 64])), has_norm=draw(st.booleans()),
                    norm_before_gate=draw(st.booleans()), eps=draw(st.sampled_from([1e-6, 1e-5, 1e-2])),
                    dtype=draw(st.sampled_from(sorted(DTYPES))), out_dtype=draw(st.sampled_from(sorted(DTYPES))),
                    seed=draw(st.integers(0, 2**16)))


def plain_gated_rms_norm(y, z, w, n_groups, eps, norm_before_gate):
    """out = w * rmsnorm(y * silu(z)) per group (or w * rmsnorm(y) * silu(z) before the gate; y * silu(z) without a
    norm), silu(v) = v / (1 + e^-v), rmsnorm(v) = v / sqrt(mean(v^2) + eps) over each of the n_groups groups."""
    y, z = y.double(), z.double()
    gate = z / (1.0 + torch.exp(-z))
    if w is None:
        return y * gate
    v = y if norm_before_gate else y * gate
    t, d = v.shape
    vg = v.reshape(t, n_groups, d // n_groups)
    out = (vg / torch.sqrt((vg * vg).mean(-1, keepdim=True) + eps)).reshape(t, d) * w.double()
    return out * gate if norm_before_gate else out


@sweep_settings(ci_examples=60)
@example(case=NormCase(num_tokens=3, n_groups=3, group_size=33, has_norm=True, norm_before_gate=False, eps=1e-6,
                       dtype="bfloat16", out_dtype="float32", seed=2))  # groups of odd size; bf16 in, fp32 out
@given(case=norm_cases())
def test_gated_rms_norm_sweep(case):
    g = torch.Generator().manual_seed(case.seed)
    dt, out_dt = DTYPES[case.dtype], DTYPES[case.out_dtype]
    d = case.n_groups * case.group_size
    y = (torch.randn(case.num_tokens, d, generator=g) * 3).to(dt)
    z = (torch.randn(case.num_tokens, d, generator=g) * 3).to(dt)
    w = torch.randn(d, generator=g).to(dt) if case.has_norm else None
    args = (y, z, w, case.n_groups, case.eps, case.norm_before_gate, out_dt)
    o_ref = gated_rms_norm_ref(*args)
    o_tri = launch(GATED_RMS_NORM, *args)
    o_def = plain_gated_rms_norm(y, z, w, case.n_groups, case.eps, case.norm_before_gate)
    assert o_tri.dtype == out_dt and o_tri.shape == y.shape
    # products and quotients of per-element values (the one sum, of squares, has no cancellation): relative to
    # each element
    allowed = BOUND_RTOL[torch.bfloat16 if torch.bfloat16 in (dt, out_dt) else torch.float32] * o_def.abs()
    assert_within(o_tri, o_ref, allowed, "out vs the reference")
    assert_within(o_tri, o_def, allowed, "out vs the definition")
