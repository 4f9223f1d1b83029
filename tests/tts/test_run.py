"""run_tts / run_tts_many on the trained toy reasoner (tests/data/toy-reasoner): DeepConf online against offline with
the same seeds, the vote and the threshold recomputed from the engine's raw outputs, many prompts in flight equal to
one at a time, and the configs and prompts that are refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from trtfalcon.errors import ConfigError, RequestError
from trtfalcon.tts.answers import TOY_ANSWER, get_extractor
from trtfalcon.tts.deepconf import trace_scores, warmup_threshold, window_means
from trtfalcon.tts.run import TTSConfig, run_tts, run_tts_many
from trtfalcon.tts.toy_eval import toy_engine
from trtfalcon.tts.toy_task import decode, held_out_problems, prompt_ids
from trtfalcon.tts.vote import ScoredTrace, offline_votes, online_vote

TOY = Path(__file__).resolve().parents[1] / "data" / "toy-reasoner"
WINDOW = 8  # toy traces are ~25-50 tokens: a window that fills early so that online can stop traces
CONFIG = TTSConfig(budget=8, warmup=4, mode="online", eta=10, window=WINDOW, temperature=1.0, top_p=1.0, seed=3)
PROMPTS = [prompt_ids(p) for p in held_out_problems(3)]


def scored_from_engine(out):
    """What the vote takes of a trace, recomputed from the engine's raw output: DeepConf's scores of its
    confidences, the engine's lowest group (what its stop compared), the toy answer of its text."""
    s = replace(trace_scores(out.confidences, window=WINDOW), lowest_window=out.lowest_group_confidence)
    return ScoredTrace(TOY_ANSWER(decode(out.token_ids)), s, out.finish_reason == "confidence")


def same_run(a, b):
    """Two runs of one prompt with the same seeds, in batches of other shapes (other prompts in flight, a smaller
    engine): fp32 rounds the logits differently in their last bits, never the tokens, so every trace is the same
    except where a window mean ties the threshold to rounding (the toy model often writes the same trace twice, and a
    twin of the warm-up trace that sets the threshold sits exactly on it): there one run stops it and the other not.
    Then votes and tokens may differ by that trace; without such a tie, they are equal (weights to rounding)."""
    assert a.threshold == pytest.approx(b.threshold, rel=1e-5)
    ties = 0
    for x, y in zip(a.traces, b.traces):
        if x.output.token_ids == y.output.token_ids:
            continue
        short, long_ = (x, y) if x.num_tokens < y.num_tokens else (y, x)
        assert short.stopped and not long_.stopped
        assert long_.output.token_ids[:short.num_tokens] == short.output.token_ids
        last = float(window_means(torch.tensor(short.output.confidences), WINDOW)[-1])
        assert last == pytest.approx(a.threshold, rel=1e-5), "a stop that differs must be a tie with the threshold"
        ties += 1
    if not ties:
        assert a.tokens_generated == b.tokens_generated and a.answer == b.answer
        assert [(v, n) for v, n, _ in a.vote.table] == [(v, n) for v, n, _ in b.vote.table]
        assert [w for *_, w in a.vote.table] == pytest.approx([w for *_, w in b.vote.table], rel=1e-5)
    return ties


@pytest.fixture(scope="module")
def weights():
    from trtfalcon.model.weights import load_weights

    return load_weights(TOY, "fp32")


@pytest.fixture(scope="module")
def engine(weights):
    return toy_engine(weights, max_batch_size=32)


@pytest.fixture(scope="module")
def online(engine):
    return run_tts_many(engine, PROMPTS, CONFIG, TOY_ANSWER, decode=decode)


@pytest.fixture(scope="module")
def offline(engine):
    return run_tts_many(engine, PROMPTS, replace(CONFIG, mode="offline"), TOY_ANSWER, decode=decode)


def test_online_generates_no_more_tokens_and_its_traces_are_prefixes_of_offline(online, offline):
    stopped = 0
    for on, off in zip(online, offline):
        assert on.tokens_generated <= off.tokens_generated
        assert on.tokens_generated == sum(len(t.output.token_ids) for t in on.traces)
        assert [t.seed for t in on.traces] == [t.seed for t in off.traces] == [3 + k for k in range(8)]
        for a, b in zip(on.traces, off.traces):
            assert b.output.token_ids[:a.num_tokens] == a.output.token_ids
            if a.stopped:
                assert a.finish_reason == "confidence" and not a.warmup and a.num_tokens < b.num_tokens
            else:
                assert a.output.token_ids == b.output.token_ids
        stopped += on.num_stopped
        assert not any(t.stopped for t in off.traces) and off.threshold is None
    # eta 10 keeps ~10% of the warm-up's lowest windows above the threshold: most later traces are stopped
    assert stopped >= 3, [r.num_stopped for r in online]
    assert sum(r.tokens_generated for r in online) < sum(r.tokens_generated for r in offline)


def test_online_threshold_and_vote_recomputed_from_the_engine_outputs(online):
    for r in online:
        scored = []
        for t in r.traces:
            out = t.output
            assert len(out.confidences) == len(out.token_ids)
            s = scored_from_engine(out)
            assert t.scored == s
            # the engine's running minimum is DeepConf's lowest window of the recorded confidences
            assert s.scores.lowest_window == pytest.approx(trace_scores(out.confidences, WINDOW).lowest_window,
                                                           rel=1e-6)
            scored.append(s)
        warm = [s.scores.lowest_window for s in scored[:CONFIG.warmup]]
        assert r.threshold == warmup_threshold(warm, CONFIG.eta)
        assert r.vote == online_vote(scored, r.threshold) and r.answer == r.vote.answer
        assert r.votes == {"online": r.vote}
        # DeepConf's stop rule, checked on the recorded confidences: a stopped trace ends at the first full window
        # strictly below the threshold; a trace that ran on never had one before its last token (where a natural
        # end, EOS or length, wins over a stop); warm-up traces have no threshold
        for t in r.traces[CONFIG.warmup:]:
            means = window_means(torch.tensor(t.output.confidences), WINDOW).tolist() if t.num_tokens >= WINDOW else []
            assert min(means[:-1], default=r.threshold) >= r.threshold
            if t.stopped:
                assert means[-1] < r.threshold


def test_offline_votes_every_way_over_the_same_traces(offline):
    for r in offline:
        scored = [scored_from_engine(t.output) for t in r.traces]
        assert r.votes == offline_votes(scored)
        assert r.vote == r.votes["top10_lowest_window"] and r.answer == r.vote.answer
    assert all(r.answer is not None for r in offline)  # the toy model answers held-out problems


def test_many_prompts_in_flight_equal_one_prompt_at_a_time(engine, online):
    ties = sum(same_run(run_tts(engine, p, CONFIG, TOY_ANSWER, decode=decode), many)
               for p, many in zip(PROMPTS, online))
    assert ties < len(PROMPTS) * (CONFIG.budget - CONFIG.warmup)  # some ran alike; every other one was a tie


def test_a_budget_larger_than_the_batch_runs_in_several_requests_with_the_same_seeds(weights, offline):
    small = toy_engine(weights, max_batch_size=3)  # 8 traces per prompt: requests of 3, 3 and 2 samples
    again = run_tts_many(small, PROMPTS[:2], replace(CONFIG, mode="offline"), TOY_ANSWER, decode=decode)
    for a, b in zip(again, offline):
        assert [t.output.token_ids for t in a.traces] == [t.output.token_ids for t in b.traces]
        assert a.votes["majority"] == b.votes["majority"] and a.threshold is None
        # the scores agree to fp32 rounding; the top-eta votes may not: twin traces (the same tokens, common on the
        # toy model) tie at the cut, and rounding then decides which of them is kept
        for x, y in zip(a.traces, b.traces):
            assert x.scores.lowest_window == pytest.approx(y.scores.lowest_window, rel=1e-5)


def test_edge_cases_warmup_equal_to_budget_budget_one_and_no_answers(engine):
    p = PROMPTS[0]
    r = run_tts(engine, p, replace(CONFIG, budget=4, warmup=4), TOY_ANSWER, decode=decode)
    assert r.num_stopped == 0 and len(r.traces) == 4 and any("warmup == budget" in n for n in r.notes)
    assert r.threshold == warmup_threshold([t.scores.lowest_window for t in r.traces], CONFIG.eta)
    for mode in ("online", "offline"):
        one = run_tts(engine, p, replace(CONFIG, budget=1, warmup=1, mode=mode), TOY_ANSWER, decode=decode)
        (t,) = one.traces
        assert one.answer == t.answer and t.answer is not None and one.vote.table[0][1] == 1
    none = run_tts(engine, p, replace(CONFIG, mode="offline", budget=3), get_extractor("regex:NEVER(\\d)"),
                   decode=decode)
    assert none.answer is None and none.vote.table == [] and all(t.answer is None for t in none.traces)
    assert any("no trace gave an answer" in n for n in none.notes)


@pytest.mark.parametrize("field, value, expected", [
    ("budget", 0, "budget: expected an integer >= 1"),
    ("warmup", 9, "warmup: expected at most budget=8"),
    ("warmup", 0, "warmup: expected an integer >= 1"),
    ("mode", "greedy", "mode: expected 'online' or 'offline', found 'greedy'"),
    ("eta", 100, "eta: expected a percentage in (0, 100)"),
    ("eta", 0.0, "eta: expected a percentage in (0, 100)"),
    ("top_k", 0, "top_k: expected an integer >= 1"),
    ("window", 0, "window: expected an integer >= 1"),
    ("temperature", 0.0, "temperature: expected a finite number > 0"),
    ("top_p", 1.5, "top_p: expected a number in (0, 1]"),
    ("max_new_tokens", 0, "max_new_tokens: expected an integer >= 1, or None"),
    ("seed", 1.5, "seed: expected an integer"),
])
def test_bad_configs_are_refused_naming_the_field(field, value, expected):
    with pytest.raises(ConfigError, match="TTSConfig: ") as e:
        replace(CONFIG, **{field: value})
    assert expected in str(e.value) and f"found {value!r}" in str(e.value)


def test_offline_ignores_warmup_and_errors_list_every_bad_field():
    assert replace(CONFIG, mode="offline", warmup=100).num_warmup == 0
    with pytest.raises(ConfigError) as e:
        TTSConfig(budget=0, eta=200, window=-1)
    assert all(f in str(e.value) for f in ("budget:", "eta:", "window:"))


def test_a_prompt_the_engine_cannot_serve_is_refused_before_anything_runs(engine):
    with pytest.raises(RequestError, match=r"tts prompt 1: .*prompt_ids: expected token ids in \[0, vocab_size="):
        run_tts_many(engine, [PROMPTS[0], [1, 999]], CONFIG, TOY_ANSWER, decode=decode)
    with pytest.raises(RequestError, match="tts prompt 0: .*max_seq_len"):
        run_tts(engine, PROMPTS[0], replace(CONFIG, max_new_tokens=500), TOY_ANSWER, decode=decode)
    assert not engine.has_work


def test_a_failing_step_raises_naming_the_trace_and_leaves_none_of_its_traces_running(weights):
    eng = toy_engine(weights, max_batch_size=4)  # 8 traces of 2 prompts: most wait while the first ones run
    execute, calls = eng.executor.execute, []

    def failing(batch):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("device lost")
        return execute(batch)

    eng.executor.execute = failing
    with pytest.raises(RequestError, match=r"tts prompt \d, trace \d: executor failed in step 4: RuntimeError: "
                                           "device lost"):
        run_tts_many(eng, PROMPTS[:2], replace(CONFIG, mode="offline", budget=4), TOY_ANSWER, decode=decode)
    ended = [d for _ in range(3) for d in eng.step()]  # the cancellations are reported by the next step
    assert not eng.scheduler.live and not eng.has_work
    assert ended and all(d.finish_reason in ("cancelled", "error") for d in ended)
