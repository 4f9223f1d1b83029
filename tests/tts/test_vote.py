"""Votes and answer extraction: hand-built cases, and the published DeepConf voting code's rules (an oracle written
here from analysis_offline.py / deepconf-online.py) on many random trace sets."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import numpy as np
import pytest

from trtfalcon.tts.answers import TOY_ANSWER, RegexAnswer, boxed_answer, get_extractor
from trtfalcon.tts.deepconf import SCORE_NAMES, TraceScores
from trtfalcon.tts.vote import (
    ScoredTrace, filtered_vote, majority_vote, offline_votes, online_vote, top_eta, weighted_vote,
)


def scores(v: float, **over: float) -> TraceScores:
    return TraceScores(**{"mean": v, "tail": v, "bottom_window": v, "lowest_window": v, **over})


# ---- the oracle ---------------------------------------------------------------------------------------------------


def oracle_majority(answers):
    return Counter(answers).most_common(1)[0][0] if answers else None


def oracle_weighted(answers, weights):
    acc = defaultdict(float)
    for a, w in zip(answers, weights):
        acc[a] += w
    return max(acc.items(), key=lambda x: x[1])[0] if acc else None


def oracle_top_filtered(answers, confs, top_percent):
    cut = np.percentile(confs, (1 - top_percent) * 100)
    kept = [(a, c) for a, c in zip(answers, confs) if c >= cut]
    return oracle_weighted([a for a, _ in kept], [c for _, c in kept])


def oracle_online(traces, bar):
    """deepconf-online.py: warm-up and final traces vote if min_conf >= bar (final ones below it were stopped)."""
    kept = [t for t in traces if t.scores.lowest_window >= bar and t.answer]
    return oracle_weighted([t.answer for t in kept], [t.scores.lowest_window for t in kept])


# ---- votes --------------------------------------------------------------------------------------------------------


def test_votes_hand_computed():
    answers = ["7", "5", "7", None, "5", "5", ""]
    weights = [10.0, 1.0, 9.0, 50.0, 2.0, 3.0, 40.0]
    m = majority_vote(answers)
    assert m.answer == "5" and m.table == [("5", 3, 3.0), ("7", 2, 2.0)] and m.num_votes == 5
    w = weighted_vote(answers, weights)  # no answer / empty answer: no vote, whatever the weight
    assert w.answer == "7" and w.table == [("7", 2, 19.0), ("5", 3, 6.0)]
    assert w.consensus == pytest.approx(19 / 25)
    # ties go to the answer seen first (python's max over insertion order in the published code)
    assert majority_vote(["b", "a", "a", "b"]).answer == "b"
    assert weighted_vote(["x", "y"], [2.0, 2.0]).answer == "x"
    none = majority_vote([None, ""])
    assert none.answer is None and none.table == [] and none.consensus == 0.0
    with pytest.raises(ValueError, match="3 answers but 2 weights"):
        weighted_vote(["a", "b", "c"], [1.0, 2.0])


def test_top_eta_keeps_ties_at_the_cut_and_the_right_share():
    assert top_eta([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 10) == [False] * 9 + [True]
    assert top_eta([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 90) == [False] + [True] * 9
    assert top_eta([3.0, 3.0, 3.0], 10) == [True, True, True]
    assert top_eta([], 10) == []
    with pytest.raises(ValueError, match="eta"):
        top_eta([1.0], 0)


def test_filtered_vote_uses_one_score_for_filter_and_weight():
    traces = [
        ScoredTrace("1", scores(1.0, tail=9.0)),
        ScoredTrace("2", scores(5.0, tail=1.0)),
        ScoredTrace("2", scores(4.0, tail=2.0)),
        ScoredTrace(None, scores(100.0)),  # no answer: dropped before the filter
    ]
    assert filtered_vote(traces, "mean").answer == "2"
    assert filtered_vote(traces, "tail").answer == "1"
    top = filtered_vote(traces, "mean", eta=10)  # 90th percentile of (1, 5, 4) = 4.8: only the 5.0 trace
    assert top.answer == "2" and top.num_votes == 1
    assert filtered_vote(traces, "tail", eta=10).table == [("1", 1, 9.0)]
    with pytest.raises(ValueError, match="trace score: expected one of"):
        filtered_vote(traces, "median")


def test_offline_votes_equal_the_published_analysis_on_random_trace_sets():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 40)
        pool = [str(rng.randint(0, 5)) for _ in range(rng.randint(1, 4))]
        traces = []
        for _ in range(n):
            answer = rng.choice(pool) if rng.random() > 0.1 else None
            s = TraceScores(*(round(rng.uniform(5, 15), rng.choice([1, 3])) for _ in SCORE_NAMES))  # some ties
            traces.append(ScoredTrace(answer, s))
        got = offline_votes(traces)
        valid = [t for t in traces if t.answer]
        answers = [t.answer for t in valid]
        assert got["majority"].answer == oracle_majority(answers), trial
        for s in SCORE_NAMES:
            confs = [t.scores.get(s) for t in valid]
            assert got[f"weighted_{s}"].answer == oracle_weighted(answers, confs), (trial, s)
            if valid:
                assert got[f"top10_{s}"].answer == oracle_top_filtered(answers, confs, 0.1), (trial, s)
                assert got[f"top90_{s}"].answer == oracle_top_filtered(answers, confs, 0.9), (trial, s)


def test_online_vote_equals_the_published_rule():
    rng = random.Random(1)
    for trial in range(300):
        traces = []
        for _ in range(rng.randint(1, 30)):
            low = rng.uniform(5, 15)
            traces.append(ScoredTrace(rng.choice(["a", "b", "c", None]), scores(low)))
        bar = rng.uniform(5, 15)
        # a trace DeepConf stopped has a window below the bar, so its lowest window is below it too
        traces = [ScoredTrace(t.answer, t.scores, stopped=t.scores.lowest_window < bar and rng.random() < 0.7)
                  for t in traces]
        assert online_vote(traces, bar).answer == oracle_online(traces, bar), trial
    # a stopped trace never votes, even if its (recorded) lowest window were above the bar
    assert online_vote([ScoredTrace("a", scores(9.0), stopped=True), ScoredTrace("b", scores(6.0))], 5.0).answer == "b"


# ---- answer extraction --------------------------------------------------------------------------------------------


def oracle_deepconf_boxed(text):
    """helper.extract_answer for a well-formed \\boxed{...}: the text after the last 'boxed', braces balanced."""
    ans = text.split("boxed")[-1]
    depth, out = 1, ""
    for c in ans[1:]:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                break
        out += c
    return out.strip()


@pytest.mark.parametrize("text, expect", [
    (r"so the answer is $\boxed{42}$.", "42"),
    (r"\boxed{1} first, then \boxed{ \frac{1}{2} }", r"\frac{1}{2}"),
    (r"\boxed{\left\{ x : x^{2} = 4 \right\}}", r"\left\{ x : x^{2} = 4 \right\}"),
    (r"$\boxed 7$", "7"),
    (r"\boxed{12", None),  # cut off mid-answer: no answer (DeepConf's helper would say "12")
    (r"\boxed{ }", None),  # an empty box is no answer
    ("no box here", None),
    (r"ends with \boxed", None),
])
def test_boxed_answer(text, expect):
    assert boxed_answer(text) == expect
    if expect is not None and r"\boxed{" in text:
        assert boxed_answer(text) == oracle_deepconf_boxed(text)


def test_regex_extractors():
    assert TOY_ANSWER("37+85=122;122+19=141;A:141") == "141"
    assert TOY_ANSWER("A:1;A:22") == "22"  # the last marked answer counts
    assert TOY_ANSWER("37+85=122;122+19=141;A:") is None
    assert get_extractor("toy") is TOY_ANSWER and get_extractor("boxed") is boxed_answer
    ex = get_extractor(r"answer is (\w+)")
    assert isinstance(ex, RegexAnswer) and ex("the answer is B.") == "B"
    assert get_extractor(r"\d+")("a 1 b 23") == "23"  # no group: the whole match
    with pytest.raises(ValueError, match="not a valid regular expression"):
        get_extractor("(unclosed")
