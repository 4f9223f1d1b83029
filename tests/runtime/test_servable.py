"""Request validation against a scheduler's limits (runtime/servable.py), apart from any scheduler state.

The messages a user sees through the engine are asserted in test_engine; here: which problem wins when there are
several, that every bad sampling field is reported together, that the reference backend's check_servable says
exactly what the scheduler says, and how many outputs a request gets.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_scheduler import make_engine

from trtfalcon.errors import RequestError
from trtfalcon.runtime.prompts import Prompt, check_servable
from trtfalcon.runtime.request import Request, SamplingParams
from trtfalcon.runtime.servable import SchedulerLimits, num_samples, request_problem

LIMITS = SchedulerLimits(vocab_size=40, max_batch_size=4, max_seq_len=48, block_size=4, num_blocks=10,
                         watermark_blocks=2)


@pytest.mark.parametrize("prompt, params, want", [
    ([1, 2, 3], SamplingParams(max_new_tokens=8), None),
    (np.array([39, 0], dtype=np.uint16), SamplingParams(), None),
    ([], SamplingParams(max_new_tokens=0), "prompt_ids: expected at least 1 token, found an empty prompt"),
    ([1, 40, 41], SamplingParams(), "prompt_ids: expected token ids in [0, vocab_size=40), found 40 at position 1"),
    ([[1, 2]], SamplingParams(), "prompt_ids: expected a flat sequence of integer token ids, found dtype int64, "
                                 "shape (1, 2)"),
    ([1], SamplingParams(top_k=-1, n=5),
     "top_k: expected an integer >= 0 (0 = off), found -1; n: expected at most max_batch_size=4 samples, found 5"),
    ([1] * 40, SamplingParams(max_new_tokens=9, n=5), "n: expected at most max_batch_size=4 samples, found 5"),
    ([1] * 40, SamplingParams(max_new_tokens=9), "prompt (40 tokens) + max_new_tokens (9) = 49 tokens, expected "
                                                 "at most max_seq_len=48"),
    ([1] * 30, SamplingParams(max_new_tokens=4), "prompt (30 tokens) + max_new_tokens (4) needs 9 KV blocks of 4 "
                                                 "tokens, expected at most the pool's 8 (num_blocks=10 - watermark=2)"),
])
def test_request_problem_order_and_messages(prompt, params, want):
    assert request_problem(Request("r", prompt, params), LIMITS) == want


def test_the_last_token_needs_no_block():
    """prompt + max_new_tokens - 1 tokens are ever cached: 32 tokens fit the 8 usable blocks of 4 exactly."""
    assert request_problem(Request("r", [1] * 29, SamplingParams(max_new_tokens=4)), LIMITS) is None
    assert "needs 9 KV blocks" in request_problem(Request("r", [1] * 29, SamplingParams(max_new_tokens=5)), LIMITS)


@pytest.mark.parametrize("prompt, max_new", [([], 4), ([3, 40, 5], 4), ([-2], 4), ([1] * 40, 9), ([1, 2], 4)])
def test_reference_backend_check_says_what_the_scheduler_says(prompt, max_new):
    eng, _ = make_engine(num_blocks=64, block_size=4, num_slots=2, max_batch_size=2, max_num_tokens=8)
    out = eng.add_request(Request("q", prompt, SamplingParams(max_new_tokens=max_new)))
    if out.error is None:
        check_servable(Prompt(prompt, max_new), 40, 48, "request 0")  # servable: no error either
        return
    problem = out.error.removeprefix("request 'q' rejected: ")
    with pytest.raises(RequestError) as e:
        check_servable(Prompt(prompt, max_new), 40, 48, "request 0")
    assert str(e.value) == f"request 0: {problem}"


@pytest.mark.parametrize("n, want", [(1, 1), (4, 4), (5, 1), (0, 1), ("2", 1), (None, 1)])
def test_num_samples_is_n_only_when_n_is_valid(n, want):
    assert num_samples(SamplingParams(n=n), LIMITS) == want
