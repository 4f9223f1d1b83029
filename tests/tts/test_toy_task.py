"""The toy reasoning task: checkable traces, a held-out set training never draws, a tokenizer transformers loads."""

from __future__ import annotations

import random

import pytest
import torch

from trtfalcon.tts.answers import TOY_ANSWER
from trtfalcon.tts.toy_task import (
    BOS_ID, EOS_ID, PAD_ID, Problem, TaskSpec, decode, encode, held_out_problems, is_correct, prompt_ids,
    save_tokenizer, training_problems,
)
from trtfalcon.tts.toy_train import make_batch


def test_problem_text_and_answer():
    p = Problem(376, 82)
    assert p.prompt == "Q:376*82;"
    assert p.solution == "376*2=752;376*80=30080;752+30080=30832;A:30832"
    assert p.answer == "30832" == TOY_ANSWER(p.solution)
    assert is_correct(p, p.solution) and not is_correct(p, "376*2=752;A:752") and not is_correct(p, "376*2=")
    assert decode(encode(p.solution) + [EOS_ID]) == p.solution
    # a zero digit still gets its step; a 3-digit multiplier sums three partial products
    assert Problem(675, 90).solution == "675*0=0;675*90=60750;0+60750=60750;A:60750"
    assert Problem(12, 345).solution == "12*5=60;12*40=480;12*300=3600;60+480=540;540+3600=4140;A:4140"


def test_held_out_set_is_fixed_distinct_and_never_trained_on():
    a, b = held_out_problems(), held_out_problems()
    assert a == b and len(a) == 200 and len(set(a)) == 200
    assert {len(str(p.a)) for p in a} == {2, 3} and {len(str(p.b)) for p in a} == {2}
    exclude = set(a)
    assert not exclude & set(training_problems(random.Random(0), 2000, TaskSpec(), exclude))
    # a small space (one-digit operands: 81 problems), a third of it banned: the exclusion visibly bites
    small = TaskSpec((1, 1), (1, 1))
    banned = set(held_out_problems(27, small))
    drawn = set(training_problems(random.Random(0), 2000, small, banned))
    assert not banned & drawn and len(drawn) == 81 - 27


def test_unknown_character_is_a_clear_error():
    with pytest.raises(ValueError, match=r"character 'x' is not in the vocabulary"):
        encode("1x2")


def test_tokenizer_loads_with_transformers_and_matches_the_task_ids(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    p = held_out_problems(1)[0]
    assert tok(p.prompt)["input_ids"] == prompt_ids(p)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    ids = encode(p.solution) + [EOS_ID]
    assert tok.decode(ids, skip_special_tokens=True) == p.solution
    assert tok.decode(prompt_ids(p)) == "<|begin_of_text|>" + p.prompt


def test_training_batch_supervises_the_completion_only():
    p, q = Problem(10, 20), Problem(110, 22)
    ids, labels = make_batch([p, q])
    n_prompt = len(prompt_ids(p))
    full = prompt_ids(p) + encode(p.solution) + [EOS_ID]
    assert ids[0, :len(full)].tolist() == full and (ids[0, len(full):] == PAD_ID).all()
    # position j predicts token j + 1, supervised only where that token is part of the completion
    assert (labels[0, :n_prompt - 1] == -100).all()
    assert labels[0, n_prompt - 1:len(full) - 1].tolist() == full[n_prompt:]
    assert (labels[0, len(full) - 1:] == -100).all()
    assert labels[1][labels[1] != -100].tolist()[-1] == EOS_ID
    assert ids.dtype == labels.dtype == torch.long


def test_training_lowers_the_completion_loss_from_the_seed():
    """A few steps of the real loop on a small config: loss on held-out traces falls well below its start, and the
    same seed gives the same model."""
    from trtfalcon.tts.toy_train import TrainConfig, build_model, completion_loss, toy_config_dict, train

    cfg = TrainConfig(steps=30, batch_size=16, lr=1e-2, warmup_steps=5, model=toy_config_dict(32, 2, 64))
    ids, labels = make_batch(held_out_problems(16))
    with torch.no_grad():
        before = float(completion_loss(build_model(cfg).eval(), ids, labels))
    logs: list[str] = []
    evals: list[int] = []
    model = train(cfg, on_eval=lambda step, m: evals.append(step), eval_every=20, log=logs.append)
    with torch.no_grad():
        after = float(completion_loss(model, ids, labels))
    assert after < 0.75 * before, (before, after)
    assert evals == [20, 30] and logs[-1].startswith("step 30/30")
    again = train(cfg, log=lambda s: None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
