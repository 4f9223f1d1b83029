"""Shared by the plugin kernel tests (imported by name: pytest puts this folder on sys.path)."""

import os

import torch
from hypothesis import HealthCheck, settings

# fp32: both sides compute in fp32 (kernel order of sums differs); bf16: inputs rounded to bf16, outputs too.
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def ragged(lens: list[int], ctx: list[int], slots: list[int] | None = None):
    """cu_seqlens, context_lens, state_slots (int32) for a batch of sequences with `lens` new tokens each."""
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    ctx_t = torch.tensor(ctx, dtype=torch.int32)
    slots_t = torch.tensor(slots if slots is not None else list(range(len(lens))), dtype=torch.int32)
    return cu, ctx_t, slots_t


def scaled_tol(dtype, ref):
    """TOL[dtype] with the absolute part scaled by the result's magnitude (SSD outputs grow with the state)."""
    t = TOL[dtype]
    scale = max(1.0, ref.float().abs().max().item()) if ref.numel() else 1.0
    return dict(atol=t["atol"] * scale, rtol=t["rtol"])


def assert_within(got: torch.Tensor, want: torch.Tensor, allowed: torch.Tensor, what: str):
    """|got - want| <= allowed, element by element. Callers derive `allowed` from the sum of the absolute values of
    the terms that make each element (sum |C h| + |D x| for SSD, sum p |v| for attention): a rounding error is
    judged against what was rounded, so a tiny element counts as much as a large one and a cancelling sum is not
    held to its result's few digits."""
    err = (got.double() - want.double()).abs()
    tiny = torch.finfo(torch.float32).tiny  # fp32 underflow (exp(dt * A) of e^-100 and below)
    bad = err > allowed + tiny
    if bad.any():
        i = tuple(int(j) for j in bad.nonzero()[0])
        worst = float((err / allowed).nan_to_num(0, posinf=float("inf")).max())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off; at {i}: got {float(got[i])!r}, "
                             f"expected {float(want[i])!r}, error {float(err[i]):.3g} > allowed "
                             f"{float(allowed[i]):.3g} (worst error / allowed: {worst:.3g})")


# Rounding of a kernel relative to that bound: fp32, a few hundred additions and the chunked SSD's differences of
# running sums (exp(a_cum_i - a_cum_j), each a_cum rounded at its magnitude: up to 1e-4 of a term when dt * A
# sums to hundreds within a chunk); bf16 outputs, states and attention probabilities: rounded to 8 bits, the
# kernel's and the reference's each (two ulps of 2^-7 apart at most) and the probabilities before P @ V: TOL's 3e-2.
BOUND_RTOL = {torch.float32: TOL[torch.float32]["rtol"], torch.bfloat16: TOL[torch.bfloat16]["rtol"]}


# The property-based kernel sweeps (test_sweep_*.py). CI, the default: `ci_examples` draws per test from a fixed
# seed (derandomize) and no example database, so every run checks the same cases in a bounded time.
# TRTFALCON_KERNEL_SWEEP=long: LONG_FACTOR times the draws, a fresh seed each run and hypothesis' example database
# (.hypothesis/, which replays earlier failures first): a local hunt; add what it finds as an @example.
LONG_FACTOR = 10


def sweep_settings(ci_examples: int) -> settings:
    long = os.environ.get("TRTFALCON_KERNEL_SWEEP", "ci") == "long"
    return settings(
        max_examples=ci_examples * LONG_FACTOR if long else ci_examples,
        derandomize=not long,
        database=settings.default.database if long else None,
        deadline=None,  # an interpreted kernel call takes 0.1 to 1 s
        print_blob=True,
        # too_slow: interpreted kernels; function_scoped_fixture: conftest's autouse torch seed (the draws seed
        # their own generator); differing_executors: none here
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
