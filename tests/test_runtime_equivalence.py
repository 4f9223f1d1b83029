"""Rung 2 (runtime level): in-flight batching on the torch executor gives transformers' greedy tokens."""

import random

import pytest
import torch

from trtfalcon.model.weights import load_weights
from trtfalcon.runtime.executors.torch import TorchExecutor
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams
from helpers import hf_greedy, hf_model


@pytest.mark.parametrize(
    "variant, max_num_tokens, num_blocks, block_size",
    [
        ("base", 16, 14, 4),  # chunked prefill (16-token steps) and preemption (14 blocks of 4 for 7 sequences)
        ("base", 64, 200, 8),  # roomy: whole prompts in one step, no preemption
        ("time_step_limit", 12, 12, 4),
        ("one_group", 16, 14, 4),
    ],
)
def test_in_flight_greedy_equals_transformers_per_prompt(hf_checkpoints, variant, max_num_tokens, num_blocks, block_size):
    path = hf_checkpoints(variant)
    weights = load_weights(path, "fp32")
    oracle = hf_model(path)
    rng = random.Random(0)
    lengths = [1, 3, 7, 8, 9, 17, 26]  # cross the chunk size (8) and the block sizes
    rng.shuffle(lengths)
    prompts = [[rng.randrange(weights.config.vocab_size) for _ in range(n)] for n in lengths]
    new_tokens = [rng.randint(3, 8) for _ in prompts]
    executor = TorchExecutor(weights, num_blocks=num_blocks, block_size=block_size, num_slots=5)
    engine = LLMEngine(executor, max_batch_size=5, max_num_tokens=max_num_tokens, max_seq_len=64)
    outputs = {}
    pending = list(range(len(prompts)))
    while pending or engine.has_work:
        # random arrivals: 0-2 new requests between steps
        for _ in range(rng.randint(0, 2)):
            if pending:
                i = pending.pop(0)
                outputs[i] = engine.add_request(Request(str(i), prompts[i], SamplingParams(
                    max_new_tokens=new_tokens[i], ignore_eos=True)))
        engine.step()
    preempted = sum(o.num_preemptions for o in outputs.values())
    if num_blocks < 20:
        assert preempted > 0, "the small pool was meant to force preemption"
    assert max(log.num_tokens for log in engine.step_log) <= max_num_tokens
    for i, p in enumerate(prompts):
        out = outputs[i]
        assert out.finish_reason == "length", out.error
        assert out.token_ids == hf_greedy(oracle, p, new_tokens[i]), f"prompt {i} (length {len(p)})"
    assert engine.scheduler.blocks.num_free == num_blocks  # every block back in the pool


def test_fork_shares_prompt_state(tiny_hf):
    """copy_slot / copy_blocks copy exactly the named slot and blocks in every layer."""
    weights = load_weights(tiny_hf, "fp32")
    ex = TorchExecutor(weights, num_blocks=6, block_size=4, num_slots=3)
    for t in ex.pools.values():
        t.normal_()
    before = {k: v.clone() for k, v in ex.pools.items()}
    ex.copy_slot(2, 0)
    ex.copy_blocks([(5, 1), (3, 4)])
    for k, v in ex.pools.items():
        if k.startswith("kv_cache"):
            assert torch.equal(v[:, 1], before[k][:, 5]) and torch.equal(v[:, 4], before[k][:, 3])
            assert torch.equal(v[:, [0, 2, 3, 5]], before[k][:, [0, 2, 3, 5]])
        else:
            assert torch.equal(v[0], before[k][2]) and torch.equal(v[1:], before[k][1:])
