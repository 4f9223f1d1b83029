"""The engine's DeepConf online run (run_tts, mode online: the scheduler's stop) equals its replay from an offline
run with the same seeds (tts.online_sim): the same stopped traces, tokens generated and vote. This is what lets
bench/tts/toy_tts_pareto.py check its online figures against the offline traces.

Exactly, when both runs compute the same logits to the last bit: one trace at a time (an engine of batch 1), every
trace's steps have the same shapes in both runs. In flight, a trace's fp32 logits change in their last bits with
what shares its steps (the CPU ops' decode attention reduces over the longest context of the step,
plugins/torch_batched.py; a matmul of fewer than 4 rows takes another kernel), never its tokens; and the toy model
writes many traces twice (a twin of the warm-up trace that sets the threshold has a window mean exactly on it):
such ties (a stop, whether a trace votes, which of two equally weighted answers wins) may be decided either way,
and nothing else may differ.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from trtfalcon.tts.answers import TOY_ANSWER
from trtfalcon.tts.online_sim import group_confidences, simulate_online
from trtfalcon.tts.run import TTSConfig, run_tts_many
from trtfalcon.tts.toy_eval import toy_engine
from trtfalcon.tts.toy_task import decode, held_out_problems, prompt_ids

TOY = Path(__file__).resolve().parents[1] / "data" / "toy-reasoner"
WINDOW = 8  # toy traces are ~45 tokens: a window that fills early so that online can stop traces
ONLINE = TTSConfig(budget=8, warmup=4, mode="online", eta=10, window=WINDOW, temperature=0.8, top_p=1.0,
                   max_new_tokens=96, seed=2)
PROMPTS = [prompt_ids(p) for p in held_out_problems(3)]
TIE = 1e-5  # confidences are ~10-20 here; runs in batches of other shapes differ by < 1e-5 (the bench measures it)


@pytest.fixture(scope="module")
def weights():
    from trtfalcon.model.weights import load_weights

    return load_weights(TOY, "fp32")


def offline_run(engine, prompts):
    return run_tts_many(engine, prompts, replace(ONLINE, mode="offline"), TOY_ANSWER, decode=decode)


def online_and_replay(engine, prompts, offline, eta):
    online = run_tts_many(engine, prompts, replace(ONLINE, eta=eta), TOY_ANSWER, decode=decode)
    replays = [simulate_online([t.output.confidences for t in r.traces], [t.answer for t in r.traces],
                               warmup=ONLINE.warmup, eta=eta, window=WINDOW) for r in offline]
    return online, replays


def test_online_one_trace_at_a_time_equals_the_replay_exactly(weights):
    engine = toy_engine(weights, max_batch_size=1)
    offline = offline_run(engine, PROMPTS[:1])
    for eta in (10.0, 90.0):  # DeepConf-low and -high
        online, replays = online_and_replay(engine, PROMPTS[:1], offline, eta)
        stopped = 0
        for off, on, sim in zip(offline, online, replays):
            # same logits to the last bit: every kept confidence is the offline run's
            for a, b in zip(on.traces, off.traces):
                assert a.output.confidences == b.output.confidences[:a.num_tokens]
                assert a.output.token_ids == b.output.token_ids[:a.num_tokens]
            assert on.threshold == sim.threshold
            assert [t.stopped for t in on.traces] == sim.stopped
            assert [t.finish_reason == "confidence" for t in on.traces] == sim.stopped
            assert [t.num_tokens for t in on.traces] == sim.kept_tokens
            assert on.tokens_generated == sim.tokens_generated
            assert on.vote == sim.vote and on.answer == sim.vote.answer  # the table, weights included
            stopped += sum(sim.stopped)
        assert 1 <= stopped < ONLINE.budget - ONLINE.warmup, f"eta {eta}: nothing to compare, change the seed"


def test_online_in_flight_equals_the_replay_up_to_ties_with_the_threshold(weights):
    engine = toy_engine(weights, max_batch_size=32)  # every prompt's traces in flight together
    offline = offline_run(engine, PROMPTS)
    online, replays = online_and_replay(engine, PROMPTS, offline, ONLINE.eta)
    stopped = 0
    for off, on, sim in zip(offline, online, replays):
        assert on.threshold == pytest.approx(sim.threshold, abs=TIE)
        ties = 0
        for a, b, was_stopped, kept in zip(on.traces, off.traces, sim.stopped, sim.kept_tokens):
            # the same tokens (a draw within rounding of a CDF boundary could flip one: ~1 in 10^6 tokens, the
            # bench saw 1 in 900k; none in these runs)
            assert a.output.token_ids == b.output.token_ids[:a.num_tokens]
            if (a.stopped, a.num_tokens) != (was_stopped, kept):
                # only a window mean on the threshold (to fp32 rounding) may be decided otherwise
                g = group_confidences(b.output.confidences, WINDOW)[min(a.num_tokens, kept) - 1]
                assert g == pytest.approx(sim.threshold, abs=TIE), (a.index, g, sim.threshold)
                ties += 1
        if not ties:
            assert on.tokens_generated == sim.tokens_generated
            # who votes (online_vote: lowest window >= threshold) differs only where a lowest window ties it
            for a, x in zip(on.traces, sim.traces):
                if (a.scores.lowest_window >= on.threshold) != (x.scores.lowest_window >= sim.threshold):
                    assert x.scores.lowest_window == pytest.approx(sim.threshold, abs=TIE)
                    ties += 1
        if not ties:
            # the same votes with the same weights to rounding; the winner too unless two answers tie (twins again:
            # the same number of traces with the same lowest windows), where rounding picks it
            assert sorted((x, n) for x, n, _ in on.vote.table) == sorted((x, n) for x, n, _ in sim.vote.table)
            weight = {x: w for x, _, w in sim.vote.table}
            assert {x: w for x, _, w in on.vote.table} == pytest.approx(weight, abs=TIE)
            if on.answer != sim.vote.answer:
                assert weight[on.answer] == pytest.approx(weight[sim.vote.answer], abs=TIE)
        stopped += on.num_stopped
    assert stopped >= 1
