"""Sampler: greedy ties, per-request seeds independent of the batch, top-k/top-p masks, logprobs."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trtfalcon.runtime.request import SamplingParams
from trtfalcon.runtime.sampler import Sampler, process_logits

V = 50


def sample(logits, params, seeds=None):
    rngs = [random.Random(s) if s is not None else None for s in (seeds or [None] * len(params))]
    return Sampler().sample(logits, params, rngs)


def test_greedy_is_argmax_with_ties_to_lowest_id():
    logits = torch.zeros(3, V)
    logits[0, [7, 3, 9]] = 5.0
    logits[1, 49] = 1.0
    ids, lps = sample(logits, [SamplingParams()] * 3)
    assert ids == [3, 49, 0] and lps is None


def test_greedy_with_logprobs_reports_raw_distribution():
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    ids, lps = sample(logits, [SamplingParams(logprobs=5)] * 4)
    ref = logits.log_softmax(-1)
    for i in range(4):
        assert ids[i] == int(logits[i].argmax())
        assert lps[i].token_id == ids[i] and lps[i].logprob == pytest.approx(float(ref[i, ids[i]]), abs=1e-6)
        top = ref[i].topk(5)
        assert lps[i].top_ids == top.indices.tolist()
        assert lps[i].top_logprobs == pytest.approx(top.values.tolist(), abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), others=st.integers(0, 6), row=st.integers(0, 6),
       temperature=st.floats(0.3, 2.0), top_k=st.integers(0, V), top_p=st.floats(0.05, 1.0))
def test_seeded_rows_do_not_depend_on_batch_composition(seed, others, row, temperature, top_k, top_p):
    torch.manual_seed(seed % 1000)
    mine = torch.randn(V)
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    alone = []
    rng = random.Random(seed)
    for _ in range(5):
        alone.append(Sampler().sample(mine[None], [p], [rng])[0][0])
    row = min(row, others)
    rng = random.Random(seed)
    batched = []
    for step in range(5):
        noise = torch.randn(others + 1, V) * (step + 1)
        noise[row] = mine
        params = [SamplingParams(temperature=0.9, seed=i) for i in range(others + 1)]
        params[row] = p
        rngs = [random.Random(1000 + i + step) for i in range(others + 1)]
        rngs[row] = rng
        batched.append(Sampler().sample(noise, params, rngs)[0][row])
    assert alone == batched


def test_top_k_and_top_p_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    x = process_logits(logits, torch.ones(3), torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.5, 0.9]))
    keep = torch.isfinite(x)
    probs = logits[0].softmax(-1)  # ~[0.64, 0.24, 0.09, 0.03, 0.01]
    assert keep[0].tolist() == [True, True, False, False, False]  # top-2
    assert keep[1].tolist() == [True, False, False, False, False]  # 0.64 already >= 0.5
    assert float(probs[:2].sum()) < 0.9 <= float(probs[:3].sum())
    assert keep[2].tolist() == [True, True, True, False, False]  # smallest set reaching 0.9
    # Ties at the k-th value are kept.
    x = process_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), torch.ones(1), torch.tensor([1]), torch.ones(1))
    assert torch.isfinite(x).tolist() == [[False, True, True, False]]


def test_sampled_tokens_stay_inside_the_filters_and_follow_the_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, V) * 2
    p = SamplingParams(temperature=1.0, top_k=10, top_p=0.8, seed=3)
    allowed = torch.isfinite(process_logits(logits, torch.ones(1), torch.tensor([10]), torch.tensor([0.8])))[0]
    rng = random.Random(3)
    counts = torch.zeros(V)
    for _ in range(3000):
        counts[Sampler().sample(logits, [p], [rng])[0][0]] += 1
    assert counts[~allowed].sum() == 0
    want = process_logits(logits, torch.ones(1), torch.tensor([10]), torch.tensor([0.8])).softmax(-1)[0]
    assert (counts / 3000 - want).abs().max() < 0.04


def test_logprobs_of_the_processed_distribution():
    torch.manual_seed(1)
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=0.6, top_p=0.95, logprobs=20, seed=1),
              SamplingParams(temperature=1.5, top_k=5, logprobs=8, seed=2),
              SamplingParams(logprobs=0)]
    ids, lps = sample(logits, params, [1, 2, None])
    assert lps[2] is None and ids[2] == int(logits[2].argmax())
    for i in range(2):
        lp = lps[i]
        assert len(lp.top_ids) == params[i].logprobs
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        assert lp.token_id == ids[i] and lp.logprob > float("-inf")
        pr = params[i]
        full = process_logits(logits[i:i + 1], torch.tensor([pr.temperature]), torch.tensor([pr.top_k]),
                              torch.tensor([pr.top_p])).log_softmax(-1)[0]
        assert float(full.logsumexp(-1)) == pytest.approx(0.0, abs=1e-5)
        assert lp.logprob == pytest.approx(float(full[ids[i]]), abs=1e-6)
        assert lp.top_logprobs[0] == pytest.approx(float(full.max()), abs=1e-6)
    assert lps[1].top_logprobs[5:] == [float("-inf")] * 3  # top_k=5: the rest were filtered out


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]])
    hot = process_logits(logits, torch.tensor([2.0]), torch.zeros(1, dtype=torch.long), torch.ones(1)).softmax(-1)
    cold = process_logits(logits, torch.tensor([0.5]), torch.zeros(1, dtype=torch.long), torch.ones(1)).softmax(-1)
    assert float(cold[0, 0]) > float(logits.softmax(-1)[0, 0]) > float(hot[0, 0])
