"""n samples of one prompt on the real torch executor (tiny Falcon-H1): the forked KV blocks and Mamba state give
exactly the tokens of separate requests, and transformers' greedy tokens."""

from __future__ import annotations

from helpers import hf_greedy, hf_model

from trtfalcon.model.weights import load_weights
from trtfalcon.runtime.executors.torch import TorchExecutor
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams


def engine(weights, num_blocks=40, block_size=4, num_slots=6, max_num_tokens=8):
    ex = TorchExecutor(weights, num_blocks=num_blocks, block_size=block_size, num_slots=num_slots)
    return LLMEngine(ex, max_batch_size=num_slots, max_num_tokens=max_num_tokens, max_seq_len=64, watermark=0.0)


def prompt_of(weights, n, seed=0):
    import random

    rng = random.Random(seed)
    return [rng.randrange(weights.config.vocab_size) for _ in range(n)]


def test_seeded_samples_equal_separate_requests_and_share_the_prefill(tiny_hf):
    weights = load_weights(tiny_hf, "fp32")
    prompt = prompt_of(weights, 13)  # two 8-token chunks; 3 full blocks of 4 + a partial one
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5, n=4, ignore_eos=True)
    eng = engine(weights)
    outs = eng.add_samples(Request("r", prompt, params))
    sched = eng.scheduler
    max_ref = 0
    while eng.has_work:
        eng.step()
        max_ref = max(max_ref, int(sched.blocks.ref_counts.max()))
    assert max_ref == 4, "the prompt's full blocks are shared by all 4 samples"
    assert sched.blocks.num_free == 40 and sched.slots.num_free == 6
    generated = sum(len(o.token_ids) - 1 for o in outs)
    assert sum(e.num_tokens for e in eng.step_log) == len(prompt) + generated, "the prompt is prefilled once"

    sep = engine(weights)
    single = {**params.__dict__, "n": 1}
    alone = sep.generate([Request(str(k), prompt, SamplingParams(**{**single, "seed": 5 + k})) for k in range(4)])
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in outs}) > 1
    assert all(o.finish_reason == "length" for o in outs)


def test_greedy_samples_equal_transformers_and_cancel_leaves_siblings_alone(tiny_hf):
    weights = load_weights(tiny_hf, "fp32")
    oracle = hf_model(tiny_hf)
    prompt = prompt_of(weights, 9, seed=1)
    eng = engine(weights, max_num_tokens=6)
    outs = eng.generate([Request("g", prompt, SamplingParams(max_new_tokens=7, n=3, ignore_eos=True))])
    want = hf_greedy(oracle, prompt, 7)
    assert [o.token_ids for o in outs] == [want] * 3
    assert sum(e.num_tokens for e in eng.step_log) == len(prompt) + 3 * 6

    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=21, n=3, ignore_eos=True)
    ref = engine(weights).generate([Request("c", prompt, params)])
    eng = engine(weights)
    outs = eng.add_samples(Request("c", prompt, params))
    for _ in range(6):
        eng.step()
    assert eng.cancel("c/1")
    while eng.has_work:
        eng.step()
    assert outs[1].finish_reason == "cancelled" and 0 < len(outs[1].token_ids) < 12
    assert outs[1].token_ids == ref[1].token_ids[:len(outs[1].token_ids)]
    assert outs[0].token_ids == ref[0].token_ids and outs[2].token_ids == ref[2].token_ids
    assert eng.scheduler.blocks.num_free == 40 and eng.scheduler.slots.num_free == 6


def test_cli_generate_n_prints_one_line_per_sample(tiny_hf):
    import json

    from helpers import run_cli

    args = ("generate", tiny_hf, "--prompt-ids", "5,6,7,8,9", "--max-new-tokens", "6", "--temperature", "1.0",
            "--ignore-eos", "--json")
    lines = [json.loads(x) for x in run_cli(*args, "--n", "3", "--seed", "4").output.strip().splitlines()]
    assert [(x["index"], x["sample"]) for x in lines] == [(0, 0), (0, 1), (0, 2)]
    for k, line in enumerate(lines):
        alone = json.loads(run_cli(*args, "--seed", str(4 + k)).output.strip().splitlines()[-1])
        assert "sample" not in alone and line["token_ids"] == alone["token_ids"] and len(line["token_ids"]) == 6
    assert "--n: not supported by --backend reference" in run_cli(*args, "--n", "2", "--backend", "reference",
                                                                   ok=False).output
    too_many = run_cli(*args, "--n", "9", "--max-batch-size", "8", ok=False).output
    assert "n: expected at most max_batch_size=8 samples, found 9" in too_many
