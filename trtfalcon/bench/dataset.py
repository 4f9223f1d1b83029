"""Benchmark datasets in trtllm-bench's shapes (../shared/reference/benchmarking.md).

- synthetic "token-norm-dist": input/output lengths ~ Normal(mean, stdev), rounded, at least 1; random token ids.
  stdev 0 gives the fixed-length workloads users quote (512 -> 32k, 8k -> 16k).
- JSONL: one {"task_id", "input_ids" (or "prompt_ids"), "output_tokens"} per line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from trtfalcon.errors import RequestError
from trtfalcon.jsonl import is_token_ids, iter_jsonl_objects


@dataclass(frozen=True)
class BenchRequest:
    task_id: str
    input_ids: list[int]
    output_tokens: int


def token_norm_dist(
    num_requests: int, isl: int, osl: int, isl_stdev: float = 0.0, osl_stdev: float = 0.0, *,
    vocab_size: int, seed: int = 0, max_seq_len: int | None = None,
) -> list[BenchRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(num_requests):
        n_in = max(1, round(rng.gauss(isl, isl_stdev))) if isl_stdev else isl
        n_out = max(1, round(rng.gauss(osl, osl_stdev))) if osl_stdev else osl
        if max_seq_len is not None and n_in + n_out > max_seq_len:
            raise RequestError(
                f"synthetic request {i}: isl {n_in} + osl {n_out} = {n_in + n_out} tokens, expected at most "
                f"max_seq_len={max_seq_len} (lower --isl/--osl or raise --max-seq-len)"
            )
        out.append(BenchRequest(f"synthetic-{i}", [rng.randrange(vocab_size) for _ in range(n_in)], n_out))
    return out


def load_jsonl(path: Path) -> list[BenchRequest]:
    out = []
    for where, obj in iter_jsonl_objects(path):
        ids = obj.get("input_ids", obj.get("prompt_ids"))
        n_out = obj.get("output_tokens")
        if not is_token_ids(ids):
            raise RequestError(f'{where}: expected "input_ids": a list of token ids')
        if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 1:
            raise RequestError(f'{where}: expected "output_tokens": a positive integer, found {n_out!r}')
        out.append(BenchRequest(str(obj.get("task_id", where.rsplit(":", 1)[-1])), ids, n_out))
    if not out:
        raise RequestError(f"{path}: no requests found")
    return out
