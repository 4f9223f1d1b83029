"""SequenceStatus: the path each sequence takes through the scheduler's queues, observed between steps.

Every observed change of status is one of NEXT_STATUS's moves, every sequence ends FINISHED, a preemption is
exactly a RUNNING -> WAITING move (counted in num_preemptions), and samples of one prompt go FORK_PENDING ->
RUNNING when they fork, FORK_PENDING -> WAITING when they must prefill the prompt themselves. The invariant
checker itself fails on a sequence whose status disagrees with its queue.
"""

from __future__ import annotations

import numpy as np
import pytest
from runtime_toy import check_step_invariants, toy_greedy
from test_samples import make_engine as make_fork_engine
from test_scheduler import make_engine

from trtfalcon.runtime.request import Request, SamplingParams
from trtfalcon.runtime.scheduler import NEXT_STATUS, SequenceStatus

VOCAB = 40
W, F, R, X = (SequenceStatus.WAITING, SequenceStatus.FORK_PENDING, SequenceStatus.RUNNING,
              SequenceStatus.FINISHED)


def run_and_trace(eng, requests):
    """Add `requests`, step to the end; each sequence's statuses, one entry per change seen between steps."""
    sched = eng.scheduler
    outputs = [o for r in requests for o in eng.add_samples(r)]
    seqs = {o.request_id: sched.live[o.request_id] for o in outputs}
    paths = {rid: [s.status] for rid, s in seqs.items()}
    while eng.has_work:
        eng.step()
        check_step_invariants(sched)
        for rid, s in seqs.items():
            if s.status is not paths[rid][-1]:
                paths[rid].append(s.status)
    return outputs, paths


def assert_legal(paths):
    for rid, path in paths.items():
        assert path[-1] is X, f"{rid} did not end: {path}"
        for a, b in zip(path, path[1:]):
            assert b in NEXT_STATUS[a], f"{rid}: {a.name} -> {b.name} in {[s.name for s in path]}"


def test_preempted_sequences_go_back_to_waiting_once_per_preemption():
    rng = np.random.default_rng(0)
    eng, _ = make_engine(num_blocks=12, block_size=2, num_slots=4, max_batch_size=4, max_num_tokens=5,
                         max_seq_len=24)
    prompts = [rng.integers(0, VOCAB, size=int(n)).tolist() for n in rng.integers(1, 12, size=10)]
    outs, paths = run_and_trace(eng, [Request(str(i), p, SamplingParams(max_new_tokens=12))
                                      for i, p in enumerate(prompts)])
    assert_legal(paths)
    assert sum(o.num_preemptions for o in outs) > 0
    for o in outs:
        path = paths[o.request_id]
        assert path[0] is W and path[1] is R
        assert sum(1 for a, b in zip(path, path[1:]) if (a, b) == (R, W)) == o.num_preemptions
        assert o.token_ids == toy_greedy(prompts[int(o.request_id)], 12, VOCAB)


def test_samples_fork_or_queue_to_prefill_themselves():
    """4 slots, two held by other requests: r/1 forks (FORK_PENDING -> RUNNING), r/2 queues to prefill the prompt
    (FORK_PENDING -> WAITING -> RUNNING) and r/3 forks from r/2's prefill."""
    eng, _ = make_fork_engine(num_blocks=40, block_size=4, num_slots=4, max_batch_size=4, max_num_tokens=8)
    sched = eng.scheduler
    eng.add_request(Request("bg", [1, 2], SamplingParams(max_new_tokens=6)))
    eng.add_request(Request("bg2", [3], SamplingParams(max_new_tokens=5)))
    eng.step()
    outs, paths = run_and_trace(eng, [Request("r", [7, 8, 9, 10, 11], SamplingParams(max_new_tokens=4, n=4))])
    assert_legal(paths)
    assert paths == {"r/0": [W, R, X], "r/1": [F, R, X], "r/2": [F, W, R, X], "r/3": [F, R, X]}
    assert all(o.finish_reason == "length" for o in outs) and not sched.live


def test_sample_zero_ending_mid_prefill_hands_over_to_the_next():
    eng, _ = make_fork_engine(num_blocks=40, block_size=4, num_slots=4, max_batch_size=4, max_num_tokens=4)
    sched = eng.scheduler
    eng.add_request(Request("first", [1, 2, 3], SamplingParams(max_new_tokens=8)))
    eng.add_samples(Request("r", list(range(1, 14)), SamplingParams(max_new_tokens=4, n=3)))
    eng.step()
    eng.step()
    r0, r1, r2 = (sched.live[f"r/{k}"] for k in range(3))
    assert r0.status is R and r0.children == [r1, r2] and r1.status is r2.status is F
    assert eng.cancel("r/0")
    assert r0.status is X and r1.status is W and sched.waiting[0] is r1
    assert r1.children == [r2] and r2.parent is r1 and r2.status is F
    check_step_invariants(sched)


def test_ending_twice_or_for_an_unknown_reason_is_refused():
    eng, _ = make_engine(num_blocks=16, block_size=4, num_slots=2, max_batch_size=2, max_num_tokens=8)
    sched = eng.scheduler
    eng.add_request(Request("a", [1, 2], SamplingParams(max_new_tokens=3)))
    seq = sched.live["a"]
    with pytest.raises(AssertionError, match="because"):
        sched.end([seq], "because")
    assert seq.status is W and "a" in sched.live
    sched.end([seq], "cancelled")
    with pytest.raises(AssertionError, match="FINISHED -> FINISHED"):
        sched.end([seq], "cancelled")


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: setattr(s.running[0], "status", W), "is in running with status WAITING"),
    (lambda s: s.waiting.append(s.running[0]), "is in running and in waiting"),
    (lambda s: s.running.pop(), "not exactly the live ones"),
])
def test_invariant_check_catches_a_status_that_disagrees_with_its_queue(corrupt, message):
    eng, _ = make_engine(num_blocks=16, block_size=4, num_slots=2, max_batch_size=2, max_num_tokens=8)
    eng.add_request(Request("a", [1, 2], SamplingParams(max_new_tokens=3)))
    eng.step()
    sched = eng.scheduler
    sched.check_invariants()
    corrupt(sched)
    with pytest.raises(AssertionError, match=message):
        sched.check_invariants()
