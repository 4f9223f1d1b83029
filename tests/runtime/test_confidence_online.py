"""DeepConf online inside the engine, on the trained toy reasoner (tests/data/toy-reasoner): the recorded token
confidences are the model's, a trace stops at the first full window below its threshold and not before, its KV
blocks and state slot are free right after that step for a waiting request, confidence without a threshold
changes no token, and a recompute preemption does not move the stop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import hf_logits, hf_model

from trtfalcon.model.weights import load_weights
from trtfalcon.runtime.executors.torch import TorchExecutor
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import ConfidenceParams, Request, SamplingParams
from trtfalcon.tts.deepconf import confidence_from_logits, window_means
from trtfalcon.tts.toy_eval import MAX_COMPLETION_TOKENS
from trtfalcon.tts.toy_task import EOS_ID, held_out_problems, prompt_ids

TOY = Path(__file__).resolve().parents[1] / "data" / "toy-reasoner"
MAX_SEQ_LEN = 16 + MAX_COMPLETION_TOKENS
WINDOW = 8


@pytest.fixture(scope="module")
def weights():
    return load_weights(TOY, "fp32")


def engine(weights, *, slots=8, block_size=16, num_blocks=None, max_num_tokens=256):
    blocks = num_blocks if num_blocks is not None else slots * math.ceil(MAX_SEQ_LEN / block_size)
    ex = TorchExecutor(weights, num_blocks=blocks, block_size=block_size, num_slots=slots)
    return LLMEngine(ex, max_batch_size=slots, max_num_tokens=max(max_num_tokens, slots), max_seq_len=MAX_SEQ_LEN,
                     eos_token_ids=(EOS_ID,), watermark=0.0, log_steps=False)


def prompts(count):
    return [prompt_ids(p) for p in held_out_problems(count)]


def sampled(seed, threshold=None, n=1, temperature=0.8, window=WINDOW, max_new_tokens=MAX_COMPLETION_TOKENS, **kw):
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, n=n,
                          confidence=ConfidenceParams(top_k=20, window=window, threshold=threshold), **kw)


def first_stop(confs, threshold, window=WINDOW):
    """Tokens a trace keeps under DeepConf online: up to the first full window whose mean < threshold, or None."""
    if len(confs) < window:
        return None
    below = (window_means(torch.tensor(confs), window) < threshold).nonzero()
    return None if below.numel() == 0 else int(below[0]) + window


def between_lowest(outputs):
    """A threshold that some of `outputs` (run without one) fall below and some do not: between two distinct
    lowest-group confidences near the middle."""
    lows = sorted({o.lowest_group_confidence for o in outputs})
    assert len(lows) >= 2, "the traces need different confidences to choose a threshold from"
    mid = len(lows) // 2
    return (lows[mid - 1] + lows[mid]) / 2


def test_recorded_confidences_are_the_models(weights):
    """(a) Each recorded confidence equals confidence_from_logits on transformers' logits at that position (the
    request's temperature, before top-p), and -mean(top 20 logprobs) of the same engine run with no truncation."""
    oracle = hf_model(TOY)
    prompt = prompts(1)[0]
    for temperature, top_p in ((0.0, 1.0), (0.7, 0.9)):
        eng = engine(weights)
        out = eng.generate([Request("a", prompt, sampled(3, temperature=temperature, top_p=top_p,
                                                         max_new_tokens=24))])[0]
        assert len(out.confidences) == len(out.token_ids) > 5
        ids = prompt + out.token_ids
        logits = hf_logits(oracle, ids)[len(prompt) - 1: len(ids) - 1]
        want = confidence_from_logits(logits, 20, temperature)
        torch.testing.assert_close(torch.tensor(out.confidences, dtype=torch.float64), want.double(), atol=2e-4, rtol=0)
        assert out.lowest_group_confidence == pytest.approx(float(window_means(want, WINDOW).min()), abs=2e-4)

    eng = engine(weights)
    out = eng.generate([Request("b", prompt, sampled(5, temperature=0.7, logprobs=20, max_new_tokens=24))])[0]
    from_logprobs = [-sum(lp.top_logprobs) / 20 for lp in out.logprobs]
    assert out.confidences == pytest.approx(from_logprobs, abs=1e-5)
    d = out.to_dict()
    assert d["confidences"] == out.confidences and d["lowest_group_confidence"] == out.lowest_group_confidence


def test_online_stop_frees_blocks_and_slot_for_a_waiting_request_next_step(weights):
    """(b, d) Two slots, three requests: a trace whose window falls below the threshold ends in the step of that
    token with finish_reason "confidence", at the first such window; its slot and blocks are free after that
    step and the waiting request runs in them in the next one. Its tokens are a prefix of the same seeded trace
    without a threshold."""
    ps = prompts(3)
    free = engine(weights).generate([Request(str(i), p, sampled(10 + i)) for i, p in enumerate(ps)])
    threshold = between_lowest(free)
    expect = [first_stop(o.confidences, threshold) for o in free]
    assert any(e is not None for e in expect[:2]), "a running trace must stop for this test"

    eng = engine(weights, slots=2, num_blocks=2 * math.ceil(MAX_SEQ_LEN / 16))
    sched = eng.scheduler
    outs = [eng.add_request(Request(str(i), p, sampled(10 + i, threshold))) for i, p in enumerate(ps)]
    checked_handover = False
    while eng.has_work:
        before = {rid: (s.state_slot, sched.blocks.table(s.state_slot)) for rid, s in sched.live.items()
                  if s.state_slot >= 0}
        waiting = [s.request_id for s in sched.waiting]
        deltas = eng.step()
        sched.check_invariants()
        stopped = [d.request_id for d in deltas if d.finish_reason == "confidence"]
        for rid in stopped:
            slot, blocks = before[rid]
            assert not sched.slots.in_use[slot]
            assert all(sched.blocks.ref_counts[b] == 0 for b in blocks)
        if stopped and waiting and not checked_handover:
            freed = before[stopped[0]][0]
            eng.step()
            newcomer = sched.live.get(waiting[0])
            assert newcomer is not None and newcomer.state_slot == freed, "the waiting request runs in the slot"
            checked_handover = True
    assert checked_handover

    for o, ref, stop_at in zip(outs, free, expect):
        n = len(o.token_ids)
        assert o.token_ids == ref.token_ids[:n]
        assert o.confidences == pytest.approx(ref.confidences[:n], abs=1e-5)
        if o.finish_reason == "confidence":
            assert n == first_stop(o.confidences, threshold) == stop_at
            assert window_means(torch.tensor(o.confidences), WINDOW)[-1] < threshold
        else:  # ended naturally: no earlier window was below (the last token may coincide: the natural end wins)
            assert o.finish_reason == ref.finish_reason and n == len(ref.token_ids)
            assert stop_at is None or stop_at == n
    assert sum(o.finish_reason == "confidence" for o in outs) >= 1
    assert sched.blocks.num_free == sched.blocks.num_blocks and sched.slots.num_free == 2


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_confidence_without_threshold_changes_no_token(weights, temperature):
    """(c) Confidence on (threshold None) gives the tokens of the same requests with confidence off and of each
    sample run alone, n > 1 included; the confidences are those of the sample run alone."""
    ps = prompts(3)

    def reqs(conf):
        rs = []
        for i, p in enumerate(ps):
            params = sampled(20 + 4 * i, n=3 if i == 1 else 1, temperature=temperature)
            rs.append(Request(str(i), p, params if conf else SamplingParams(**{**params.__dict__,
                                                                               "confidence": None})))
        return rs

    on = engine(weights).generate(reqs(True))
    off = engine(weights).generate(reqs(False))
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert all(o.confidences is None for o in off) and all(len(o.confidences) == len(o.token_ids) for o in on)
    alone = []
    for r in reqs(True):
        p = r.params
        for k in range(p.n):
            single = SamplingParams(**{**p.__dict__, "n": 1, "seed": p.seed + k})
            alone.append(engine(weights).generate([Request("x", r.prompt_ids, single)])[0])
    assert [o.token_ids for o in on] == [o.token_ids for o in alone]
    for a, b in zip(on, alone):
        assert a.confidences == pytest.approx(b.confidences, abs=1e-5)
    if temperature:
        assert len({tuple(o.token_ids) for o in on[1:4]}) > 1, "the samples differ"


def run_tracking_preemptions(eng, request):
    """Run `request` to the end, checking the scheduler's invariants after every step; returns its outputs and,
    per preempted sample, how many tokens it had when it was last preempted."""
    outs = eng.add_samples(request)
    seen, last_at = {}, {}
    while eng.has_work:
        eng.step()
        eng.scheduler.check_invariants()
        for o in outs:
            if o.num_preemptions != seen.get(o.request_id, 0):
                seen[o.request_id] = o.num_preemptions
                last_at[o.request_id] = len(o.token_ids)
    return outs, last_at


def test_preempted_trace_stops_where_an_unpreempted_one_does(weights):
    """(e) A block pool that holds one full trace forces recompute preemptions among 8 samples; each still ends at
    the same token with the same finish reason as with room for all, including a trace whose stopping window
    straddles its preemption (its group confidence restored, not restarted, on re-admission)."""
    prompt = prompts(2)[1]
    tight = dict(slots=8, block_size=4, num_blocks=math.ceil(MAX_SEQ_LEN / 4), max_num_tokens=32)
    params = sampled(40, n=8, temperature=1.2)
    pilot, last_at = run_tracking_preemptions(engine(weights, **tight), Request("r", prompt, params))
    # A threshold that a preempted trace crosses only after its preemption: above its lowest window after it,
    # at or below every window before.
    thresholds = []
    for o in pilot:
        if o.request_id in last_at:
            wm = window_means(torch.tensor(o.confidences), WINDOW)
            cut = max(1, last_at[o.request_id] - WINDOW + 1)  # windows [0, cut) end at or before the preemption
            if wm[cut:].numel() and wm[cut:].min() < wm[:cut].min():
                thresholds.append(float(wm[cut:].min() + wm[:cut].min()) / 2)
    assert thresholds, "some preempted trace must have its lowest window after its preemption"
    threshold = min(thresholds)

    with_threshold = SamplingParams(**{**params.__dict__, "confidence": ConfidenceParams(20, WINDOW, threshold)})
    ref = engine(weights, block_size=4).generate([Request("r", prompt, with_threshold)])
    assert all(o.num_preemptions == 0 for o in ref) and any(o.finish_reason == "confidence" for o in ref)
    outs, last_at = run_tracking_preemptions(engine(weights, **tight), Request("r", prompt, with_threshold))
    assert last_at, "the tight pool must preempt"
    for o, r in zip(outs, ref):
        assert (o.finish_reason, o.token_ids) == (r.finish_reason, r.token_ids)
        assert o.confidences == pytest.approx(r.confidences, abs=1e-5)
        assert o.lowest_group_confidence == pytest.approx(r.lowest_group_confidence, abs=1e-5)
    assert any(o.finish_reason == "confidence" and o.request_id in last_at
               and len(o.token_ids) - WINDOW < last_at[o.request_id] < len(o.token_ids) for o in outs)


def test_different_windows_in_one_batch_and_unused_windows_dropped(weights):
    """Requests with different windows (and top-k) in the same steps each get their own window's group
    confidence; a later window drops the ring buffers of windows no running trace uses."""
    ps = prompts(2)
    eng = engine(weights)
    outs = eng.generate([Request("a", ps[0], sampled(1, window=4)),
                         Request("b", ps[1], SamplingParams(max_new_tokens=40, temperature=0.8, seed=2, confidence=(
                             ConfidenceParams(top_k=5, window=11))))])
    for o, w in zip(outs, (4, 11)):
        assert o.lowest_group_confidence == pytest.approx(
            float(window_means(torch.tensor(o.confidences), w).min()), abs=1e-5)
    assert set(eng.confidence.groups) == {4, 11}
    alone = engine(weights).generate([Request("b", ps[1], SamplingParams(
        max_new_tokens=40, temperature=0.8, seed=2, confidence=ConfidenceParams(top_k=5, window=11)))])[0]
    assert outs[1].confidences == pytest.approx(alone.confidences, abs=1e-5)
    eng.generate([Request("c", ps[0], sampled(3, window=6))])
    assert set(eng.confidence.groups) == {6}


@pytest.mark.parametrize("conf, field", [
    (ConfidenceParams(top_k=0), "confidence.top_k"),
    (ConfidenceParams(top_k=10_000), "confidence.top_k"),
    (ConfidenceParams(top_k=2.5), "confidence.top_k"),
    (ConfidenceParams(window=0), "confidence.window"),
    (ConfidenceParams(window=True), "confidence.window"),
    (ConfidenceParams(threshold=float("nan")), "confidence.threshold"),
    (ConfidenceParams(threshold="12"), "confidence.threshold"),
    ({"top_k": 20}, "confidence: expected a ConfidenceParams"),
])
def test_bad_confidence_params_are_rejected_naming_the_field(weights, conf, field):
    """(f)"""
    eng = engine(weights)
    out = eng.add_request(Request("bad", prompts(1)[0], SamplingParams(confidence=conf)))
    assert out.finish_reason == "error" and field in out.error
    assert eng.scheduler.num_confidence == 0
