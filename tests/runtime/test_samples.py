"""n samples of one prompt (SamplingParams.n): prefill once, fork the caches, sample each trace on its own.

The key property: sample k of an n > 1 request produces exactly the tokens of a separate request with seed + k,
whatever the pools force (fork shortage, preemption of forked samples, cancellation of siblings). Toy model
(runtime_toy.py) under random load here; the real torch executor on the tiny model in test_samples_model.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_toy import assert_output_matches, check_step_invariants, toy_greedy, toy_logits, toy_next_token
from test_scheduler import VOCAB, CheckedToy, make_engine as make_checked_engine

from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams
from trtfalcon.runtime.sampler import Sampler


class ForkChecked(CheckedToy):
    """CheckedToy, plus: a step never writes into a KV block another sequence also holds, and a forked sample
    continues (context_len > 0) from the slot its fork copied into; counts forks and shared blocks seen."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.slot_copies = 0
        self.block_copies = 0
        self.max_ref_count = 0

    def execute(self, batch):
        sched = self.engine.scheduler
        b = {k: v.numpy() for k, v in batch.as_dict().items()}
        cu, bs = b["cu_seqlens"], sched.blocks.block_size
        for i in range(batch.num_seqs):
            c, n = int(b["context_lens"][i]), int(cu[i + 1] - cu[i])
            written = {int(b["block_tables"][i, p // bs]) for p in range(c, c + n)}
            for blk in written:
                assert sched.blocks.ref_counts[blk] == 1, f"step writes into shared block {blk}"
        self.max_ref_count = max(self.max_ref_count, int(sched.blocks.ref_counts.max()))
        return super().execute(batch)

    def copy_slot(self, src: int, dst: int) -> None:
        sched = self.engine.scheduler
        by_slot = {s.state_slot: s for s in sched.running}
        parent, child = by_slot[src], by_slot[dst]
        assert parent is not child and child.tokens == parent.tokens and not child.output.token_ids
        assert self.slot_owner.get(src) == (id(parent), parent.output.num_preemptions)
        self.slot_owner[dst] = (id(child), child.output.num_preemptions)
        self.slot_copies += 1
        super().copy_slot(src, dst)

    def copy_blocks(self, pairs):
        self.block_copies += len(pairs)
        super().copy_blocks(pairs)


make_engine = functools.partial(make_checked_engine, executor=ForkChecked)


def toy_run(prompt, params: SamplingParams, seed: int | None, stops=frozenset()) -> list[int]:
    """The toy on `prompt` alone, sampled with random.Random(seed) as a request with that seed would be."""
    if params.greedy:
        return toy_greedy(prompt, params.max_new_tokens, VOCAB, stops)
    rng = random.Random(seed)
    sampler = Sampler()
    tokens, out = list(prompt), []
    for _ in range(params.max_new_tokens):
        logits = toy_logits(np.array([toy_next_token(tokens, VOCAB)]), VOCAB)
        t = sampler.sample(logits, [params], [rng])[0][0]
        out.append(t)
        tokens.append(t)
        if t in stops:
            break
    return out


def prefill_tokens(eng: LLMEngine, outputs) -> int:
    """Tokens run that were not the decode of a generated token: the prompts' prefill (and recompute)."""
    return sum(e.num_tokens for e in eng.step_log) - sum(max(len(o.token_ids) - 1, 0) for o in outputs)


# ---- deterministic cases -----------------------------------------------------------------------------------
def test_n_seeded_samples_equal_separate_requests_and_prefill_once():
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # 10 tokens: 2 full blocks of 4 + a partial one
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=10, seed=7, n=4)
    eng, ex = make_engine(num_blocks=64, block_size=4, num_slots=8, max_batch_size=8, max_num_tokens=8)
    outs = eng.generate([Request("r", prompt, params)])
    assert [o.request_id for o in outs] == [f"r/{k}" for k in range(4)]
    assert [(o.parent_id, o.sample_index) for o in outs] == [("r", k) for k in range(4)]
    want = [toy_run(prompt, params, 7 + k) for k in range(4)]
    assert [o.token_ids for o in outs] == want
    assert len({tuple(w) for w in want}) > 1, "different seeds should give different traces"
    sep, _ = make_engine(num_blocks=64, block_size=4, num_slots=8, max_batch_size=8, max_num_tokens=8)
    single = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=10)
    alone = sep.generate([Request(str(k), prompt, SamplingParams(**{**single.__dict__, "seed": 7 + k}))
                          for k in range(4)])
    assert [o.token_ids for o in alone] == want
    assert prefill_tokens(eng, outs) == len(prompt) and prefill_tokens(sep, alone) == 4 * len(prompt)
    assert ex.slot_copies == 3 and ex.block_copies == 3 and ex.max_ref_count == 4
    assert all(o.finish_reason == "length" and o.num_preemptions == 0 for o in outs)
    sched = eng.scheduler
    assert sched.blocks.num_free == 64 and sched.slots.num_free == 8 and not sched.live and not sched.groups


def test_prompt_on_a_block_boundary_copies_no_block_and_greedy_samples_agree():
    prompt = list(range(1, 9))  # 2 full blocks: nothing to copy
    eng, ex = make_engine(num_blocks=32, block_size=4, num_slots=4, max_batch_size=4, max_num_tokens=16)
    outs = eng.generate([Request("g", prompt, SamplingParams(max_new_tokens=6, n=3))])
    assert [o.token_ids for o in outs] == [toy_greedy(prompt, 6, VOCAB)] * 3
    assert ex.slot_copies == 2 and ex.block_copies == 0 and ex.max_ref_count == 3


def test_generate_orders_outputs_by_request_then_sample():
    eng, _ = make_engine(num_blocks=64, block_size=4, num_slots=8, max_batch_size=8, max_num_tokens=16)
    outs = eng.generate([Request("a", [1, 2], SamplingParams(max_new_tokens=3, n=2)),
                         Request("b", [3], SamplingParams(max_new_tokens=3)),
                         Request("c", [4, 5, 6], SamplingParams(max_new_tokens=3, n=3))])
    assert [o.request_id for o in outs] == ["a/0", "a/1", "b", "c/0", "c/1", "c/2"]
    assert outs[2].parent_id is None and outs[2].sample_index == 0


def test_cancel_one_sample_mid_run_leaves_the_others_unchanged():
    prompt = [5, 6, 7, 8, 9]
    params = SamplingParams(max_new_tokens=15, temperature=0.8, seed=11, n=4)
    eng, _ = make_engine(num_blocks=40, block_size=4, num_slots=4, max_batch_size=4, max_num_tokens=8)
    outs = eng.add_samples(Request("r", prompt, params))
    for _ in range(5):
        eng.step()
    sched = eng.scheduler
    free_before = sched.slots.num_free
    assert eng.cancel("r/2")
    assert sched.slots.num_free == free_before + 1 and "r/2" not in sched.live
    assert not eng.cancel("r/2")
    ended = []
    while eng.has_work:
        ended += [d.request_id for d in eng.step() if d.finished]
        sched.blocks.check_invariants()
    assert sorted(ended) == ["r/0", "r/1", "r/2", "r/3"]
    assert outs[2].finish_reason == "cancelled" and 0 < len(outs[2].token_ids) < 15
    for k in (0, 1, 3):
        assert outs[k].finish_reason == "length" and outs[k].token_ids == toy_run(prompt, params, 11 + k)
    assert outs[2].token_ids == toy_run(prompt, params, 13)[:len(outs[2].token_ids)]
    assert sched.blocks.num_free == 40 and sched.slots.num_free == 4


def test_cancel_the_group_and_waiting_samples():
    eng, _ = make_engine(num_blocks=40, block_size=4, num_slots=4, max_batch_size=4, max_num_tokens=4)
    a = eng.add_samples(Request("a", list(range(1, 12)), SamplingParams(max_new_tokens=5, n=3)))
    b = eng.add_samples(Request("b", [1, 2, 3], SamplingParams(max_new_tokens=5, n=2)))
    eng.step()  # a/0 prefills its first chunk: a/1, a/2 wait to fork
    assert eng.cancel("a/1")  # a waiting sample: ends at once, the others go on
    assert eng.cancel("b")  # the whole group, never started
    assert not eng.cancel("b") and not eng.cancel("b/0")
    ended = []
    while eng.has_work:
        ended += [d.request_id for d in eng.step() if d.finished]
    assert sorted(ended) == ["a/0", "a/1", "a/2", "b/0", "b/1"]
    assert [o.finish_reason for o in a] == ["length", "cancelled", "length"] and a[1].token_ids == []
    assert [o.finish_reason for o in b] == ["cancelled", "cancelled"]
    assert a[0].token_ids == a[2].token_ids == toy_greedy(list(range(1, 12)), 5, VOCAB)
    assert prefill_tokens(eng, a) == 11
    assert eng.scheduler.blocks.num_free == 40 and not eng.scheduler.groups


def test_sample_zero_cancelled_before_its_prompt_is_done_hands_over():
    prompt = list(range(1, 14))
    eng, _ = make_engine(num_blocks=40, block_size=4, num_slots=4, max_batch_size=4, max_num_tokens=4)
    outs = eng.add_samples(Request("r", prompt, SamplingParams(max_new_tokens=4, n=3)))
    eng.step()
    eng.step()
    assert eng.cancel("r/0")
    while eng.has_work:
        eng.step()
    assert [o.finish_reason for o in outs] == ["cancelled", "length", "length"]
    assert outs[1].token_ids == outs[2].token_ids == toy_greedy(prompt, 4, VOCAB)
    # r/0 ran 8 prompt tokens before it was cancelled; r/1 then prefilled the prompt once for itself and r/2
    assert prefill_tokens(eng, outs[1:]) == 8 + len(prompt)


def test_samples_that_cannot_fork_prefill_themselves():
    """4 slots, two held by other requests: of 4 samples 1 forks, 2 queue (one prefills for the other)."""
    prompt = [7, 8, 9, 10, 11]
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=3, n=4)
    eng, ex = make_engine(num_blocks=40, block_size=4, num_slots=4, max_batch_size=4, max_num_tokens=8)
    bg = eng.add_request(Request("bg", [1, 2], SamplingParams(max_new_tokens=6)))
    bg2 = eng.add_request(Request("bg2", [3], SamplingParams(max_new_tokens=5)))
    eng.step()
    outs = eng.add_samples(Request("r", prompt, params))
    eng.step()  # r/0 prefills: 1 free slot for 3 samples
    assert ex.slot_copies == 1 and len(eng.scheduler.waiting) == 1 and len(eng.scheduler.waiting[0].children) == 1
    while eng.has_work:
        eng.step()
    assert [o.token_ids for o in outs] == [toy_run(prompt, params, 3 + k) for k in range(4)]
    assert bg.token_ids == toy_greedy([1, 2], 6, VOCAB) and bg2.token_ids == toy_greedy([3], 5, VOCAB)
    assert ex.slot_copies == 2 and prefill_tokens(eng, outs + [bg, bg2]) == 3 + 2 * len(prompt)


def test_n_validation_and_ids():
    eng, _ = make_engine(num_blocks=40, block_size=4, num_slots=4, max_batch_size=3, max_num_tokens=8)
    too_many = eng.add_samples(Request("x", [1], SamplingParams(n=4)))
    assert len(too_many) == 1 and too_many[0].finish_reason == "error"
    assert "n: expected at most max_batch_size=3 samples, found 4" in too_many[0].error
    zero = eng.add_samples(Request("z", [1], SamplingParams(n=0)))
    assert len(zero) == 1 and "n: expected an integer >= 1" in zero[0].error
    bad = eng.add_samples(Request("y", [VOCAB], SamplingParams(n=2)))
    assert [o.request_id for o in bad] == ["y/0", "y/1"] and all(o.finish_reason == "error" for o in bad)
    with pytest.raises(ValueError, match="add_samples"):
        eng.add_request(Request("w", [1], SamplingParams(n=2)))
    live = eng.add_samples(Request("g", [1, 2], SamplingParams(max_new_tokens=3, n=2)))
    assert "request_id" in eng.add_request(Request("g", [1])).error
    assert "request_id" in eng.add_request(Request("g/1", [1])).error
    one = eng.add_request(Request("h/0", [1], SamplingParams(max_new_tokens=3)))
    assert "request_id" in eng.add_samples(Request("h", [1], SamplingParams(n=2)))[0].error
    ended = []
    while eng.has_work:
        ended += [d.request_id for d in eng.step() if d.finished]
    assert sorted(ended) == sorted(["x", "z", "y/0", "y/1", "g", "g/1", "g/0", "g/1", "h/0", "h/0", "h/1"])
    assert all(o.finish_reason == "length" for o in live + [one])


def test_streaming_deltas_per_sample():
    eng, _ = make_engine(num_blocks=40, block_size=4, num_slots=4, max_batch_size=4, max_num_tokens=8,
                         stream=True)
    tokens: dict[str, list[int]] = {}
    for d in eng.stream_deltas([Request("s", [1, 2, 3], SamplingParams(max_new_tokens=4, n=3, logprobs=2))]):
        tokens.setdefault(d.request_id, []).extend(d.token_ids)
        assert d.logprobs is not None and len(d.logprobs) == len(d.token_ids)
        if d.finished:
            assert d.output.token_ids == tokens[d.request_id] and len(d.output.logprobs) == 4
    assert tokens == {f"s/{k}": toy_greedy([1, 2, 3], 4, VOCAB) for k in range(3)}


# ---- random load -------------------------------------------------------------------------------------------
request_st = st.tuples(st.integers(0, 6),                        # arrival step
                       st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=14),
                       st.integers(1, 8),                        # max_new_tokens
                       st.integers(1, 4),                        # n
                       st.booleans(),                            # sampled (seeded) or greedy
                       st.one_of(st.none(), st.tuples(st.integers(0, 20), st.integers(-1, 3))))  # cancel (step, k)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(4, 20), block_size=st.integers(1, 5), num_slots=st.integers(1, 6),
       max_batch_size=st.integers(1, 6), extra_tokens=st.integers(0, 8),
       requests=st.lists(request_st, min_size=1, max_size=6), stop_id=st.one_of(st.none(), st.integers(0, VOCAB - 1)))
def test_random_load_with_samples_is_correct_and_leaks_nothing(num_blocks, block_size, num_slots, max_batch_size,
                                                              extra_tokens, requests, stop_id):
    eng, ex = make_engine(num_blocks, block_size, num_slots, max_batch_size, max_batch_size + extra_tokens,
                          max_seq_len=32, eos_token_ids=() if stop_id is None else (stop_id,))
    sched = eng.scheduler
    stops = frozenset() if stop_id is None else frozenset([stop_id])
    params = [SamplingParams(max_new_tokens=m, n=n, temperature=0.9 if sampled else 0.0, top_k=6 if sampled else 0,
                             seed=1000 * i if sampled else None)
              for i, (_, _, m, n, sampled, _) in enumerate(requests)]
    ended: dict[str, int] = {}
    outputs: dict[str, object] = {}
    groups: dict[int, list] = {}
    arrivals = sorted(range(len(requests)), key=lambda i: requests[i][0])
    step = 0
    while arrivals or eng.has_work:
        while arrivals and requests[arrivals[0]][0] <= step:
            i = arrivals.pop(0)
            groups[i] = eng.add_samples(Request(str(i), requests[i][1], params[i]))
            for o in groups[i]:
                assert o.request_id not in outputs
                outputs[o.request_id] = o
        for i, (_, _, _, n, _, cancel) in enumerate(requests):
            if cancel is not None and cancel[0] == step and i in groups:
                rid = str(i) if cancel[1] < 0 or n == 1 else f"{i}/{cancel[1] % n}"
                in_flight = any(not o.finished for o in groups[i]) if rid == str(i) else rid in sched.live
                assert eng.cancel(rid) == in_flight
        for d in eng.step():
            assert d.finished and d.output is outputs[d.request_id]
            ended[d.request_id] = ended.get(d.request_id, 0) + 1
        check_step_invariants(sched)
        # every live sequence is in exactly one place: running, waiting, or waiting on its parent's prefill
        places = [id(s) for s in sched.running] + [id(s) for s in sched.waiting] + \
                 [id(c) for s in list(sched.running) + list(sched.waiting) for c in s.children]
        assert sorted(places) == sorted(id(s) for s in sched.live.values())
        assert sched._num_parents == sum(1 for s in sched.live.values() if s.children)
        step += 1
        assert step < 3000, "no progress"

    assert ended == {rid: 1 for rid in outputs}, "every sample ends exactly once"
    assert sched.blocks.num_free == num_blocks and sched.slots.num_free == num_slots
    assert not sched.live and not sched.groups and sched._num_parents == 0
    for i, (_, prompt, max_new, n, sampled, _) in enumerate(requests):
        outs = groups[i]
        if outs[0].finish_reason == "error":
            continue
        assert [o.request_id for o in outs] == ([str(i)] if n == 1 else [f"{i}/{k}" for k in range(n)])
        for k, out in enumerate(outs):
            assert_output_matches(out, toy_run(prompt, params[i], 1000 * i + k, stops), stops,
                                  f"request {i} sample {k}")


def test_forked_samples_survive_preemption():
    """A pool that forces preemption of forked samples: they recompute prompt + own tokens, still exact."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, VOCAB, size=int(n)).tolist() for n in (9, 6, 11)]
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=8, seed=50 * i, n=3))
            for i, p in enumerate(prompts)]
    eng, ex = make_engine(num_blocks=14, block_size=2, num_slots=6, max_batch_size=6, max_num_tokens=6,
                          max_seq_len=24)
    outs = eng.generate(reqs)
    assert sum(o.num_preemptions for o in outs) > 0 and ex.slot_copies > 0
    for i, p in enumerate(prompts):
        for k in range(3):
            assert outs[3 * i + k].token_ids == toy_run(p, reqs[i].params, 50 * i + k)


def test_a_failed_fork_copy_ends_only_the_forked_samples():
    class BadCopy(ForkChecked):
        def copy_slot(self, src, dst):
            raise RuntimeError("copy fell over")

    ex = BadCopy(VOCAB, 40, 4, 4)
    eng = LLMEngine(ex, max_batch_size=4, max_num_tokens=8, max_seq_len=32, watermark=0.0)
    ex.engine = eng
    outs = eng.generate([Request("r", [1, 2, 3], SamplingParams(max_new_tokens=3, n=3)),
                         Request("s", [4, 5], SamplingParams(max_new_tokens=3))])
    assert [o.finish_reason for o in outs] == ["length", "error", "error", "length"]
    assert "fork failed" in outs[1].error and "copy fell over" in outs[1].error
    assert outs[0].token_ids == toy_greedy([1, 2, 3], 3, VOCAB) and outs[3].token_ids == toy_greedy([4, 5], 3, VOCAB)
    assert eng.scheduler.blocks.num_free == 40 and eng.scheduler.slots.num_free == 4 and not eng.scheduler.groups
