"""Test-time scaling with DeepConf on the in-flight runtime: many reasoning traces per prompt, one voted answer.

    engine = LLMEngine.from_options("torch", checkpoint, RuntimeOptions(max_batch_size=64))
    result = run_tts(engine, prompt_ids, TTSConfig(budget=32, warmup=8, mode="online", eta=10), TOY_ANSWER,
                     decode=tokenizer.decode)
    result.answer, result.vote.table, result.tokens_generated, result.threshold

Two modes, as facebookresearch/deepconf runs them on vLLM (../shared/reference/deepconf.md):

- online (deepconf-online.py): `warmup` traces run to their end with no threshold; the threshold is
  warmup_threshold(their lowest-group confidences, eta), the (100 - eta) percentile; the remaining budget - warmup
  traces run with it, and the engine stops a trace in the step where a full window's mean falls strictly below it
  (finish_reason "confidence"). The vote is online_vote over all traces: a trace votes if it was not stopped and
  its lowest window is >= the threshold, weighted by it (warm-up traces too). warmup == budget is allowed: every
  trace is a warm-up trace, none can be stopped, and the vote is the online vote over them (a top-eta filter by
  lowest window with their own threshold); `TTSResult.notes` says so. warmup > budget is rejected.
- offline: `budget` traces with no threshold; the answer is DeepConf-low/high offline (top-eta by lowest window,
  weighted by it: the vote named f"top{eta:g}_lowest_window"), and `votes` holds every offline vote
  (tts.vote.offline_votes: majority, weighted, top10/top90 by each score) over the same traces.

Trace k of a prompt always has seed `config.seed + k` (warm-up traces are 0 .. warmup-1), in both modes and
whatever runs beside it, so an online trace is a prefix of the offline trace with the same k (a stopped one ends
early; the others are equal) and `run_tts_many` gives what `run_tts` gives prompt by prompt.

`run_tts_many` keeps every prompt in flight in one engine: all warm-ups are submitted at once, and as soon as one
prompt's warm-up traces have all ended its threshold is computed and its other traces are added between engine
steps while the other prompts keep running. A request of n samples shares one prefill of the prompt; budgets larger
than the engine's batch go in several requests (seeds still k = 0 .. budget-1).

Confidences come from the engine (SamplingParams.confidence: C_i per generated token, computed on the logits'
device); each trace's TraceScores are tts.deepconf.trace_scores of them with the config's window, except
lowest_window, which is the engine's own lowest group (RequestOutput.lowest_group_confidence; equal to the offline
score up to float rounding): the threshold is set from and compared with the numbers the engine's stop compared,
so a trace the engine let run is never filtered out of the vote by a last-bit difference. (Logits, hence
confidences, differ in their last bits with the batch's shape: a trace whose window mean ties the threshold can be
stopped in one run and not in another; the tokens of every trace do not depend on what runs beside it.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Sequence

from trtfalcon.errors import ConfigError, RequestError
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import ConfidenceParams, Request, RequestOutput, SamplingParams
from trtfalcon.tts.answers import AnswerExtractor
from trtfalcon.tts.deepconf import (
    DEEPCONF_HIGH_ETA, DEEPCONF_LOW_ETA, DEFAULT_TOP_K, DEFAULT_WINDOW, TraceScores, trace_scores, warmup_threshold,
)
from trtfalcon.tts.vote import ScoredTrace, VoteResult, filtered_vote, offline_votes, online_vote

MODES = ("online", "offline")
ONLINE_VOTE = "online"

Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class TTSConfig:
    """DeepConf's settings for one prompt (the same for every prompt of run_tts_many). Defaults are DeepConf's
    (deepconf.md) except budget (its 512) and window (its 2048 stays; use a shorter one for small models).

    max_new_tokens None: as many as the engine's max_seq_len leaves after the prompt. Invalid values raise
    ConfigError naming every bad field (`problems()` lists them)."""

    budget: int = 64  # traces per prompt in all, warm-up included
    warmup: int = 16  # online: warm-up traces that set the threshold (DeepConf's N_init); ignored offline
    mode: str = "online"  # "online" | "offline"
    eta: float = DEEPCONF_LOW_ETA  # % of traces kept: 10 = DeepConf-low, 90 = DeepConf-high
    top_k: int = DEFAULT_TOP_K  # log-probabilities per token averaged into its confidence
    window: int = DEFAULT_WINDOW  # tokens of the sliding-window group confidence
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int | None = None
    seed: int = 0  # trace k has seed + k

    def __post_init__(self) -> None:
        found = self.problems()
        if found:
            raise ConfigError("TTSConfig: " + "; ".join(found))

    def problems(self) -> list[str]:
        """Every invalid field as 'field: expected ..., found ...' (empty when valid)."""
        found: list[str] = []

        def bad(name: str, expected: str) -> None:
            found.append(f"{name}: expected {expected}, found {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.budget) or self.budget < 1:
            bad("budget", "an integer >= 1 (traces per prompt)")
        if self.mode not in MODES:
            bad("mode", " or ".join(repr(m) for m in MODES))
        if not is_int(self.warmup) or self.warmup < 1:
            bad("warmup", "an integer >= 1 (warm-up traces that set the online threshold)")
        elif self.mode == "online" and is_int(self.budget) and self.warmup > self.budget:
            bad("warmup", f"at most budget={self.budget} (the warm-up traces are part of the budget)")
        if not is_num(self.eta) or not 0.0 < self.eta < 100.0:
            bad("eta", "a percentage in (0, 100): 10 = DeepConf-low, 90 = DeepConf-high")
        if not is_int(self.top_k) or self.top_k < 1:
            bad("top_k", "an integer >= 1 (log-probabilities per token confidence)")
        if not is_int(self.window) or self.window < 1:
            bad("window", "an integer >= 1 (tokens of the group confidence window)")
        if not is_num(self.temperature) or self.temperature <= 0:
            bad("temperature", "a finite number > 0 (traces are sampled; at 0 every trace would be the same)")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", "a number in (0, 1] (1 = off)")
        if self.max_new_tokens is not None and (not is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            bad("max_new_tokens", "an integer >= 1, or None (what max_seq_len leaves after the prompt)")
        if not is_int(self.seed):
            bad("seed", "an integer")
        return found

    @property
    def vote_name(self) -> str:
        """The vote that gives the answer: "online", or the offline top-eta vote by lowest window."""
        return ONLINE_VOTE if self.mode == "online" else f"top{self.eta:g}_lowest_window"

    @property
    def num_warmup(self) -> int:
        """Warm-up traces this config runs (0 offline)."""
        return self.warmup if self.mode == "online" else 0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TraceResult:
    """One trace: its index k (seed = config.seed + k), extracted answer (None: it gave none), DeepConf scores,
    whether DeepConf online stopped it, and the engine's output (token ids, confidences, finish reason)."""

    index: int
    seed: int
    warmup: bool
    answer: str | None
    scores: TraceScores
    stopped: bool
    output: RequestOutput = field(repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.output.token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.output.finish_reason

    @property
    def scored(self) -> ScoredTrace:
        """What a vote takes of this trace."""
        return ScoredTrace(self.answer, self.scores, self.stopped)

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "seed": self.seed, "warmup": self.warmup, "answer": self.answer,
                "stopped": self.stopped, "finish_reason": self.finish_reason, "num_tokens": self.num_tokens,
                "scores": {"mean": self.scores.mean, "tail": self.scores.tail,
                           "bottom_window": self.scores.bottom_window, "lowest_window": self.scores.lowest_window}}


@dataclass(frozen=True)
class TTSResult:
    """The outcome for one prompt.

    answer: the winner of `vote` (None when no trace voted). vote: the vote that decided (online, or top-eta by
    lowest window offline). votes: every vote computed from these traces by name (online: {"online": vote};
    offline: offline_votes, which holds `vote` under config.vote_name). threshold: the online stop threshold (None
    offline). tokens_generated: every trace's generated tokens, warm-up included (prompts not counted).
    notes: anything the caller should know about how this run degenerated (warmup == budget, no trace answered).
    """

    config: TTSConfig
    answer: str | None
    vote: VoteResult
    votes: dict[str, VoteResult]
    traces: list[TraceResult]
    threshold: float | None
    tokens_generated: int
    notes: list[str] = field(default_factory=list)

    @property
    def num_stopped(self) -> int:
        return sum(t.stopped for t in self.traces)

    @property
    def num_answered(self) -> int:
        return sum(t.answer is not None for t in self.traces)

    def as_dict(self, traces: bool = True) -> dict[str, Any]:
        """JSON-ready: the answer, the vote table, the tokens, the threshold, and (traces=True) every trace."""
        out: dict[str, Any] = {
            "answer": self.answer, "vote": self.config.vote_name,
            "table": [{"answer": a, "votes": n, "weight": w} for a, n, w in self.vote.table],
            "tokens_generated": self.tokens_generated, "threshold": self.threshold,
            "traces": len(self.traces), "stopped": self.num_stopped, "answered": self.num_answered,
            "notes": self.notes, "config": self.config.as_dict(),
            "votes": {name: v.answer for name, v in self.votes.items()},
        }
        if traces:
            out["trace_results"] = [t.as_dict() for t in self.traces]
        return out


def run_tts(engine: LLMEngine, prompt_ids: Sequence[int], config: TTSConfig, extractor: AnswerExtractor, *,
            decode: Decode, progress: bool = False) -> TTSResult:
    """DeepConf on one prompt: `config.budget` traces on `engine`, their answers (`extractor` of `decode`(token
    ids)) voted as config.mode says. See the module docstring."""
    return run_tts_many(engine, [prompt_ids], config, extractor, decode=decode, progress=progress)[0]


def run_tts_many(engine: LLMEngine, prompts: Sequence[Sequence[int]], config: TTSConfig,
                 extractor: AnswerExtractor, *, decode: Decode, progress: bool = False) -> list[TTSResult]:
    """DeepConf on every prompt, all in flight together on `engine`; results in prompt order, each what run_tts of
    that prompt alone gives (same seeds: trace k of every prompt has config.seed + k; the same tokens, except where a
    window mean ties the threshold to float rounding, see the module docstring).

    A prompt the engine can never serve (ids outside the vocab, too long for max_seq_len or the KV pool) raises
    RequestError naming it before anything runs; a trace that fails in the engine raises RequestError after the
    other traces are cancelled. progress=True shows a bar of finished traces on a terminal (stderr).
    Other requests already on the engine keep running while this drives it; their outputs are theirs to read.
    """
    if not isinstance(config, TTSConfig):
        raise ConfigError(f"config: expected a TTSConfig, found {type(config).__name__}")
    if not prompts:
        return []
    runs = [_PromptRun(i, list(p), config, engine) for i, p in enumerate(prompts)]
    for run in runs:  # every prompt checked before any runs: a bad one must not leave the others half done
        run.check(engine)
    bar = _TraceBar(len(runs) * config.budget, progress)
    by_id: dict[str, tuple[_PromptRun, int]] = {}  # request id of a trace -> its prompt run, its index
    try:
        with bar:
            for run in runs:
                by_id.update(run.submit(engine, warmup=config.mode == "online"))
            pending = len(runs) * config.budget
            while pending:
                if not engine.has_work:
                    raise RuntimeError("tts: the engine went idle with traces still running (a runtime bug)")
                for delta in engine.step():
                    owner = by_id.get(delta.request_id)
                    if owner is None or not delta.finished:
                        continue
                    run, k = owner
                    out = delta.output
                    if out is not None and out.finish_reason == "error":
                        raise RequestError(f"tts prompt {run.index}, trace {k}: {out.error}")
                    pending -= 1
                    bar.advance(delta.output)
                    if run.warmup_done(k):
                        by_id.update(run.submit(engine, warmup=False))
    except BaseException:
        for rid, (run, k) in by_id.items():
            if not run.outputs[k].finished:
                engine.cancel(rid)
        raise
    return [run.result(extractor, decode) for run in runs]


class _PromptRun:
    """One prompt's traces through the protocol: which are submitted, which ended, the threshold."""

    def __init__(self, index: int, prompt_ids: list[int], config: TTSConfig, engine: LLMEngine) -> None:
        self.index = index
        self.prompt_ids = prompt_ids
        self.config = config
        self.outputs: list[RequestOutput | None] = [None] * config.budget
        self.warmup_left = config.num_warmup
        self.threshold: float | None = None
        self.next_trace = 0  # traces 0 .. next_trace-1 are submitted
        room = engine.scheduler.max_seq_len - len(prompt_ids)
        self.max_new_tokens = config.max_new_tokens if config.max_new_tokens is not None else max(1, room)
        self.max_samples = engine.scheduler.max_batch_size  # n of one request

    def params(self, n: int, first: int) -> SamplingParams:
        c = self.config
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                              seed=c.seed + first, n=n,
                              confidence=ConfidenceParams(top_k=c.top_k, window=c.window, threshold=self.threshold))

    def requests(self, first: int, count: int) -> list[Request]:
        """Traces first .. first+count-1 as requests of at most max_samples samples; sample j of a request seeded
        s has seed s + j (runtime), so trace k always gets config.seed + k."""
        out = []
        for start in range(first, first + count, self.max_samples):
            n = min(self.max_samples, first + count - start)
            out.append(Request(f"tts{self.index}-{start}", self.prompt_ids, self.params(n, start)))
        return out

    def check(self, engine: LLMEngine) -> None:
        problem = engine.scheduler.check(self.requests(0, min(self.config.budget, self.max_samples))[0])
        if problem is not None:
            raise RequestError(f"tts prompt {self.index}: {problem}")

    def submit(self, engine: LLMEngine, warmup: bool) -> dict[str, tuple[_PromptRun, int]]:
        """Add the warm-up traces (warmup=True, online), or every trace not yet submitted (after the warm-up has
        set the threshold, or all of them offline). Returns request id -> (self, trace index) of each sample."""
        count = self.config.num_warmup if warmup else self.config.budget - self.next_trace
        added: dict[str, tuple[_PromptRun, int]] = {}
        for req in self.requests(self.next_trace, count):
            first = self.next_trace
            for j, out in enumerate(engine.add_samples(req)):
                self.outputs[first + j] = out
                added[out.request_id] = (self, first + j)
            self.next_trace += req.params.n
        return added

    def warmup_done(self, k: int) -> bool:
        """Trace k ended: True when it was the last warm-up trace, after which the threshold is set."""
        if k >= self.config.num_warmup:
            return False
        self.warmup_left -= 1
        if self.warmup_left:
            return False
        lowest = [self.scores(self.outputs[j]).lowest_window for j in range(self.config.num_warmup)]
        self.threshold = warmup_threshold(lowest, self.config.eta)
        return self.next_trace < self.config.budget

    def scores(self, out: RequestOutput | None) -> TraceScores:
        if out is None or not out.confidences:
            raise RequestError(f"tts prompt {self.index}, trace {getattr(out, 'request_id', '?')}: expected one "
                               f"confidence per generated token, found none (finish_reason "
                               f"{getattr(out, 'finish_reason', None)!r})")
        scores = trace_scores(out.confidences, window=self.config.window)
        if out.lowest_group_confidence is not None:  # the engine's: what its online stop compared (module doc)
            scores = replace(scores, lowest_window=float(out.lowest_group_confidence))
        return scores

    def result(self, extractor: AnswerExtractor, decode: Decode) -> TTSResult:
        c = self.config
        traces = []
        for k, out in enumerate(self.outputs):
            assert out is not None and out.finished
            traces.append(TraceResult(
                index=k, seed=c.seed + k, warmup=k < c.num_warmup, answer=extractor(decode(out.token_ids)) or None,
                scores=self.scores(out), stopped=out.finish_reason == "confidence", output=out))
        scored = [t.scored for t in traces]
        notes = []
        if c.mode == "online":
            assert self.threshold is not None
            vote = online_vote(scored, self.threshold)
            votes = {ONLINE_VOTE: vote}
            if c.warmup == c.budget:
                notes.append(f"warmup == budget ({c.budget}): every trace was a warm-up trace, none could be "
                             "stopped; the vote is the online vote over them")
        else:
            etas = sorted({DEEPCONF_LOW_ETA, DEEPCONF_HIGH_ETA, float(c.eta)})
            votes = offline_votes(scored, etas=etas)
            vote = votes.get(c.vote_name) or filtered_vote(scored, "lowest_window", c.eta)
        if not any(t.answer for t in traces):
            notes.append(f"no trace gave an answer ({len(traces)} traces): nothing to vote on")
        elif vote.answer is None:
            notes.append("no trace passed the vote's filter: no answer")
        return TTSResult(config=c, answer=vote.answer, vote=vote, votes=votes, traces=traces,
                         threshold=self.threshold, tokens_generated=sum(t.num_tokens for t in traces), notes=notes)


class _TraceBar:
    """A rich bar of finished traces and tokens generated, on a terminal only (trtfalcon.progress)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.progress = self.task = None
        self.tokens = 0
        if enabled:
            from trtfalcon.progress import count_bar

            self.progress, self.task = count_bar(total, "tts traces")

    def __enter__(self) -> _TraceBar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self, out: RequestOutput | None) -> None:
        if self.progress is None:
            return
        self.tokens += len(out.token_ids) if out is not None else 0
        self.progress.update(self.task, advance=1, info=f"{self.tokens:,} tokens")
