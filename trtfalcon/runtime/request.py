"""What a user asks for (Request, SamplingParams) and what they get back (RequestOutput, StreamDelta).

Times are `time.perf_counter()` seconds: the engine stamps arrival (unless the request brings its own, from the
same clock), first token and finish, from which the benchmark derives TTFT and TPOT.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

FINISH_REASONS = ("length", "stop", "confidence", "cancelled", "error")


@dataclass(frozen=True)
class ConfidenceParams:
    """DeepConf's per-trace settings (SamplingParams.confidence); tts/deepconf.py has the formulas.

    Each generated token's confidence is the negative mean of the `top_k` largest log-probabilities of the
    distribution the sampler draws from after temperature but before top-k/top-p truncation (greedy rows:
    temperature 1). The trace's group confidence is the mean over its last `window` tokens. With a `threshold`,
    the trace ends (finish_reason "confidence") at the first token where a full window's mean is strictly below
    it; None never stops (warm-up traces, offline runs), the confidences are still recorded.
    """

    top_k: int = 20                 # tts.deepconf.DEFAULT_TOP_K
    window: int = 2048              # tokens; tts.deepconf.DEFAULT_WINDOW
    threshold: float | None = None

    def problems(self, vocab_size: int) -> list[str]:
        """Every field out of range, as 'confidence.field: expected ..., found ...' (empty when valid)."""
        found: list[str] = []
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= vocab_size:
            found.append(f"confidence.top_k: expected an integer in [1, vocab_size={vocab_size}], found "
                         f"{self.top_k!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            found.append(f"confidence.window: expected an integer >= 1 (tokens), found {self.window!r}")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
            found.append(f"confidence.threshold: expected a finite number or None (never stop), found {t!r}")
        return found


@dataclass
class SamplingParams:
    """How one request picks its tokens.

    temperature 0 is greedy (argmax, ties to the lowest id); top_k 0 and top_p 1.0 disable those filters.
    `seed` makes a sampled request reproducible whatever else shares its batches (each request draws from its own
    generator); None draws a seed from the engine's generator. Generation stops at `max_new_tokens`, or earlier at a
    token of `stop_token_ids`, or at the model's EOS unless `ignore_eos` (the benchmark setting, so every request
    does the same work; as in vLLM, stop_token_ids still apply). The stop token itself is part of the output.
    `logprobs` = k > 0 returns, per generated token, its log-probability and the k most likely tokens with theirs,
    all from the distribution actually sampled from (log_softmax of the logits after temperature, top-k, top-p).

    `n` > 1 asks for n samples of the prompt (DeepConf's parallel traces): n sequences with request ids
    f"{request_id}/{k}" (k = 0 .. n-1), sample k seeded with `seed + k` when a seed is given (else each draws its own
    seed from the engine's generator). The prompt is prefilled once; the samples then fork its KV blocks and Mamba
    state and each samples its own tokens, ending on its own (length / stop / cancel). Sample k's tokens equal those
    of a separate request with seed + k. 1 <= n <= the engine's max_batch_size.

    `confidence` (ConfidenceParams) turns on DeepConf: every generated token's confidence is recorded
    (RequestOutput.confidences) and, with a threshold, a trace whose sliding-window confidence falls below it ends
    in the step of that token (finish_reason "confidence"), freeing its caches at once. With n > 1 every sample
    carries the same settings.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0
    n: int = 1
    confidence: ConfidenceParams | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def problems(self, vocab_size: int) -> list[str]:
        """Every field that is out of range, as 'field: expected ..., found ...' (empty when valid)."""
        found: list[str] = []

        def bad(name: str, expected: str) -> None:
            found.append(f"{name}: expected {expected}, found {getattr(self, name)!r}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            bad("top_p", "a number in (0, 1] (1 = off)")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= vocab_size:
            bad("logprobs", f"an integer in [0, vocab_size={vocab_size}]")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "an integer >= 1 (samples of the prompt)")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "an integer or None")
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in self.stop_token_ids):
            bad("stop_token_ids", f"token ids in [0, vocab_size={vocab_size})")
        if self.confidence is not None:
            if isinstance(self.confidence, ConfidenceParams):
                found.extend(self.confidence.problems(vocab_size))
            else:
                bad("confidence", "a ConfidenceParams or None")
        return found


@dataclass
class Request:
    """One prompt to complete. `arrival_time` (perf_counter clock) lets a load generator stamp when it was sent."""

    request_id: str
    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float | None = None


@dataclass
class TokenLogprobs:
    """Log-probabilities around one generated token (SamplingParams.logprobs = k > 0).

    top_ids/top_logprobs are the k most likely tokens, most likely first. DeepConf's token
    confidence is `-mean(top_logprobs)`. Tokens removed by top-k/top-p have logprob -inf.
    """

    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class RequestOutput:
    """The result of one request; the engine fills it in as generation proceeds (a live object).

    `finish_reason` is None while running, then one of "length", "stop", "confidence" (DeepConf's online stop),
    "cancelled", "error" (with `error` holding the message). `logprobs` has one entry per generated token when the request asked for them.
    For a request with SamplingParams.n > 1 there is one RequestOutput per sample: request_id f"{parent_id}/{k}",
    `parent_id` the request's own id and `sample_index` k (for n == 1: parent_id None, sample_index 0).
    """

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    parent_id: str | None = None
    sample_index: int = 0
    confidences: list[float] | None = None
    lowest_group_confidence: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, seconds (None with fewer than two tokens)."""
        if self.first_token_time is None or self.finish_time is None or len(self.token_ids) < 2:
            return None
        return (self.finish_time - self.first_token_time) / (len(self.token_ids) - 1)

    def to_dict(self) -> dict[str, Any]:
        """What a user reads, JSON-ready (`trtfalcon generate --json` prints it after the prompt's index and sample):
        prompt_ids, token_ids, finish_reason, then error only when set, logprobs only when asked for, and
        confidences with lowest_group_confidence only when DeepConf was on."""
        out: dict[str, Any] = {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids,
                               "finish_reason": self.finish_reason}
        if self.error:
            out["error"] = self.error
        if self.logprobs is not None:
            out["logprobs"] = [asdict(lp) for lp in self.logprobs]
        if self.confidences is not None:
            out["confidences"] = self.confidences
            out["lowest_group_confidence"] = self.lowest_group_confidence
        return out


@dataclass
class StreamDelta:
    """What one step added to one request: for streaming. `output` is set on the request's last delta."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    output: RequestOutput | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
