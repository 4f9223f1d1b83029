"""`trtfalcon tts` and `trtfalcon bench --tts` as a user runs them: the printed answer is run_tts's, the report's
tokens add up, bad options are refused naming the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli as run

from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.options import RuntimeOptions
from trtfalcon.tts.answers import TOY_ANSWER
from trtfalcon.tts.run import TTSConfig, run_tts
from trtfalcon.tts.toy_task import decode, held_out_problems, prompt_ids

TOY = Path(__file__).resolve().parents[1] / "data" / "toy-reasoner"
PROBLEM = held_out_problems(1)[0]
FLAGS = ["--budget", "12", "--warmup", "4", "--window", "8", "--temperature", "1.0", "--top-p", "1.0", "--seed", "5",
         "--max-batch-size", "16"]
CONFIG = TTSConfig(budget=12, warmup=4, window=8, temperature=1.0, top_p=1.0, seed=5)


@pytest.fixture(scope="module")
def api_result():
    """What the Python API gives for the same prompt and settings, on the engine the CLI builds."""
    engine = LLMEngine.from_options("torch", TOY, RuntimeOptions(max_batch_size=16), log_steps=False)
    return run_tts(engine, prompt_ids(PROBLEM), CONFIG, TOY_ANSWER, decode=decode)


def test_tts_prints_the_answer_vote_table_and_tokens_of_run_tts(api_result):
    out = run("tts", TOY, "--prompt", PROBLEM.prompt, *FLAGS).output
    lines = out.splitlines()
    assert lines[0] == f"answer: {api_result.answer}" and api_result.answer is not None
    assert f"threshold {api_result.threshold:.4f}, {api_result.num_stopped} of 12 traces stopped" in lines[1]
    for answer, votes, weight in api_result.vote.table:
        assert f"  {answer:<24} {votes:>5} {weight:>10.4f}" in lines
    assert f"tokens generated: {api_result.tokens_generated:,} (12 traces" in out


def test_tts_json_with_prompt_ids_equals_the_text_prompt(api_result):
    ids = ",".join(map(str, prompt_ids(PROBLEM)))
    got = json.loads(run("tts", TOY, "--prompt-ids", ids, *FLAGS, "--json").output)
    assert got["answer"] == api_result.answer and got["tokens_generated"] == api_result.tokens_generated
    assert got["threshold"] == pytest.approx(api_result.threshold, rel=1e-5)
    assert [t["num_tokens"] for t in got["trace_results"]] == [t.num_tokens for t in api_result.traces]
    assert [(r["answer"], r["votes"]) for r in got["table"]] == [(a, n) for a, n, _ in api_result.vote.table]
    assert got["config"]["budget"] == 12 and got["stopped"] == api_result.num_stopped


def test_tts_offline_reports_the_offline_vote():
    got = json.loads(run("tts", TOY, "--prompt", PROBLEM.prompt, *FLAGS, "--mode", "offline", "--eta", "90",
                         "--json").output)
    assert got["vote"] == "top90_lowest_window" and got["threshold"] is None and got["stopped"] == 0
    assert got["votes"]["top90_lowest_window"] == got["answer"] and "majority" in got["votes"]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "Q:1*2;", "--budget", "4"], "--warmup: expected at most --budget (4)"),
    (["--prompt", "Q:1*2;", "--prompt-ids", "1,2"], "exactly one of --prompt or --prompt-ids"),
    (["--prompt", "Q:1*2;", "--extractor", "answers"], "--extractor: expected toy, boxed or regex:PATTERN"),
    (["--prompt", "Q:1*2;", "--extractor", "regex:(unclosed"], "not a valid regular expression"),
    (["--prompt-ids", "1,999"], "tts prompt 0: request"),
    (["--prompt", "Q:1*2;", "--eta", "100"], "--eta"),
])
def test_tts_refuses_bad_options_naming_the_flag(args, message):
    assert message in run("tts", TOY, *args, ok=False).output


def test_tts_text_prompt_without_a_tokenizer_is_refused(tiny_hf):
    assert "--prompt needs a tokenizer" in run("tts", tiny_hf, "--prompt", "hi", ok=False).output


def test_bench_tts_reports_tokens_per_second_and_tokens_saved(tiny_hf, tmp_path):
    """A random-weight model: confidences mean nothing, the engine's work and the arithmetic are real."""
    out = run("bench", tiny_hf, "--tts", "--isl", "8", "--osl", "24", "--num-requests", "2", "--tts-budget", "6",
              "--tts-warmup", "2", "--tts-window", "4", "--out", tmp_path).output
    assert "tokens saved" in out
    report = json.loads((tmp_path / "report.json").read_text())
    tts = report["tts"]
    assert report["meta"]["workload"] == "tts" and tts["prompts"] == 2
    off, on = tts["offline"], tts["online"]
    for r in (off, on):
        assert r["traces"] == 12 and r["output_tokens_per_s"] > 0
        assert r["output_tokens_per_s"] == pytest.approx(r["tokens_generated"] / r["seconds"])
    assert off["stopped"] == 0 and off["tokens_generated"] <= 12 * 24
    assert tts["tokens_saved"] == off["tokens_generated"] - on["tokens_generated"] >= 0
    assert tts["tokens_saved_pct"] == pytest.approx(100 * tts["tokens_saved"] / off["tokens_generated"])
    assert (on["stopped"] > 0) == (tts["tokens_saved"] > 0)  # every saved token is a stopped trace's


def test_bench_tts_refuses_concurrency(tiny_hf, tmp_path):
    assert "--concurrency: not used with --tts" in run("bench", tiny_hf, "--tts", "--concurrency", "4", "--out",
                                                        tmp_path, ok=False).output
