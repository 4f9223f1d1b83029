"""Whether a request can ever be served within an engine's limits: a property of the request and the limits.

The scheduler calls `request_problem` when a request is added (it adds the one check that needs its own state:
request ids in flight), so a request that can never run ends at once with its error instead of waiting forever;
prompts.check_servable asks the same of the unbatched reference backend. Each problem reads "field: expected
..., found ..." for the caller to prefix with the request it is about.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trtfalcon.runtime.request import Request, SamplingParams


@dataclass(frozen=True)
class SchedulerLimits:
    """What one scheduler can serve: the model's vocab, its batch, sequence-length and KV-pool sizes."""

    vocab_size: int
    max_batch_size: int  # also the most samples (SamplingParams.n) of one request: they run side by side
    max_seq_len: int
    block_size: int
    num_blocks: int
    watermark_blocks: int  # kept back from admissions (BlockManager)


def prompt_problem(prompt_ids: Sequence[int] | np.ndarray, vocab_size: int) -> str | None:
    """An empty prompt, a non-integer one, or a token id outside the vocab (the first such, with its position)."""
    if len(prompt_ids) == 0:
        return "prompt_ids: expected at least 1 token, found an empty prompt"
    arr = np.asarray(prompt_ids)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        return f"prompt_ids: expected a flat sequence of integer token ids, found dtype {arr.dtype}, shape {arr.shape}"
    if int(arr.min()) < 0 or int(arr.max()) >= vocab_size:
        pos = int(np.flatnonzero((arr < 0) | (arr >= vocab_size))[0])
        return f"prompt_ids: expected token ids in [0, vocab_size={vocab_size}), found {int(arr[pos])} at " \
               f"position {pos}"
    return None


def length_problem(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> str | None:
    total = prompt_len + max_new_tokens
    if total > max_seq_len:
        return f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} tokens, expected at " \
               f"most max_seq_len={max_seq_len}"
    return None


def request_problem(request: Request, limits: SchedulerLimits) -> str | None:
    """Why `request` can never be served within `limits` (None when it can): the prompt first, then every bad
    sampling parameter together, then the lengths against max_seq_len and the KV pool."""
    problem = prompt_problem(request.prompt_ids, limits.vocab_size)
    if problem is not None:
        return problem
    params = request.params
    problems = params.problems(limits.vocab_size)
    if isinstance(params.n, int) and params.n > limits.max_batch_size:
        problems.append(f"n: expected at most max_batch_size={limits.max_batch_size} samples, found {params.n}")
    if problems:
        return "; ".join(problems)
    prompt_len, max_new = len(request.prompt_ids), params.max_new_tokens
    problem = length_problem(prompt_len, max_new, limits.max_seq_len)
    if problem is not None:
        return problem
    # At its longest a sequence caches prompt + max_new_tokens - 1 tokens (the last token is never fed back),
    # and after a preemption it must be re-admitted with that many, watermark included.
    peak = -(-(prompt_len + max_new - 1) // limits.block_size)
    usable = limits.num_blocks - limits.watermark_blocks
    if peak > usable:
        return f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) needs {peak} KV blocks of " \
               f"{limits.block_size} tokens, expected at most the pool's {usable} (num_blocks={limits.num_blocks} " \
               f"- watermark={limits.watermark_blocks})"
    return None


def num_samples(params: SamplingParams, limits: SchedulerLimits) -> int:
    """How many outputs a request gets: n when n itself is valid, else 1 (its rejection, under the request's own
    id)."""
    n = params.n
    return n if isinstance(n, int) and 1 <= n <= limits.max_batch_size else 1
