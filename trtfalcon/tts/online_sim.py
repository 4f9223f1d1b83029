"""DeepConf online, replayed offline: which traces the engine's online stop would end, and where, from the per-token
confidences of traces that ran to their end.

DeepConf online (deepconf.py's docstring; facebookresearch/deepconf deepconf-online.py): the first `warmup` traces
run to their end and set the threshold, warmup_threshold(their lowest groups, eta); every later trace is stopped at
the first token at which its window is full and the window mean is strictly below the threshold. A trace's tokens
do not depend on whether others are stopped (each sample has its own seed, SamplingParams.n), so a stopped trace is
exactly a prefix of the same trace run to the end: its kept tokens are that prefix, up to and including the token
whose confidence closed the low window (the engine samples a token, pushes its confidence, then stops). The
replay therefore gives the online run's stopped traces, tokens generated and vote from one offline run with the
same seeds, which is how bench/tts/toy_tts_pareto.py cross-checks the engine.

The arithmetic is GroupConfidence's (deepconf.py), not window_means': each confidence rounded to fp32 (the ring's
dtype), a float64 running sum updated by add-then-subtract, divided by the window. For fp32 confidences of similar
magnitude both give the same float64 means; following the engine step by step keeps the stop decision exact when
a window mean sits on the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from trtfalcon.tts.deepconf import DEFAULT_WINDOW, trace_scores, warmup_threshold, window_sums
from trtfalcon.tts.vote import ScoredTrace, VoteResult, online_vote


def group_confidences(confidences: Sequence[float], window: int = DEFAULT_WINDOW) -> list[float]:
    """The group confidence after each token, as GroupConfidence.push returns it: the mean of the last `window`
    confidences (of all of them while fewer)."""
    return [t / min(i + 1, window) for i, t in enumerate(window_sums(list(confidences), window))]


def lowest_group(confidences: Sequence[float], window: int = DEFAULT_WINDOW) -> float:
    """A trace's lowest group confidence (DeepConf's min_conf) as GroupConfidence.lowest_group gives it: the lowest
    full window, or the whole-trace mean while the trace is shorter than the window."""
    groups = group_confidences(confidences, window)
    if not groups:
        raise ValueError("DeepConf lowest group of an empty trace: a trace needs at least one generated token")
    if len(groups) < window:
        return groups[-1]
    return min(groups[window - 1:])


def online_stop(confidences: Sequence[float], threshold: float, window: int = DEFAULT_WINDOW) -> int | None:
    """How many tokens a trace keeps under DeepConf's online stop: i + 1 for the first token i whose window is full
    and whose window mean is strictly below `threshold`; None when no window falls below it (the trace ends on its
    own, as the full trace did)."""
    for i, g in enumerate(group_confidences(confidences, window)):
        if i + 1 >= window and g < threshold:
            return i + 1
    return None


@dataclass(frozen=True)
class SimulatedOnline:
    """The replayed online run of one prompt: the threshold the warm-up set; per trace, the tokens it keeps, whether
    it was stopped and its ScoredTrace as the vote sees it; the tokens generated in all; the vote."""

    threshold: float
    kept_tokens: list[int]
    stopped: list[bool]
    traces: list[ScoredTrace]
    tokens_generated: int
    vote: VoteResult


def simulate_online(confidences: Sequence[Sequence[float]], answers: Sequence[str | None], *, warmup: int,
                    eta: float, window: int = DEFAULT_WINDOW, stop_margin: float = 0.0) -> SimulatedOnline:
    """DeepConf online over the traces of one prompt, from their full runs in seed order (trace k = seed + k).

    confidences[k]: trace k's per-token confidences to its end; answers[k]: the answer of its full text. Traces
    0 .. warmup-1 are the warm-up (never stopped); the rest are stopped by online_stop, except at their own last
    token: a trace whose window falls below the threshold at the token it ends on ends as it would have anyway
    (the engine's finish reason is then stop or length, not confidence; the scheduler checks those first), so it
    counts as not stopped (its lowest window is below the threshold: it does not vote either). A stopped trace never
    votes (online_vote), so the answer of its prefix is not needed; its ScoredTrace has answer None and the
    scores of its prefix. Unstopped traces keep their full scores, with lowest_window = lowest_group (the
    engine's arithmetic).

    stop_margin: later traces stop below threshold + stop_margin instead (the vote still uses the threshold). The
    engine's fp32 logits, hence confidences, change in their last bits with the batch's shape, so a window mean that
    ties the threshold (a twin of the warm-up trace that set it) may fall either side of it in another run; a small
    positive margin replays "every tie stops", a small negative one "every tie runs on".
    """
    if len(confidences) != len(answers):
        raise ValueError(f"online replay: {len(confidences)} traces' confidences but {len(answers)} answers")
    if not 1 <= warmup <= len(confidences):
        raise ValueError(f"online replay warm-up: expected 1 to {len(confidences)} traces (the budget), found "
                         f"{warmup!r}")
    threshold = warmup_threshold([lowest_group(c, window) for c in confidences[:warmup]], eta)
    kept, stopped, traces = [], [], []
    for k, (confs, answer) in enumerate(zip(confidences, answers)):
        stop = None if k < warmup else online_stop(confs, threshold + stop_margin, window)
        if stop == len(confs):  # the trace's own last token (stop token, max_new_tokens): it ended, not stopped
            stop = None
        n = len(confs) if stop is None else stop
        prefix = list(confs[:n])
        scores = replace(trace_scores(prefix, window=window), lowest_window=lowest_group(prefix, window))
        kept.append(n)
        stopped.append(stop is not None)
        traces.append(ScoredTrace(None if stop is not None else answer, scores, stop is not None))
    return SimulatedOnline(threshold, kept, stopped, traces, sum(kept), online_vote(traces, threshold))

