"""LLMEngine behaviour a user sees: stops, cancellation, rejected requests, executor failures, streaming, logs."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_toy import ToyExecutor, toy_greedy

from trtfalcon.runtime.executors.base import Executor
from trtfalcon.runtime.executors.null import NullExecutor, null_cache_spec
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams

V = 40


def toy_engine(num_blocks=64, block_size=4, num_slots=8, max_batch_size=8, max_num_tokens=32, max_seq_len=64, **kw):
    ex = ToyExecutor(V, num_blocks, block_size, num_slots)
    return LLMEngine(ex, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
                     watermark=0.0, **kw)


def test_executors_satisfy_the_protocol():
    assert isinstance(ToyExecutor(V, 4, 4, 2), Executor)
    assert isinstance(NullExecutor(V, 4, null_cache_spec(4, 4, 2)), Executor)


def test_null_executor_predicts_last_token_plus_one():
    eng = LLMEngine(NullExecutor(100, 4, null_cache_spec(32, 4, 4)), max_batch_size=4, max_num_tokens=8,
                    max_seq_len=64)
    outs = eng.generate([Request(str(i), [i * 10] * (i + 1), SamplingParams(max_new_tokens=5)) for i in range(6)])
    assert [o.token_ids for o in outs] == [[i * 10 + k for k in range(1, 6)] for i in range(6)]


def test_bad_requests_are_rejected_with_clear_errors_and_the_rest_complete():
    eng = toy_engine(num_blocks=8, block_size=4)  # 32 tokens of KV
    good = [Request(f"ok{i}", [i + 1, 2, 3], SamplingParams(max_new_tokens=6)) for i in range(3)]
    bad = {
        "empty": (Request("empty", [], SamplingParams()), "expected at least 1 token, found an empty prompt"),
        "oov": (Request("oov", [1, 2, V], SamplingParams()),
                f"expected token ids in [0, vocab_size={V}), found {V} at position 2"),
        "neg": (Request("neg", [-1], SamplingParams()), "found -1 at position 0"),
        "long": (Request("long", [1] * 60, SamplingParams(max_new_tokens=10)),
                 "= 70 tokens, expected at most max_seq_len=64"),
        "pool": (Request("pool", [1] * 30, SamplingParams(max_new_tokens=10)),
                 "needs 10 KV blocks of 4 tokens, expected at most the pool's 8"),
        "temp": (Request("temp", [1], SamplingParams(temperature=-1.0)), "temperature: expected a finite number >= 0"),
        "topp": (Request("topp", [1], SamplingParams(top_p=0.0)), "top_p: expected a number in (0, 1]"),
        "maxnew": (Request("maxnew", [1], SamplingParams(max_new_tokens=0)),
                   "max_new_tokens: expected an integer >= 1"),
        "floats": (Request("floats", [1.5, 2.0], SamplingParams()), "expected a flat sequence of integer token ids"),
    }
    reqs = good[:1] + [r for r, _ in bad.values()] + good[1:]
    outs = eng.generate(reqs)
    by_id = {o.request_id: o for o in outs}
    assert [o.request_id for o in outs] == [r.request_id for r in reqs]
    for rid, (_, msg) in bad.items():
        o = by_id[rid]
        assert o.finish_reason == "error" and o.token_ids == []
        assert f"request '{rid}' rejected" in o.error and msg in o.error, o.error
    for r in good:
        assert by_id[r.request_id].finish_reason == "length"
        assert by_id[r.request_id].token_ids == toy_greedy(list(r.prompt_ids), 6, V)


def test_duplicate_in_flight_request_id_is_rejected():
    eng = toy_engine()
    first = eng.add_request(Request("x", [1, 2], SamplingParams(max_new_tokens=3)))
    dup = eng.add_request(Request("x", [3], SamplingParams(max_new_tokens=3)))
    assert dup.finish_reason == "error" and "request_id" in dup.error
    while eng.has_work:
        eng.step()
    assert first.finish_reason == "length"


def test_stop_tokens_eos_and_ignore_eos():
    prompt = [5, 6, 7]
    free_run = toy_greedy(prompt, 12, V)
    eos = free_run[3]
    cut = free_run.index(eos) + 1
    eng = toy_engine(eos_token_ids=(eos,))
    a, b, c = eng.generate([
        Request("eos", prompt, SamplingParams(max_new_tokens=12)),
        Request("ignore", prompt, SamplingParams(max_new_tokens=12, ignore_eos=True)),
        Request("stopid", prompt, SamplingParams(max_new_tokens=12, ignore_eos=True, stop_token_ids=(free_run[1],))),
    ])
    assert a.finish_reason == "stop" and a.token_ids == free_run[:cut]
    assert b.finish_reason == "length" and b.token_ids == free_run
    assert c.finish_reason == "stop" and c.token_ids == free_run[:free_run.index(free_run[1]) + 1]


def test_cancel_frees_everything_at_once_and_ends_once():
    eng = toy_engine(num_blocks=16, num_slots=4, max_batch_size=4)
    outs = [eng.add_request(Request(str(i), [1, 2, 3, i], SamplingParams(max_new_tokens=20))) for i in range(6)]
    eng.step()
    eng.step()
    sched = eng.scheduler
    assert eng.cancel("0") and eng.cancel("5")  # one running, one still queued
    assert not eng.cancel("0") and not eng.cancel("nope")
    assert outs[0].finish_reason == "cancelled" and outs[5].finish_reason == "cancelled"
    assert len(outs[0].token_ids) == 2 and outs[5].token_ids == []
    assert sched.slots.num_free == 1 and "0" not in sched.live
    ended = []
    while eng.has_work:
        ended += [d.request_id for d in eng.step() if d.finished]
    assert sorted(ended) == sorted(str(i) for i in range(6))
    assert sched.blocks.num_free == 16 and sched.slots.num_free == 4
    for o in outs[1:5]:
        assert o.token_ids == toy_greedy([1, 2, 3, int(o.request_id)], 20, V)


class FlakyToy(ToyExecutor):
    """Fails the step in which a sequence holding token 39 runs its first chunk."""

    def execute(self, batch):
        starts = batch.input_ids[batch.cu_seqlens[:-1].long()]
        if bool(((starts == 39) & (batch.context_lens == 0)).any()):
            raise RuntimeError("device fell over")
        return super().execute(batch)


def test_executor_failure_ends_that_steps_requests_with_an_error_others_go_on():
    ex = FlakyToy(V, 64, 4, 4)
    eng = LLMEngine(ex, max_batch_size=2, max_num_tokens=8, max_seq_len=64)
    reqs = [Request("a", [1, 2], SamplingParams(max_new_tokens=4)),
            Request("b", [3, 4], SamplingParams(max_new_tokens=4)),
            Request("c", [39, 1], SamplingParams(max_new_tokens=4)),
            Request("d", [5], SamplingParams(max_new_tokens=4))]
    outs = eng.generate(reqs)
    by = {o.request_id: o for o in outs}
    assert by["c"].finish_reason == "error" and "device fell over" in by["c"].error
    assert by["d"].finish_reason == "error"  # admitted into c's step with it
    for r in reqs[:2]:  # ran before c was admitted
        assert by[r.request_id].token_ids == toy_greedy(list(r.prompt_ids), 4, V)
    assert eng.generate([Request("e", [6], SamplingParams(max_new_tokens=4))])[0].token_ids == toy_greedy([6], 4, V)
    assert eng.scheduler.blocks.num_free == 64 and eng.scheduler.slots.num_free == 4


def test_streaming_deltas_add_up_to_the_outputs():
    seen = []
    eng = toy_engine(max_num_tokens=8, stream=True, on_delta=seen.append)
    reqs = [Request(str(i), list(range(1, 3 + 2 * i)), SamplingParams(max_new_tokens=5, logprobs=2))
            for i in range(4)]
    deltas = list(eng.stream_deltas(reqs))
    assert deltas == seen
    tokens = {r.request_id: [] for r in reqs}
    finished = []
    for d in deltas:
        tokens[d.request_id] += d.token_ids
        assert d.logprobs is not None and len(d.logprobs) == len(d.token_ids)
        if d.finished:
            finished.append(d.request_id)
            assert d.output.token_ids == tokens[d.request_id] and len(d.output.logprobs) == 5
    assert sorted(finished) == ["0", "1", "2", "3"]


def test_step_log_and_timings():
    eng = toy_engine(max_num_tokens=8)
    outs = eng.generate([Request(str(i), [1] * 10, SamplingParams(max_new_tokens=4)) for i in range(3)])
    log = eng.step_log
    assert [entry.step for entry in log] == list(range(len(log)))
    assert log[0].num_prefill >= 1 and log[0].num_tokens == 8
    assert sum(entry.num_tokens for entry in log) == 3 * (10 + 3)
    assert all(e.num_decode + e.num_prefill == e.num_seqs and e.host_us > 0 for e in log)
    for o in outs:
        assert 0 <= o.ttft and o.tpot >= 0 and o.finish_time >= o.first_token_time >= o.arrival_time


def test_numpy_prompt_and_limits_validation():
    eng = toy_engine()
    out = eng.generate([Request("np", np.array([1, 2, 3], dtype=np.int64), SamplingParams(max_new_tokens=2))])[0]
    assert out.token_ids == toy_greedy([1, 2, 3], 2, V)
    with pytest.raises(ValueError, match="max_num_tokens: expected >= max_batch_size=8"):
        toy_engine(max_batch_size=8, max_num_tokens=4)
