"""The committed toy reasoner (tests/data/toy-reasoner, trained by bench/tts/train_toy.py): transformers loads it
with its tokenizer, trtfalcon's runtime on its deploy conversion gives transformers' greedy tokens, greedy solves
held-out problems, and both mixers of every layer carry signal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import hf_greedy, hf_model

from trtfalcon.checkpoint.convert import convert_checkpoint
from trtfalcon.config import FalconH1Config
from trtfalcon.tts.toy_eval import MAX_COMPLETION_TOKENS, sample_traces, toy_engine
from trtfalcon.tts.toy_task import EOS_ID, decode, held_out_problems, is_correct, prompt_ids
from trtfalcon.tts.toy_train import completion_loss, make_batch

TOY = Path(__file__).resolve().parents[1] / "data" / "toy-reasoner"


@pytest.fixture(scope="module")
def toy_hf():
    return hf_model(TOY)


@pytest.fixture(scope="module")
def toy_deploy(tmp_path_factory):
    return convert_checkpoint(TOY, tmp_path_factory.mktemp("toy") / "deploy", dtype="fp32")


def test_checkpoint_loads_with_transformers_and_its_tokenizer():
    from transformers import AutoTokenizer

    cfg = FalconH1Config.from_json_file(TOY)
    tok = AutoTokenizer.from_pretrained(TOY)
    assert cfg.eos_token_id == (tok.eos_token_id,) == (EOS_ID,)
    assert (cfg.bos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)
    assert cfg.vocab_size == len(tok)
    assert cfg.has_multipliers and cfg.num_hidden_layers >= 2
    assert cfg.mamba_d_head != cfg.head_dim  # the two head sizes differ, as in the family
    p = held_out_problems(1)[0]
    assert tok(p.prompt)["input_ids"] == prompt_ids(p)
    size = sum(f.stat().st_size for f in TOY.iterdir())
    assert size < 8 * 2**20, f"the fixture is meant to stay small, found {size} bytes"


def test_runtime_on_the_deploy_conversion_gives_transformers_greedy_tokens_and_right_answers(toy_hf, toy_deploy):
    problems = held_out_problems(64)
    traces = sample_traces(toy_engine(toy_deploy, max_batch_size=16), problems)  # 64 requests, 16 slots: in flight
    for p, (t,) in zip(problems[:12], traces):
        ours = t.output.token_ids
        assert ours[-1] == EOS_ID and len(ours) < MAX_COMPLETION_TOKENS, decode(ours)
        assert ours == hf_greedy(toy_hf, prompt_ids(p), len(ours)), p.prompt
    right = sum(is_correct(p, decode(t.output.token_ids)) for p, (t,) in zip(problems, traces))
    # greedy solves 79% of the 200 held-out problems (bench/results/toy_reasoner_train.json), 50 of these 64
    assert right >= 44, f"greedy solved {right} of 64 held-out problems"


@pytest.mark.parametrize("silenced", ["attention_out_multiplier", "ssm_out_multiplier"])
def test_attention_and_mamba_both_carry_signal(tmp_path, toy_hf, silenced):
    """Zeroing either mixer's output (its muP multiplier) multiplies the loss on held-out reference traces."""
    import shutil

    from transformers import FalconH1ForCausalLM

    ids, labels = make_batch(held_out_problems(32))
    with torch.no_grad():
        base = float(completion_loss(toy_hf, ids, labels))
    for f in TOY.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[silenced] = 0.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ablated = FalconH1ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = float(completion_loss(ablated, ids, labels))
    assert loss > 5 * base and loss > base + 0.5, (silenced, base, loss)
