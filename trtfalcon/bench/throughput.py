"""Throughput at a fixed concurrency, measured the way trtllm-bench measures it.

`concurrency` requests are kept in flight: a new one is admitted as soon as one finishes. EOS is ignored, so
every request produces exactly its output_tokens and runs compare equal work. Warm-up requests run first, at the
same concurrency, and are not counted. TTFT and TPOT come from each request's own timestamps. As trtllm-bench runs
one engine at several concurrencies, the levels of a run share one engine (LLMEngine.from_options, sized for the
largest): with at most `concurrency` requests in flight its larger batch limit never binds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from trtfalcon.bench.dataset import BenchRequest
from trtfalcon.errors import ConfigError
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, RequestOutput, SamplingParams


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in (0, 100]): the smallest value with at least q% of the values at or below it.
    None when there are no values. (What latency reports usually mean by P50/P90/P99; no interpolation.)"""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


@dataclass
class ConcurrencyResult:
    concurrency: int
    num_requests: int
    duration_s: float
    total_output_tokens: int
    total_input_tokens: int
    request_throughput: float  # requests / s
    output_tokens_per_s: float
    output_tokens_per_s_per_gpu: float  # one process drives one device (a CPU here)
    per_user_tokens_per_s: float | None  # mean over requests of 1 / TPOT
    ttft_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    mean_live_batch: float
    num_steps: int
    host_us_per_step: dict[str, float | None]
    num_preemptions: int
    errors: list[str]
    steps: list[dict[str, Any]] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_concurrency(
    engine: LLMEngine,
    requests: list[BenchRequest],
    *,
    concurrency: int,
    warmup: int = 0,
    on_finish: Callable[[RequestOutput], None] | None = None,
) -> ConcurrencyResult:
    """`requests` on `engine` (idle, logging its steps), `concurrency` in flight; the first `warmup` run first and
    are not counted, the rest are measured."""
    if concurrency > engine.scheduler.max_batch_size or not engine.log_steps:
        raise ConfigError(f"concurrency {concurrency}: expected an engine logging its steps that runs at least that "
                          f"many sequences per step, found max_batch_size {engine.scheduler.max_batch_size}, "
                          f"log_steps {engine.log_steps}")
    engine.step_log.clear()
    if warmup:
        _drive(engine, requests[:warmup], concurrency, "warmup", None)
        engine.step_log.clear()
    requests = requests[warmup:]
    t0 = time.perf_counter()
    outputs = _drive(engine, requests, concurrency, "req", on_finish)
    duration = time.perf_counter() - t0
    done = [o for o in outputs if o.finish_reason in ("length", "stop", "confidence")]
    errors = [f"{o.request_id}: {o.error}" for o in outputs if o.finish_reason == "error"]
    out_tokens = sum(len(o.token_ids) for o in done)
    ttft = [o.ttft * 1e3 for o in done if o.ttft is not None]
    tpot = [o.tpot * 1e3 for o in done if o.tpot is not None]
    log = engine.step_log
    host = [s.host_us for s in log]

    def dist(v: list[float]) -> dict[str, float | None]:
        return {"p50": percentile(v, 50), "p90": percentile(v, 90), "p99": percentile(v, 99),
                "mean": statistics.fmean(v) if v else None}

    return ConcurrencyResult(
        concurrency=concurrency,
        num_requests=len(done),
        duration_s=duration,
        total_output_tokens=out_tokens,
        total_input_tokens=sum(len(r.input_ids) for r in requests),
        request_throughput=len(done) / duration,
        output_tokens_per_s=out_tokens / duration,
        output_tokens_per_s_per_gpu=out_tokens / duration,
        per_user_tokens_per_s=statistics.fmean(1e3 / t for t in tpot if t > 0) if tpot else None,
        ttft_ms=dist(ttft),
        tpot_ms=dist(tpot),
        mean_live_batch=statistics.fmean(s.num_seqs for s in log) if log else 0.0,
        num_steps=len(log),
        host_us_per_step=dist(host),
        num_preemptions=sum(o.num_preemptions for o in outputs),
        errors=errors,
        steps=[{"step": s.step, "num_tokens": s.num_tokens, "num_seqs": s.num_seqs, "num_decode": s.num_decode,
                "num_prefill": s.num_prefill, "execute_us": round(s.execute_us, 1), "host_us": round(s.host_us, 1)}
               for s in log],
    )


def _drive(engine: LLMEngine, requests: list[BenchRequest], concurrency: int, prefix: str,
           on_finish: Callable[[RequestOutput], None] | None) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    queue = list(enumerate(requests))
    in_flight = 0

    def admit() -> None:
        nonlocal in_flight
        while queue and in_flight < concurrency:
            i, r = queue.pop(0)
            params = SamplingParams(max_new_tokens=r.output_tokens, ignore_eos=True)
            out = engine.add_request(Request(f"{prefix}-{i}-{r.task_id}", r.input_ids, params))
            outputs.append(out)
            in_flight += 1

    admit()
    while engine.has_work:
        for delta in engine.step():
            if delta.finished:
                in_flight -= 1
                if on_finish is not None and delta.output is not None:
                    on_finish(delta.output)
        admit()
    return outputs
