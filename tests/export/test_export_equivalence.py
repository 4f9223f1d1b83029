"""Rung 4: the exported graph, run by onnxruntime, computes what the torch executor computes: step by step (logits
and every updated pool) and over a whole in-flight-batched greedy generation, on every config variant."""

import random

import pytest
import torch

from trtfalcon.model.weights import load_weights
from trtfalcon.runtime.executors.onnxruntime import OnnxRuntimeExecutor
from trtfalcon.runtime.executors.torch import TorchExecutor
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams
from export_helpers import BLOCK_SIZE, NUM_BLOCKS, NUM_SLOTS, scenario
from helpers import VARIANTS


def executors(deploy, export, kernels="torch", **sizes):
    sizes = {"num_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE, "num_slots": NUM_SLOTS, **sizes}
    return TorchExecutor(load_weights(deploy), **sizes), OnnxRuntimeExecutor(export, kernels=kernels, **sizes)


def assert_same_step(torch_ex, ort_ex, batch, what):
    expected, got = torch_ex.execute(batch), ort_ex.execute(batch)
    assert got.dtype == torch.float32 and got.shape == (batch.num_seqs, torch_ex.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: logits: {m}")
    assert torch.equal(got.argmax(-1), expected.argmax(-1)), what
    for name, pool in torch_ex.pools.items():
        torch.testing.assert_close(ort_ex.pools[name], pool, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {name}: {m}")


@pytest.mark.parametrize("variant, kernels", [(v, "torch") for v in sorted(VARIANTS)] + [("base", "reference")])
def test_steps_match_torch_executor(deploy_checkpoints, onnx_exports, variant, kernels):
    """kernels: the plugin nodes' custom ops run the vectorized torch ops (default) or the loop references."""
    torch_ex, ort_ex = executors(deploy_checkpoints(variant), onnx_exports(variant), kernels)
    # stale state in every slot and block: a fresh sequence (context_lens 0) must not see it
    for name, pool in torch_ex.pools.items():
        pool.normal_()
        ort_ex.pools[name].copy_(pool)
    for what, batch in scenario(torch_ex.vocab_size):
        assert_same_step(torch_ex, ort_ex, batch, f"{variant}: {what}")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_in_flight_greedy_tokens_identical(deploy_checkpoints, onnx_exports, variant):
    """Chunked prefill (12-token steps), decode, sequences joining and leaving: the same tokens, every request."""
    rng = random.Random(1)
    torch_ex, ort_ex = executors(deploy_checkpoints(variant), onnx_exports(variant), num_blocks=40, num_slots=4)
    prompts = [[rng.randrange(torch_ex.vocab_size) for _ in range(n)] for n in (3, 17, 9, 1, 11, 6)]
    tokens = []
    for ex in (torch_ex, ort_ex):
        engine = LLMEngine(ex, max_batch_size=4, max_num_tokens=12, max_seq_len=40)
        outs = engine.generate([Request(str(i), p, SamplingParams(max_new_tokens=6, ignore_eos=True))
                                for i, p in enumerate(prompts)])
        assert all(o.finish_reason == "length" for o in outs), [o.error for o in outs]
        tokens.append([o.token_ids for o in outs])
        assert max(log.num_tokens for log in engine.step_log) <= 12
    assert tokens[1] == tokens[0]


def test_fork_copies_slots_and_blocks(onnx_exports):
    ex = OnnxRuntimeExecutor(onnx_exports("base"), num_blocks=6, block_size=4, num_slots=3)
    for t in ex.pools.values():
        t.normal_()
    before = {k: v.clone() for k, v in ex.pools.items()}
    ex.copy_slot(2, 0)
    ex.copy_blocks([(5, 1)])
    for k, v in ex.pools.items():
        if k.startswith("kv_cache"):
            others = [0, 2, 3, 4, 5]
            assert torch.equal(v[:, 1], before[k][:, 5]) and torch.equal(v[:, others], before[k][:, others])
        else:
            assert torch.equal(v[0], before[k][2]) and torch.equal(v[1:], before[k][1:])
