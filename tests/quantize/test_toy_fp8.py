"""FP8 on the trained toy reasoner: calibrated on its task's text, scored on its held-out problems.

The random tiny model's accuracy report says little (its logits mean nothing); the toy reasoner's answers are right
or wrong, so the report's task accuracy (quantize/accuracy.py task_report, tts/toy_eval.py ToyTaskEvaluator) shows
what FP8 costs a model that does something."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import hf_fake_quant_model, hf_greedy, read_accuracy_report
from trtfalcon.checkpoint.convert import convert_checkpoint
from trtfalcon.cli import main
from trtfalcon.demo import DemoState, step_quantize_toy
from trtfalcon.errors import ConfigError
from trtfalcon.quantize.calibration import load_calibration
from trtfalcon.quantize.fp8 import quantize_fp8
from trtfalcon.tts.toy_eval import MAX_COMPLETION_TOKENS, ToyTaskEvaluator, accuracy, sample_traces, toy_engine
from trtfalcon.tts.toy_task import (
    EOS_ID, HELD_OUT_COUNT, VOCAB, calibration_records, decode, held_out_problems, prompt_ids,
)
from trtfalcon.tts.toy_train import make_batch

DATA = Path(__file__).resolve().parents[1] / "data"
TOY, CALIB = DATA / "toy-reasoner", DATA / "toy-calib.jsonl"
PROBLEMS = 100  # what the demo's step scores
# FP8 may cost the toy reasoner a few answers, not more: on all 200 held-out problems it changes 5.5-9% of the greedy
# outputs and moves accuracy by -3 to +1 points over three calibration sets (bench/results/toy_fp8_accuracy.md).
# 6 points of 100 problems is the tolerance; a wrong FP8 scale costs far more (an in_proj weight scale off by 25%:
# 27 points; a down_proj multiplier not folded: 13 points).
TASK_TOLERANCE = 0.06


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory):
    """The demo's step (`trtfalcon demo`, = the README's `quantize --task` command on 100 problems): the toy
    reasoner quantized on the 64 training-distribution traces of toy-calib.jsonl, its 16 held-out problems kept for
    perplexity, task accuracy on PROBLEMS held-out problems. (checkpoint, the step's message)"""
    st = DemoState(tmp_path_factory.mktemp("demo"), 8, 4, compile_kernels=False)
    msg = step_quantize_toy(st)
    return st.out_dir / "toy-fp8", msg


@pytest.fixture(scope="module")
def toy_fp8(toy_demo):
    return toy_demo[0]


def test_calibration_file_is_the_task_text_the_model_was_trained_on():
    """tests/data/toy-calib.jsonl is calibration_records() (regenerate with toy_task.write_calibration_jsonl);
    each line tokenizes, with the checkpoint's tokenizer, to the exact sequence training fed the model; the last
    16 lines are held-out problems, none of the others is."""
    lines = [json.loads(x) for x in CALIB.read_text().splitlines()]
    assert lines == calibration_records(), "tests/data/toy-calib.jsonl is stale: write_calibration_jsonl() it again"
    cs = load_calibration(CALIB, TOY, len(VOCAB), num_samples=64, seq_len=64, holdout=16)
    held = held_out_problems(16)
    want, _ = make_batch(held)
    for ids, row in zip(cs.holdout, want.tolist()):
        assert ids == row[:len(ids)] and ids[-1] == EOS_ID and set(row[len(ids):]) <= {0}
    held_all = {f"Q:{p.a}*{p.b};" for p in held_out_problems()}
    train_prompts = [decode(ids).split(";")[0] + ";" for ids in cs.calib]
    assert len(cs.calib) == 64 and not held_all & set(train_prompts)
    assert len(set(train_prompts)) > 50  # many different problems, not one repeated


def test_report_on_the_toy_reasoner(toy_fp8):
    r = read_accuracy_report(toy_fp8, 16)
    assert r["top1_agreement"] >= 0.97 and 0 < r["logit_rel_rms_err"] < 0.06
    assert 0.97 < r["perplexity_ratio"] < 1.03
    t = r["task"]
    assert t["name"] == "toy-multiplication" and t["items"] == PROBLEMS and "convert --dtype fp32" in t["runtime"]
    assert t["accuracy_source"] >= 0.7, "the toy reasoner solves ~79% of held-out problems greedily"
    assert abs(t["accuracy_quantized"] - t["accuracy_source"]) <= TASK_TOLERANCE, t
    # the counts add up: the accuracy difference is the right/wrong flips
    assert round(PROBLEMS * t["accuracy_delta"]) == t["right_quantized_only"] - t["right_source_only"]
    assert 0.8 <= t["same_output"] <= 1.0
    # the source side through convert -> deploy is what the in-memory fold gives (test_toy_model.py's path)
    direct = accuracy(sample_traces(toy_engine(TOY, max_batch_size=64), held_out_problems(PROBLEMS)))
    assert t["accuracy_source"] == direct


def test_demo_step_says_what_the_report_measured(toy_demo):
    fp8, msg = toy_demo
    t = json.loads((fp8 / "accuracy.json").read_text())["task"]
    assert f"greedy answers right on {PROBLEMS} held-out problems: source {100 * t['accuracy_source']:.0f} %, " \
           f"FP8 {100 * t['accuracy_quantized']:.0f} %" in msg, msg


def test_fp8_deploy_greedy_equals_transformers_fake_quantized(toy_fp8, tmp_path):
    """The FP8 deploy checkpoint through the in-flight runtime gives, token for token, transformers' greedy
    tokens with its Linears fake-quantized from the ModelOpt checkpoint (helpers.hf_fake_quant_model)."""
    problems = held_out_problems(4)
    deploy = convert_checkpoint(toy_fp8, tmp_path / "dep", dtype="fp32")
    traces = sample_traces(toy_engine(deploy, max_batch_size=4), problems)
    oracle = hf_fake_quant_model(TOY, toy_fp8)
    for p, (t,) in zip(problems, traces):
        ours = t.output.token_ids
        assert ours[-1] == EOS_ID and len(ours) < MAX_COMPLETION_TOKENS, decode(ours)
        assert ours == hf_greedy(oracle, prompt_ids(p), len(ours)), p.prompt


def test_cli_quantize_with_task(tmp_path):
    out = tmp_path / "fp8"
    r = CliRunner().invoke(main, ["quantize", str(TOY), str(out), "--calib-data", str(CALIB), "--calib-size", "8",
                                  "--holdout", "4", "--task", "toy-multiplication", "--task-problems", "12",
                                  "--accuracy-dtype", "bf16"])
    assert r.exit_code == 0, r.output
    assert "task accuracy       toy-multiplication (12 items): source" in r.output and "same output" in r.output
    rep = json.loads((out / "accuracy.json").read_text())
    assert rep["compute_dtype"] == "bf16" and rep["task"]["items"] == 12
    assert "convert --dtype bf16" in rep["task"]["runtime"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary deploy checkpoints left behind"


@pytest.mark.parametrize("args, match", [
    (["--task-problems", str(HELD_OUT_COUNT + 1)], r"expected 1 to 200 \(the held-out problems"),
    (["--no-accuracy"], "task accuracy is part of the accuracy report"),
])
def test_cli_task_bad_options_fail_before_calibration(tmp_path, args, match):
    r = CliRunner().invoke(main, ["quantize", str(TOY), str(tmp_path / "o"), "--task", "toy-multiplication", *args])
    assert r.exit_code == 1 and "Traceback" not in r.output and "calibration data:" not in r.output, r.output
    assert re.search(match, " ".join(r.output.split())), r.output
    assert not (tmp_path / "o").exists()


def test_task_refuses_a_model_not_trained_on_it(tiny_hf, tmp_path):
    with pytest.raises(ConfigError, match=r"needs a model trained on the toy task \(vocab_size 53.*found vocab_size "
                                          r"256"):
        quantize_fp8(tiny_hf, tmp_path / "o", calib_size=2, calib_seq_len=8, task=ToyTaskEvaluator(4))
    assert not (tmp_path / "o").exists()
