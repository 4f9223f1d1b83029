"""Votes over the final answers of many traces: majority, confidence-weighted, top-eta filtered, DeepConf online.

Follows facebookresearch/deepconf (analysis_offline.py, deepconf-online.py, helper.py):
- A trace without an answer (None or empty) does not vote, and is dropped before any filtering.
- Weighted vote: each answer's weight is the sum of its traces' confidences; the heaviest wins; ties go to the
  answer that appeared first (python's max over insertion order there, the same here). Majority = weight 1 each.
- Top-eta filter: keep the traces whose score is >= the (100 - eta) percentile of the scores (numpy's linear
  percentile, so ties at the cut all stay), then vote weighted by that same score.
- Online: a trace votes only if it was not stopped and its lowest-group confidence is >= the warm-up threshold
  (warm-up traces included); weight = lowest-group confidence.
- Consensus (the paper's optional early end of sampling): the winner's share of the total weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from trtfalcon.tts.deepconf import DEEPCONF_HIGH_ETA, DEEPCONF_LOW_ETA, SCORE_NAMES, TraceScores, percentile


@dataclass(frozen=True)
class ScoredTrace:
    """What a vote needs of one trace: its extracted answer, its DeepConf scores, whether DeepConf stopped it."""

    answer: str | None
    scores: TraceScores
    stopped: bool = False


@dataclass(frozen=True)
class VoteResult:
    """The winner (None when nobody voted) and the table: (answer, votes, weight), heaviest first, ties in order
    of first appearance."""

    answer: str | None
    table: list[tuple[str, int, float]] = field(default_factory=list)

    @property
    def num_votes(self) -> int:
        return sum(n for _, n, _ in self.table)

    @property
    def consensus(self) -> float:
        """The winner's share of the total weight (0 when nobody voted)."""
        total = sum(w for _, _, w in self.table)
        return self.table[0][2] / total if self.table and total > 0 else 0.0


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> VoteResult:
    """Sum the weights per answer (weight 1 each when None: a majority vote); skip traces without an answer."""
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"weighted vote: {len(answers)} answers but {len(weights)} weights")
    votes: dict[str, list[float]] = {}  # answer -> [votes, weight], in order of first appearance
    for i, a in enumerate(answers):
        if not a:
            continue
        entry = votes.setdefault(a, [0, 0.0])
        entry[0] += 1
        entry[1] += 1.0 if weights is None else float(weights[i])
    ranked = sorted(votes.items(), key=lambda kv: -kv[1][1])  # sorted is stable: ties keep first-seen order
    table = [(a, int(n), w) for a, (n, w) in ranked]
    return VoteResult(table[0][0] if table else None, table)


def majority_vote(answers: Sequence[str | None]) -> VoteResult:
    return weighted_vote(answers)


def top_eta(scores: Sequence[float], eta: float) -> list[bool]:
    """Which traces the top-eta% filter keeps: score >= the (100 - eta) percentile (ties at the cut all kept)."""
    if not 0.0 < eta <= 100.0:
        raise ValueError(f"DeepConf eta: expected a percentage in (0, 100], found {eta!r}")
    if not scores:
        return []
    cut = percentile(scores, 100.0 - eta)
    return [s >= cut for s in scores]


def filtered_vote(traces: Sequence[ScoredTrace], score: str, eta: float | None = None) -> VoteResult:
    """Vote weighted by `score`, over the top eta% of the answered traces by that score (all of them if None)."""
    valid = [t for t in traces if t.answer]
    values = [t.scores.get(score) for t in valid]
    if eta is not None:
        keep = top_eta(values, eta)
        valid = [t for t, k in zip(valid, keep) if k]
        values = [v for v, k in zip(values, keep) if k]
    return weighted_vote([t.answer for t in valid], values)


def offline_votes(traces: Sequence[ScoredTrace], etas: Sequence[float] = (DEEPCONF_LOW_ETA, DEEPCONF_HIGH_ETA),
                  scores: Sequence[str] = SCORE_NAMES) -> dict[str, VoteResult]:
    """Every offline method by name: "majority", "weighted_<score>", and "top<eta>_<score>" (filtered + weighted).
    DeepConf-low / -high offline are top10 / top90 (with the lowest_window score, as online uses)."""
    out = {"majority": majority_vote([t.answer for t in traces])}
    for s in scores:
        out[f"weighted_{s}"] = filtered_vote(traces, s)
    for eta in etas:
        for s in scores:
            out[f"top{eta:g}_{s}"] = filtered_vote(traces, s, eta)
    return out


def online_vote(traces: Sequence[ScoredTrace], threshold: float) -> VoteResult:
    """DeepConf online's vote: traces not stopped, with lowest_window >= threshold, weighted by lowest_window."""
    kept = [t for t in traces if t.answer and not t.stopped and t.scores.lowest_window >= threshold]
    return weighted_vote([t.answer for t in kept], [t.scores.lowest_window for t in kept])
