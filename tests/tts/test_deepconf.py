"""DeepConf confidence math: hand-computed values, the published code's formulas on the same synthetic log-probs
(an oracle written here from facebookresearch/deepconf's helper.py / analysis_offline.py / deepconf-online.py
and its vLLM early-stop patch, as ../shared/reference/deepconf.md describes them), and each place where those
implementations disagree, with the choice deepconf.py makes tested explicitly."""

from __future__ import annotations

import math
import random
from collections import deque

import numpy as np
import pytest
import torch

from trtfalcon.tts.deepconf import (
    GroupConfidence, confidence_from_logits, percentile, token_confidence, trace_scores, warmup_threshold,
    window_means,
)

# ---- the oracle: the published code's formulas, one trace at a time, in plain Python/numpy -----------------------


def oracle_helper_confidence(sampled_id: int, sampled_lp: float, top_ids: list[int], top_lps: list[float]) -> float:
    """helper.compute_confidence on one position of a vLLM logprobs dict {token_id: logprob}: the k top entries
    plus the sampled token when it is not among them; -mean, rounded to 3 decimals."""
    entries = dict(zip(top_ids, top_lps))
    entries.setdefault(sampled_id, sampled_lp)
    return round(-float(np.mean(list(entries.values()))), 3)


def oracle_patch_confidence(sampled_lp: float, top_lps: list[float]) -> float:
    """The vLLM early-stop patch: logprobs[0] is the sampled token's, the rest the top k; -mean of the rest."""
    row = [sampled_lp, *top_lps]
    rest = row[1:]
    return -sum(rest) / len(rest)


def oracle_least_grouped(confs: list[float], group: int, rounded: bool = True) -> list[float]:
    """helper.compute_least_grouped: every full window's mean (rounded), or the one mean of a shorter trace."""
    if len(confs) < group:
        return [sum(confs) / len(confs)]
    r = (lambda x: round(x, 3)) if rounded else (lambda x: x)
    return [r(sum(confs[i:i + group]) / group) for i in range(len(confs) - group + 1)]


def oracle_bottom_window(confs: list[float], window: int, bottom_percent: float) -> float:
    """analysis_offline.calculate_bottom_window_confidence (bottom_percent -1 = the lowest window)."""
    if len(confs) < window:
        return float(np.mean(confs))
    means = [sum(confs[:window]) / window]
    s = means[0] * window
    for i in range(1, len(confs) - window + 1):
        s = s - confs[i - 1] + confs[i + window - 1]
        means.append(s / window)
    if bottom_percent == -1:
        return min(means)
    n = max(1, int(len(means) * bottom_percent))
    return min(means) if n == 1 else float(np.mean(np.partition(means, n - 1)[:n]))


def oracle_tail(confs: list[float], tail: int) -> float:
    return float(np.mean(confs[-tail:] if len(confs) > tail else confs))


def oracle_stop_index(confs: list[float], window: int, threshold: float) -> int | None:
    """The patch's per-token check: a deque of the last `window` confidences and their running sum; stop at the
    first token where the deque is full and its mean < threshold. Returns that token's index, or None."""
    group: deque[float] = deque(maxlen=window)
    total = 0.0
    for i, c in enumerate(confs):
        if len(group) < window:
            group.append(c)
            total += c
        else:
            total -= group.popleft()
            group.append(c)
            total += c
        if len(group) >= window and total / len(group) < threshold:
            return i
    return None


# ---- synthetic traces -------------------------------------------------------------------------------------------


def synthetic_trace(n_tokens: int, vocab: int = 50, k: int = 20, seed: int = 0, temperature: float = 1.0):
    """Random logits per position (some peaked, some flat), a sampled token per position; what the runtime's
    TokenLogprobs would hold (top-k of the temperature-scaled distribution) plus the logits themselves."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n_tokens, 1, generator=g) * 6.0  # 0: flat .. 6: very peaked
    logits = torch.randn(n_tokens, vocab, generator=g, dtype=torch.float64) * scale
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    sampled = torch.multinomial(logprobs.exp(), 1, generator=g).squeeze(1)
    top = logprobs.topk(k, dim=-1)
    return logits, logprobs, sampled, top.values, top.indices


# ---- token confidence -------------------------------------------------------------------------------------------


def test_token_confidence_hand_computed():
    # -mean(-0.1, -2.0, -3.0) = 5.1 / 3
    assert token_confidence(torch.tensor([-0.1, -2.0, -3.0])).item() == pytest.approx(1.7)
    # logits (2, 1, 0, 0), k = 2: log P = x - log(e^2 + e + 2); C = lse - (2 + 1) / 2
    lse = math.log(math.exp(2) + math.exp(1) + 2)
    got = confidence_from_logits(torch.tensor([[2.0, 1.0, 0.0, 0.0]]), k=2)
    assert got.item() == pytest.approx(lse - 1.5, rel=1e-6)
    # the same at temperature 0.5: logits double
    lse2 = math.log(math.exp(4) + math.exp(2) + 2)
    got = confidence_from_logits(torch.tensor([[2.0, 1.0, 0.0, 0.0]]), k=2, temperature=0.5)
    assert got.item() == pytest.approx(lse2 - 3.0, rel=1e-6)
    # a uniform distribution over V tokens: every top-k log-prob is -log V
    assert confidence_from_logits(torch.zeros(1, 32), k=20).item() == pytest.approx(math.log(32), rel=1e-6)
    # more peaked = more confident
    peaked = confidence_from_logits(torch.tensor([[8.0, 0.0, 0.0, 0.0]]), k=3)
    flat = confidence_from_logits(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), k=3)
    assert peaked.item() > flat.item()


def test_confidence_from_logits_is_batched_per_row_temperature_and_k():
    logits, *_ = synthetic_trace(7, vocab=40)
    temps = torch.tensor([0.6, 1.0, 0.0, 2.0, 0.8, 1.0, 0.6])  # 0 = greedy row: uses 1
    for k in (1, 5, 20, 40):
        got = confidence_from_logits(logits.float(), k=k, temperature=temps)
        assert got.shape == (7,) and got.dtype == torch.float32
        for i in range(7):
            t = temps[i].item() or 1.0
            lp = torch.log_softmax(logits[i] / t, dim=-1).topk(k).values
            assert got[i].item() == pytest.approx(-lp.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"top-k: expected an integer in \[1, vocab_size=40\], found 41"):
        confidence_from_logits(logits, k=41)


def test_per_token_path_needs_no_host_copy():
    """The meta device has shapes but no data: any .item(), .tolist() or host copy on the per-token path fails
    there. confidence_from_logits and GroupConfidence.start/push/stop run on it and keep results on it."""
    logits = torch.empty(6, 130048, device="meta")
    conf = confidence_from_logits(logits, k=20, temperature=torch.full((6,), 0.6, device="meta"))
    assert conf.device.type == "meta" and conf.shape == (6,)
    gc = GroupConfidence(num_slots=8, window=4, device="meta")
    slots = torch.arange(6, device="meta")
    gc.start(slots, torch.empty(6, device="meta"))
    group = gc.push(slots, conf)
    stop = gc.stop(slots, group)
    low = gc.lowest_group(slots)
    assert {group.device.type, stop.device.type, low.device.type} == {"meta"}
    assert stop.dtype == torch.bool and stop.shape == (6,)


def test_token_confidence_equals_the_patch_and_not_helpers_k_plus_one():
    """Disagreement 1: helper.compute_confidence averages the vLLM dict, which holds k + 1 entries when the
    sampled token is outside the top k; the vLLM patch (and the paper) use the top k only. We follow the latter:
    equal to the patch to float precision, and off from the helper exactly where the sampled token is outside."""
    _, logprobs, sampled, top_vals, top_ids = synthetic_trace(400, vocab=50, k=20, seed=1)
    ours = token_confidence(top_vals)
    outside = 0
    for i in range(400):
        lp_s = logprobs[i, sampled[i]].item()
        assert ours[i].item() == pytest.approx(oracle_patch_confidence(lp_s, top_vals[i].tolist()), abs=1e-6)
        helper = oracle_helper_confidence(int(sampled[i]), lp_s, top_ids[i].tolist(), top_vals[i].tolist())
        if int(sampled[i]) in top_ids[i].tolist():
            assert abs(ours[i].item() - helper) <= 5e-4 + 1e-9  # disagreement 2: the helper rounds to 3 decimals
        else:
            outside += 1
            k_plus_one = -(top_vals[i].sum().item() + lp_s) / 21
            assert helper == pytest.approx(round(k_plus_one, 3))
            assert abs(ours[i].item() - helper) > 1e-3  # a sampled tail token pulls the helper's value up
    assert outside > 5, "the synthetic traces were meant to sample outside the top 20 sometimes"


def test_confidence_uses_the_tempered_untruncated_distribution():
    """Disagreement 3: deepconf.md's "processed distribution" is taken after temperature, before top-k/top-p
    (whose -inf log-probs would make C infinite); the published runs used raw logits (temperature None here).
    And it is what the runtime's sampler returns as top log-probs when top_k = 0 and top_p = 1."""
    from trtfalcon.runtime.request import SamplingParams
    from trtfalcon.runtime.sampler import Sampler

    logits, *_ = synthetic_trace(5, vocab=64, seed=2)
    logits = logits.float()
    params = [SamplingParams(temperature=0.6, logprobs=20, seed=i) for i in range(5)]
    _, lps = Sampler().sample(logits, params, [random.Random(i) for i in range(5)])
    from_sampler = token_confidence(torch.tensor([lp.top_logprobs for lp in lps]))
    ours = confidence_from_logits(logits, k=20, temperature=0.6)
    torch.testing.assert_close(ours, from_sampler, rtol=1e-5, atol=1e-5)
    raw = confidence_from_logits(logits, k=20)
    assert (raw - ours).abs().min() > 1e-3  # temperature changes C: the choice matters
    # top_p truncation: the sampler's top-20 then holds -inf, and C would be infinite
    trunc = [SamplingParams(temperature=0.6, top_p=0.5, logprobs=20, seed=i) for i in range(5)]
    _, lps = Sampler().sample(logits, trunc, [random.Random(i) for i in range(5)])
    assert math.isinf(token_confidence(torch.tensor([lp.top_logprobs for lp in lps])).max().item())
    assert torch.isfinite(ours).all()


# ---- windows and trace scores -----------------------------------------------------------------------------------


def test_trace_scores_hand_computed():
    confs = [1.0, 2.0, 3.0, 4.0, 10.0, 0.0]
    # windows of 3: 2, 3, 17/3, 14/3
    torch.testing.assert_close(window_means(torch.tensor(confs), 3),
                               torch.tensor([2.0, 3.0, 17 / 3, 14 / 3], dtype=torch.float64))
    s = trace_scores(confs, window=3, bottom_fraction=0.5)
    assert s.mean == pytest.approx(20 / 6)
    assert s.tail == pytest.approx(14 / 3)  # the last 3 tokens
    assert s.bottom_window == pytest.approx(2.5)  # the lowest 2 of 4 windows: (2 + 3) / 2
    assert s.lowest_window == pytest.approx(2.0)
    # bottom 10% of 4 windows rounds down to 0: at least one window, the lowest
    assert trace_scores(confs, window=3).bottom_window == pytest.approx(2.0)
    # shorter than the window: every score is the whole mean
    short = trace_scores([1.0, 2.0], window=3)
    assert short.mean == short.tail == short.bottom_window == short.lowest_window == pytest.approx(1.5)
    assert trace_scores(confs, window=3, tail=2).tail == pytest.approx(5.0)
    with pytest.raises(ValueError, match="empty trace"):
        trace_scores([], window=3)


@pytest.mark.parametrize("n_tokens, window", [(300, 64), (50, 64), (64, 64), (65, 64), (1000, 16)])
def test_trace_scores_equal_the_published_formulas(n_tokens, window):
    _, _, _, top_vals, _ = synthetic_trace(n_tokens, seed=n_tokens + window)
    confs = token_confidence(top_vals).double().tolist()
    s = trace_scores(confs, window=window)
    assert s.mean == pytest.approx(float(np.mean(confs)), rel=1e-12)
    assert s.tail == pytest.approx(oracle_tail(confs, window), rel=1e-12)
    assert s.bottom_window == pytest.approx(oracle_bottom_window(confs, window, 0.1), rel=1e-9)
    assert s.lowest_window == pytest.approx(oracle_bottom_window(confs, window, -1), rel=1e-9)
    # helper's min_conf (rounded windows) agrees to its rounding
    assert abs(s.lowest_window - min(oracle_least_grouped(confs, window))) <= 5e-4 + 1e-12


def test_group_confidence_is_the_sliding_mean_token_by_token_for_many_traces():
    """Three traces of different lengths pushed together (and a slot reused): after every token each slot's
    group confidence is the mean of its last `window` confidences (all of them while fewer), and its lowest
    group equals the oracle's min_conf of the trace so far."""
    window = 8
    traces = [token_confidence(synthetic_trace(n, seed=n)[3]).double() for n in (30, 8, 5)]
    gc = GroupConfidence(num_slots=4, window=window)
    slots = torch.tensor([3, 0, 1])
    gc.start(slots)
    for t in range(30):
        live = [i for i in range(3) if t < len(traces[i])]
        s = slots[live]
        group = gc.push(s, torch.stack([traces[i][t] for i in live]).float())
        for j, i in enumerate(live):
            seen = traces[i][:t + 1].float().double().tolist()
            expect = float(np.mean(seen[-window:]))
            assert group[j].item() == pytest.approx(expect, rel=1e-6)
            want_low = min(oracle_least_grouped(seen, window, rounded=False))
            assert gc.lowest_group(s[j:j + 1]).item() == pytest.approx(want_low, rel=1e-6)
    # reuse slot 0 for a new trace: nothing of the old one leaks in
    gc.start(torch.tensor([0]))
    g = gc.push(torch.tensor([0]), torch.tensor([5.0]))
    assert g.item() == 5.0 and gc.lowest_group(torch.tensor([0])).item() == 5.0
    assert math.isnan(gc.lowest_group(torch.tensor([2])).item())  # never started: no tokens


def test_online_stop_equals_the_patch_decision():
    """Disagreement 4 settled as the patch and deepconf.md do: stop only once the window is full, when its mean is
    strictly below the threshold. Many random traces and thresholds: the first stop token matches the oracle's."""
    window = 16
    rng = random.Random(0)
    cases = 0
    for seed in range(40):
        confs = token_confidence(synthetic_trace(rng.randint(5, 120), seed=seed)[3]).float()
        threshold = rng.uniform(float(confs.min()), float(confs.max()))
        gc = GroupConfidence(num_slots=2, window=window)
        slot = torch.tensor([1])
        gc.start(slot, threshold)
        ours = None
        for i, c in enumerate(confs):
            group = gc.push(slot, c.reshape(1))
            if bool(gc.stop(slot, group)[0]):
                ours = i
                break
        expect = oracle_stop_index(confs.double().tolist(), window, threshold)
        assert ours == expect, f"seed {seed}"
        cases += expect is not None
    assert cases > 5, "some traces were meant to be stopped"
    # never before the window is full, however low the confidence
    gc = GroupConfidence(num_slots=1, window=4)
    s = torch.tensor([0])
    gc.start(s, 100.0)
    assert [bool(gc.stop(s, gc.push(s, torch.zeros(1)))[0]) for _ in range(5)] == [False, False, False, True, True]
    # equal to the threshold is not below it; -inf (warm-up) never stops
    gc.start(s, 1.0)
    assert not any(bool(gc.stop(s, gc.push(s, torch.ones(1)))[0]) for _ in range(6))
    gc.start(s)
    assert not any(bool(gc.stop(s, gc.push(s, torch.zeros(1)))[0]) for _ in range(6))


def test_running_sum_does_not_drift_over_a_long_trace():
    """8k add/subtract pairs of values near 1000 (an fp32 running sum would drift by ~1e-4 relative)."""
    confs = 1000.0 + torch.rand(8192, generator=torch.Generator().manual_seed(0))
    gc = GroupConfidence(num_slots=1, window=256)
    s = torch.tensor([0])
    gc.start(s)
    for c in confs:
        group = gc.push(s, c.reshape(1))
    assert group.item() == pytest.approx(confs[-256:].double().mean().item(), rel=1e-12)
    assert gc.lowest_group(s).item() == pytest.approx(window_means(confs, 256).min().item(), rel=1e-12)


# ---- warm-up threshold ----------------------------------------------------------------------------------------


def test_percentile_and_threshold_equal_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 16, 17):
        v = rng.normal(10, 2, n).tolist()
        for q in (0, 10, 37.5, 90, 100):
            assert percentile(v, q) == pytest.approx(float(np.percentile(v, q)), rel=1e-12)
        # DeepConf-low keeps the top 10%: its threshold is the 90th percentile; -high the 10th
        assert warmup_threshold(v, 10) == pytest.approx(float(np.percentile(v, 90)))
        assert warmup_threshold(v, 90) == pytest.approx(float(np.percentile(v, 10)))
    # hand-computed: 4 values, 90th percentile at rank 2.7 -> 3 + 0.7 * (4 - 3)
    assert warmup_threshold([4.0, 1.0, 3.0, 2.0], 10) == pytest.approx(3.7)
    with pytest.raises(ValueError, match="eta"):
        warmup_threshold([1.0], 0)
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_restore_equals_start_and_pushes_bit_for_bit():
    """A trace put back by `restore` (re-admission after a preemption) is in exactly the state of one pushed token
    by token, and goes on identically: same group means, lowest group and stop decisions."""
    rng = random.Random(7)
    confs = [rng.uniform(0.5, 3.0) for _ in range(23)]
    more = [rng.uniform(0.5, 3.0) for _ in range(9)]
    for n in (0, 3, 5, 23):
        a, b = GroupConfidence(3, window=5), GroupConfidence(3, window=5)
        slot = torch.tensor([1])
        a.start(slot, 1.7)
        for c in confs[:n]:
            a.push(slot, torch.tensor([c]))
        b.restore(1, confs[:n], 1.7)
        for name in ("ring", "total", "count", "lowest", "threshold"):
            if name == "ring" and n < 5:
                continue  # slots not yet written hold whatever the previous trace left; push never reads them
            assert torch.equal(getattr(a, name)[1], getattr(b, name)[1]), (n, name)
        for c in more:
            ga, gb = a.push(slot, torch.tensor([c])), b.push(slot, torch.tensor([c]))
            assert torch.equal(ga, gb) and torch.equal(a.stop(slot, ga), b.stop(slot, gb))
        assert torch.equal(a.lowest_group(slot), b.lowest_group(slot))
