"""The offline replay of DeepConf online (tts/online_sim.py): hand-computed stops, the same arithmetic as the
engine's GroupConfidence token by token, and the protocol (warm-up never stopped, threshold from the warm-up,
stopped traces never vote, tokens = warm-up + prefixes)."""

from __future__ import annotations

import random

import pytest
import torch

from trtfalcon.tts.deepconf import GroupConfidence, trace_scores, warmup_threshold
from trtfalcon.tts.online_sim import group_confidences, lowest_group, online_stop, simulate_online


def test_online_stop_hand_computed():
    confs = [5.0, 5.0, 1.0, 1.0, 5.0, 5.0]
    # windows of 2: 5, 3, 1, 3, 5 (full from token 1 on)
    assert group_confidences(confs, 2) == [5.0, 5.0, 3.0, 1.0, 3.0, 5.0]
    assert online_stop(confs, 3.0, 2) == 4  # 3 is not strictly below 3; the window ending at token 3 (1.0) is
    assert online_stop(confs, 3.5, 2) == 3  # the window ending at token 2 (mean 3) is below 3.5: 3 tokens kept
    assert online_stop(confs, 1.0, 2) is None  # nothing strictly below 1
    assert online_stop([0.1, 0.1], 5.0, 3) is None  # never a full window: never stopped
    assert online_stop([0.1, 0.1, 0.1], 5.0, 3) == 3
    assert lowest_group(confs, 2) == 1.0
    assert lowest_group([2.0, 4.0], 3) == 3.0  # shorter than the window: the whole-trace mean


def test_groups_and_stop_equal_the_engines_group_confidence_token_by_token():
    rng = random.Random(0)
    window = 7
    traces = [[rng.uniform(0.5, 20.0) for _ in range(rng.randint(1, 40))] for _ in range(30)]
    thresholds = [rng.uniform(5, 15) for _ in traces]
    gc = GroupConfidence(len(traces), window)
    slots = torch.arange(len(traces))
    gc.start(slots, torch.tensor(thresholds, dtype=torch.float64))
    engine_stop: list[int | None] = [None] * len(traces)
    for step in range(max(map(len, traces))):
        live = [i for i, t in enumerate(traces) if step < len(t) and engine_stop[i] is None]
        s = torch.tensor(live, dtype=torch.int64)
        group = gc.push(s, torch.tensor([traces[i][step] for i in live], dtype=torch.float32))
        stop = gc.stop(s, group)
        for j, i in enumerate(live):
            assert group[j].item() == group_confidences(traces[i], window)[step]  # bit for bit
            if stop[j]:
                engine_stop[i] = step + 1
    assert [online_stop(t, th, window) for t, th in zip(traces, thresholds)] == engine_stop
    assert any(engine_stop) and not all(engine_stop)  # the thresholds stop some traces, not all
    free = GroupConfidence(len(traces), window)
    free.start(slots)
    for step in range(max(map(len, traces))):
        live = [i for i, t in enumerate(traces) if step < len(t)]
        free.push(torch.tensor(live), torch.tensor([traces[i][step] for i in live], dtype=torch.float32))
    assert free.lowest_group(slots).tolist() == [lowest_group(t, window) for t in traces]
    # and window_means (offline trace_scores) agree to the last bit on fp32 confidences of this range
    f32 = [torch.tensor(t, dtype=torch.float32).tolist() for t in traces]
    assert [trace_scores(t, window=window).lowest_window for t in f32] == [lowest_group(t, window) for t in f32]


def test_simulate_online_protocol():
    window = 2
    high, low = [9.0] * 6, [9.0, 9.0, 1.0, 1.0, 9.0, 9.0]
    low_at_end = [9.0, 9.0, 9.0, 1.0, 1.0]
    confs = [high, [8.0] * 5, low, high, low, [7.0] * 4, low_at_end]
    answers = ["42", "7", "13", "42", "13", "7", "13"]
    sim = simulate_online(confs, answers, warmup=3, eta=90.0, window=window)
    # warm-up lowest groups 9, 8, 1 -> threshold at their 10th percentile
    assert sim.threshold == pytest.approx(warmup_threshold([9.0, 8.0, 1.0], 90.0)) == pytest.approx(2.4)
    # the warm-up's low trace is never stopped; the last one's window falls below at its own last token: it ended
    # (stop/length, as the engine reports it), not stopped - and does not vote (its lowest window is 1)
    assert sim.stopped == [False, False, False, False, True, False, False]
    assert online_stop(low_at_end, sim.threshold, window) == 5
    assert sim.kept_tokens == [6, 5, 6, 6, 4, 4, 5]  # the later low trace keeps tokens up to its low window
    assert sim.tokens_generated == 36
    # votes: warm-up's low trace (lowest 1 < 2.4) and the stopped one do not vote; weights = lowest groups
    assert sim.vote.answer == "42"
    assert [(a, n) for a, n, _ in sim.vote.table] == [("42", 2), ("7", 2)]
    assert sim.vote.table[0][2] == pytest.approx(18.0) and sim.vote.table[1][2] == pytest.approx(15.0)
    assert sim.traces[4].answer is None and sim.traces[4].scores.lowest_window == 1.0  # its prefix 9 9 1 1
    with pytest.raises(ValueError, match="warm-up: expected 1 to 7"):
        simulate_online(confs, answers, warmup=0, eta=10.0, window=window)
    with pytest.raises(ValueError, match="7 traces' confidences but 6 answers"):
        simulate_online(confs, answers[:6], warmup=2, eta=10.0, window=window)
    # a trace that ties the threshold (a twin of the warm-up trace that set it) runs on; a margin decides ties
    twins = [[9.0, 9.0, 3.0, 3.0, 9.0], [9.0, 9.0, 3.0, 3.0, 9.0], [9.0, 9.0, 3.0, 3.0, 9.0]]
    assert simulate_online(twins, ["1"] * 3, warmup=1, eta=10.0, window=window).stopped == [False] * 3
    assert simulate_online(twins, ["1"] * 3, warmup=1, eta=10.0, window=window, stop_margin=1e-9).kept_tokens == [
        5, 4, 4]
