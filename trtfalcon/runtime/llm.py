"""LLMEngine: requests -> scheduler -> StepBatch -> executor -> logits -> sampler -> outputs.

    engine = LLMEngine.from_options("torch", checkpoint_dir, RuntimeOptions(max_batch_size=64))
    outputs = engine.generate([Request("a", prompt_ids, SamplingParams(max_new_tokens=32))])

or drive it step by step (a server, a benchmark with a concurrency limit):

    out = engine.add_request(request)      # a live RequestOutput, already finished if the request was rejected
    while engine.has_work:
        for delta in engine.step():        # finished requests (and, with stream=True, every new token)
            ...

Every request ends exactly once: "length", "stop", "confidence" (DeepConf's online stop), "cancelled", or "error"
(rejected at add time, or its step's executor call failed). The engine is single-threaded: a server calls add_request/cancel/step from one loop.

n samples of one prompt (SamplingParams(n=4), DeepConf's parallel traces): `add_samples(request)` returns the n
outputs, request ids f"{request_id}/{k}"; each sample is a request of its own from then on (its own deltas,
finish reason, `cancel("rid/k")`), while `cancel("rid")` ends all of them. The prompt is prefilled once and the
samples fork its caches (scheduler.py). `generate` lists the n samples of a request consecutively, in sample order.

DeepConf (SamplingParams.confidence = ConfidenceParams(top_k, window, threshold)): the sampler computes each
asking row's token confidence on the logits' device, an OnlineConfidence (runtime/confidence.py) keeps each
trace's sliding-window group confidence there, one ring row per state slot, and the step's stop flags come back
in the same device-to-host copy as the token ids; a stopped trace ends in that step (finish_reason "confidence"),
its KV blocks and state slot free for the next step's admissions.

`from_options` is how generate, bench, the demo and the server build an engine (as vLLM's
LLMEngine.from_engine_args): the backend's executor (runtime/backends.py), limits capped by what that executor can
run, the model's EOS ids. The constructor takes an executor and explicit limits (tests, the host-overhead bench).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from trtfalcon.config import FalconH1Config
from trtfalcon.runtime import backends
from trtfalcon.runtime.backends import RuntimeLimits
from trtfalcon.runtime.confidence import OnlineConfidence
from trtfalcon.runtime.executors.base import Executor
from trtfalcon.runtime.options import RuntimeOptions
from trtfalcon.runtime.request import Request, RequestOutput, StreamDelta
from trtfalcon.runtime.sampler import Sampler
from trtfalcon.runtime.scheduler import FINISHED, ScheduledStep, Scheduler


@dataclass(slots=True)
class StepLog:
    """One step, for the benchmark's iteration log. Times in microseconds.

    schedule_us: choosing sequences + updating them with the sampled tokens (finishes, frees);
    build_us: filling the StepBatch; execute_us: the executor; sample_us: the sampler (incl. its device->host copy).
    host_us = schedule_us + build_us + sample_us is the runtime's own cost per step.
    """

    step: int
    num_tokens: int
    num_seqs: int
    num_decode: int
    num_prefill: int
    num_preempted: int
    num_waiting: int
    free_blocks: int
    schedule_us: float
    build_us: float
    execute_us: float
    sample_us: float
    wall_us: float

    @property
    def host_us(self) -> float:
        return self.schedule_us + self.build_us + self.sample_us


def _ended_delta(out: RequestOutput) -> StreamDelta:
    """The last delta of a request that ended outside sampling (rejected, cancelled, failed): no new token."""
    return StreamDelta(out.request_id, [], None, out.finish_reason, out)


class LLMEngine:
    """In-flight batching over one executor. Pool sizes (blocks, block_size, slots) come from executor.cache_spec.

    max_batch_size: sequences per step (also capped by the number of state slots);
    max_num_tokens: tokens per step (decode tokens + prefill chunks), at least max_batch_size;
    max_seq_len: prompt + max_new_tokens limit per request, and the block table width;
    watermark: fraction of KV blocks kept back from admissions so running sequences can grow;
    stream: step() also returns a delta for every request that got a token (else only finished ones);
    on_delta: called with each delta step() returns; log_steps: keep a StepLog per step in `step_log`.
    """

    def __init__(self, executor: Executor, *, max_batch_size: int, max_num_tokens: int, max_seq_len: int,
                 eos_token_ids: Iterable[int] = (), watermark: float = 0.01, seed: int = 0, stream: bool = False,
                 on_delta: Callable[[StreamDelta], None] | None = None, log_steps: bool = True) -> None:
        spec = executor.cache_spec
        self.executor = executor
        self.scheduler = Scheduler(
            vocab_size=executor.vocab_size, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
            max_seq_len=max_seq_len, num_blocks=spec.num_blocks, block_size=spec.block_size,
            num_slots=spec.num_slots, watermark_blocks=int(watermark * spec.num_blocks),
            eos_token_ids=tuple(eos_token_ids), seed=seed)
        self.sampler = Sampler()
        self.confidence = OnlineConfidence(spec.num_slots)
        self.stream = stream
        self.on_delta = on_delta
        self.log_steps = log_steps
        self.step_log: list[StepLog] = []
        self.num_steps = 0
        self._ended: list[RequestOutput] = []  # rejected or cancelled between steps: reported by the next step()
        # what from_options built this engine from (None when constructed directly)
        self.config: FalconH1Config | None = None
        self.options: RuntimeOptions | None = None
        self.limits: RuntimeLimits | None = None

    @classmethod
    def from_options(cls, backend: str, path: str | Path, opts: RuntimeOptions, **engine_kwargs: Any) -> LLMEngine:
        """The engine `backend` runs for `path` (a checkpoint, an ONNX export or an engine directory), sized by
        `opts` capped by what the executor can run (runtime_limits: a TensorRT engine's profile, the state slots),
        stopping at the model's EOS ids. engine_kwargs: the constructor's other settings (seed, stream, ...).
        `config`, `options` and `limits` say what it was built from."""
        executor, cfg = backends.create_executor(backend, path, opts)  # looked up here: tests stand in for it
        lim = backends.runtime_limits(executor, opts, cfg)
        engine = cls(executor, max_batch_size=lim.max_batch_size, max_num_tokens=lim.max_num_tokens,
                     max_seq_len=lim.max_seq_len, eos_token_ids=cfg.eos_token_id, **engine_kwargs)
        engine.config, engine.options, engine.limits = cfg, opts, lim
        return engine

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> RequestOutput:
        """Queue a request with n == 1 (for n > 1 use add_samples: one request, several outputs)."""
        n = request.params.n
        if isinstance(n, int) and n > 1:
            raise ValueError(f"request {request.request_id!r}: add_request takes n == 1, found n="
                             f"{n}; add_samples returns the output of every sample")
        return self.add_samples(request)[0]

    def add_samples(self, request: Request) -> list[RequestOutput]:
        """Queue a request; one live output per sample (SamplingParams.n), in sample order.

        A rejected request's outputs come back already finished with its error (a single one, with the request's
        own id, when n itself is invalid).
        """
        arrival = request.arrival_time if request.arrival_time is not None else time.perf_counter()
        outs = self.scheduler.add(request, arrival)
        if outs[0].finished:
            self._ended.extend(outs)
        return outs

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request (one sample "rid/k", or all samples of "rid"); its blocks and slot
        are free at once. False if not in flight."""
        outs = self.scheduler.cancel(request_id)
        if not outs:
            return False
        self._ended.extend(outs)
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._ended)

    # ---- stepping ------------------------------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        """Run one step; return the deltas of requests that finished (and, with stream=True, got tokens)."""
        deltas: list[StreamDelta] = []
        if self._ended:
            deltas.extend(_ended_delta(o) for o in self._ended)
            self._ended.clear()
        sched = self.scheduler
        t0 = time.perf_counter()
        step = sched.schedule()
        if step is not None:
            t1 = time.perf_counter()
            build_us = sched.last_build_s
            try:
                logits = self.executor.execute(step.batch)
            except Exception as exc:  # noqa: BLE001 - the step's requests end with this error; others go on
                sched.fail(step.seqs, f"executor failed in step {self.num_steps}: {type(exc).__name__}: {exc}")
                deltas.extend(_ended_delta(s.output) for s in step.seqs)
                self.num_steps += 1
                return self._emit(deltas)
            t2 = time.perf_counter()
            slot_pairs, block_pairs = sched.fork_samples(step)
            if slot_pairs:
                try:
                    for src, dst in slot_pairs:
                        self.executor.copy_slot(src, dst)
                    self.executor.copy_blocks(block_pairs)
                except Exception as exc:  # noqa: BLE001 - the forked samples end with this error; others go on
                    forked = sched.fail_forked(step, f"fork failed in step {self.num_steps}: "
                                                     f"{type(exc).__name__}: {exc}")
                    deltas.extend(_ended_delta(s.output) for s in forked)
            token_ids, logprobs, confidence = self._sample(step, logits)
            t3 = time.perf_counter()
            sampled = sched.update(step, token_ids, logprobs, t3, confidence)
            t4 = time.perf_counter()
            self._collect(sampled, deltas)
            if self.log_steps:
                schedule_us = ((t1 - t0) - build_us + (t4 - t3)) * 1e6
                self.step_log.append(StepLog(
                    self.num_steps, step.batch.num_tokens, len(step.seqs), step.num_decode, step.num_prefill,
                    step.num_preempted, len(sched.waiting), sched.blocks.num_free, schedule_us, build_us * 1e6,
                    (t2 - t1) * 1e6, (t3 - t2) * 1e6, (time.perf_counter() - t0) * 1e6))
            self.num_steps += 1
        return self._emit(deltas)

    def _sample(self, step: ScheduledStep, logits):  # noqa: ANN001, ANN202
        sched = self.scheduler
        if sched.slot_started:
            # DeepConf rows of the traces that took a slot this step (or in a step that failed): before the push
            self.confidence.begin(sched.take_slot_started(), logits.device, sched.running)
        rows = step.sample_rows
        if not rows:
            return [], None, None
        if len(rows) != len(step.seqs) or step.num_forked:
            logits = logits[rows]
        sample_seqs = step.sample_seqs
        params = [s.params for s in sample_seqs]
        rngs = [s.rng for s in sample_seqs]
        if not sched.num_confidence or all(p.confidence is None for p in params):
            return (*self.sampler.sample(logits, params, rngs), None)
        sample = self.sampler.sample_on_device(logits, params, rngs, [s.state_slot for s in sample_seqs])
        self.confidence.track(sample, params)
        return sample.to_host_with_confidence(params)

    def _collect(self, sampled: list, deltas: list[StreamDelta]) -> None:
        if self.stream:
            for seq in sampled:
                out = seq.output
                lp = [out.logprobs[-1]] if out.logprobs else None
                deltas.append(StreamDelta(seq.request_id, [out.token_ids[-1]], lp, out.finish_reason,
                                          out if seq.status is FINISHED else None))
        else:
            for seq in sampled:
                if seq.status is FINISHED:
                    out = seq.output
                    deltas.append(StreamDelta(seq.request_id, [out.token_ids[-1]], None, out.finish_reason, out))

    def _emit(self, deltas: list[StreamDelta]) -> list[StreamDelta]:
        if self.on_delta is not None:
            for d in deltas:
                self.on_delta(d)
        return deltas

    # ---- whole workloads -----------------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> list[RequestOutput]:
        """Run `requests` together in flight until all end; outputs in input order, the n samples of a request
        (SamplingParams.n) consecutively in sample order."""
        outputs = [out for r in requests for out in self.add_samples(r)]
        while self.has_work:
            self.step()
        return outputs

    def stream_deltas(self, requests: Iterable[Request]) -> Iterator[StreamDelta]:
        """Add `requests`, then yield every delta until all end (token by token when stream=True)."""
        for r in requests:
            self.add_samples(r)
        while self.has_work:
            yield from self.step()
