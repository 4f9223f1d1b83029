"""The scheduler under random load, driven through LLMEngine with the toy model (see runtime_toy.py).

Random arrivals, prompt lengths crossing chunk and block boundaries, cancellations, and pools small enough to force
chunked prefill and preemption. After every step: no block or slot owned twice, batch limits and StepBatch
invariants hold, a sequence only continues (context_len > 0) from state it wrote into its own slot. At the end:
every request ended exactly once, everything is free, and greedy tokens equal the toy run on each prompt alone.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_toy import ToyExecutor, assert_output_matches, check_step_invariants, toy_greedy

from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams

VOCAB = 40


class CheckedToy(ToyExecutor):
    """The toy, plus checks of every StepBatch against the engine's state at the moment it runs."""

    engine: LLMEngine

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.slot_owner: dict[int, tuple[int, int]] = {}
        self.max_seen_tokens = 0
        self.max_seen_seqs = 0

    def execute(self, batch):
        sched = self.engine.scheduler
        b = {k: v.numpy() for k, v in batch.as_dict().items()}
        n_tok, n_seq = batch.num_tokens, batch.num_seqs
        assert 1 <= n_tok <= sched.max_num_tokens and 1 <= n_seq <= sched.max_batch_size
        self.max_seen_tokens = max(self.max_seen_tokens, n_tok)
        self.max_seen_seqs = max(self.max_seen_seqs, n_seq)
        cu = b["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == n_tok and (np.diff(cu) >= 1).all()
        assert len(set(b["state_slots"].tolist())) == n_seq, "two sequences in one slot"
        by_slot = {s.state_slot: s for s in sched.running}
        bs = sched.blocks.block_size
        for i in range(n_seq):
            c, slot = int(b["context_lens"][i]), int(b["state_slots"][i])
            n = int(cu[i + 1] - cu[i])
            assert (b["positions"][cu[i]:cu[i + 1]] == np.arange(c, c + n)).all()
            seq = by_slot[slot]
            assert seq.num_computed == c and seq.tokens[c:c + n] == b["input_ids"][cu[i]:cu[i + 1]].tolist()
            # The block table covers every position up to the end of the chunk with blocks this row holds.
            held = sched.blocks.table(slot)
            need = -(-(c + n) // bs)
            assert len(held) >= need and b["block_tables"][i, :need].tolist() == held[:need]
            assert (sched.blocks.ref_counts[held] >= 1).all()
            # A reused slot never leaks: context_len > 0 only for the incarnation that started there with 0.
            key = (id(seq), seq.output.num_preemptions)
            if c == 0:
                self.slot_owner[slot] = key
            else:
                assert self.slot_owner.get(slot) == key, f"slot {slot} continued by a sequence that did not start it"
        return super().execute(batch)


def make_engine(num_blocks, block_size, num_slots, max_batch_size, max_num_tokens, max_seq_len=48,
                executor=CheckedToy, **kw):
    """An engine on a checked toy executor (CheckedToy or a subclass), which sees the engine to check its steps."""
    ex = executor(VOCAB, num_blocks, block_size, num_slots)
    eng = LLMEngine(ex, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
                    watermark=0.0, **kw)
    ex.engine = eng
    return eng, ex


request_st = st.tuples(st.integers(0, 6),                       # arrival step
                       st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20),
                       st.integers(1, 10),                      # max_new_tokens
                       st.one_of(st.none(), st.integers(0, 25)))  # cancel at this step


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(4, 24), block_size=st.integers(1, 5), num_slots=st.integers(1, 6),
       max_batch_size=st.integers(1, 6), extra_tokens=st.integers(0, 10),
       requests=st.lists(request_st, min_size=1, max_size=10), stop_id=st.one_of(st.none(), st.integers(0, VOCAB - 1)))
def test_random_load_is_correct_and_leaks_nothing(num_blocks, block_size, num_slots, max_batch_size, extra_tokens,
                                                 requests, stop_id):
    eng, ex = make_engine(num_blocks, block_size, num_slots, max_batch_size, max_batch_size + extra_tokens,
                          eos_token_ids=() if stop_id is None else (stop_id,))
    sched = eng.scheduler
    ended: dict[str, int] = {}
    outputs = {}
    arrivals = sorted(enumerate(requests), key=lambda x: x[1][0])
    step = 0
    while arrivals or eng.has_work:
        while arrivals and arrivals[0][1][0] <= step:
            i, (_, prompt, max_new, _) = arrivals.pop(0)
            outputs[str(i)] = eng.add_request(Request(str(i), prompt, SamplingParams(max_new_tokens=max_new)))
        for i, (_, _, _, cancel_at) in enumerate(requests):
            if cancel_at == step and str(i) in outputs:
                was_live = str(i) in sched.live
                assert eng.cancel(str(i)) == was_live
        for d in eng.step():
            assert d.finished and d.output is outputs[d.request_id]
            ended[d.request_id] = ended.get(d.request_id, 0) + 1
        check_step_invariants(sched)
        step += 1
        assert step < 2000, "no progress"

    assert ended == {str(i): 1 for i in range(len(requests))}, "every request ends exactly once"
    assert sched.blocks.num_free == num_blocks and sched.slots.num_free == num_slots and not sched.live
    stops = frozenset() if stop_id is None else frozenset([stop_id])
    for i, (_, prompt, max_new, _) in enumerate(requests):
        out = outputs[str(i)]
        if out.finish_reason == "error":
            assert f"request '{i}' rejected" in out.error
            assert len(prompt) + max_new > 48 or -(-(len(prompt) + max_new - 1) // block_size) > num_blocks
            continue
        assert_output_matches(out, toy_greedy(prompt, max_new, VOCAB, stops), stops, f"request {i}")


def test_chunked_prefill_and_preemption_happen_and_match():
    """A deterministic heavy case: long prompts in 3-token chunks, a pool that forces repeated preemption."""
    rng = np.random.default_rng(0)
    eng, ex = make_engine(num_blocks=12, block_size=2, num_slots=4, max_batch_size=4, max_num_tokens=5,
                          max_seq_len=24)
    prompts = [rng.integers(0, VOCAB, size=int(n)).tolist() for n in rng.integers(1, 12, size=10)]
    outs = eng.generate([Request(str(i), p, SamplingParams(max_new_tokens=12)) for i, p in enumerate(prompts)])
    assert sum(o.num_preemptions for o in outs) > 0
    assert any(log.num_prefill and log.num_decode for log in eng.step_log), "decode and prefill share steps"
    assert max(log.num_tokens for log in eng.step_log) <= 5
    for p, o in zip(prompts, outs):
        assert o.finish_reason == "length" and o.token_ids == toy_greedy(p, 12, VOCAB)


def test_seeded_sampling_survives_preemption():
    """Preempted (recomputed) requests draw the same random numbers: sampled tokens equal an unpressured run."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, VOCAB, size=int(n)).tolist() for n in rng.integers(2, 10, size=8)]
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=8, seed=100 + i))
            for i, p in enumerate(prompts)]
    tight, _ = make_engine(num_blocks=10, block_size=2, num_slots=4, max_batch_size=4, max_num_tokens=4)
    roomy, _ = make_engine(num_blocks=200, block_size=4, num_slots=8, max_batch_size=8, max_num_tokens=64)
    a, b = tight.generate(reqs), roomy.generate(reqs)
    assert sum(o.num_preemptions for o in a) > 0
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_reused_slot_starts_fresh():
    """One slot serves requests back to back; the second one's first chunk has context_len 0."""
    eng, ex = make_engine(num_blocks=16, block_size=4, num_slots=1, max_batch_size=1, max_num_tokens=8)
    ex.keep_batches = True
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    outs = eng.generate([Request(str(i), p, SamplingParams(max_new_tokens=4)) for i, p in enumerate(prompts)])
    firsts = [b for b in ex.batches if b["input_ids"].tolist() == prompts[1]]
    assert len(firsts) == 1 and firsts[0]["context_lens"].tolist() == [0] and firsts[0]["state_slots"].tolist() == [0]
    assert [o.token_ids for o in outs] == [toy_greedy(p, 4, VOCAB) for p in prompts]
