"""The Triton kernels drive real generation: in-flight greedy with --kernels triton (interpreted on CPU) gives the
same tokens as --kernels reference, and the CLI switches the interpreter on by itself."""

import json
import os
import subprocess
import sys

import torch

from trtfalcon.checkpoint.synth import synth_checkpoint
from trtfalcon.config import preset_dict
from trtfalcon.model.weights import load_weights
from trtfalcon.runtime.executors.torch import TorchExecutor
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams


def _run(weights, kernels, prompts, n, kv_dtype=None):
    ex = TorchExecutor(weights, num_blocks=24, block_size=4, num_slots=3, kernels=kernels, kv_dtype=kv_dtype)
    engine = LLMEngine(ex, max_batch_size=3, max_num_tokens=12, max_seq_len=32)
    outs = engine.generate([Request(str(i), p, SamplingParams(max_new_tokens=n, ignore_eos=True))
                            for i, p in enumerate(prompts)])
    return [o.token_ids for o in outs], engine


def test_in_flight_greedy_with_triton_kernels_equals_reference(tmp_path):
    hf = synth_checkpoint(preset_dict("tiny"), tmp_path / "hf", dtype="fp32", seed=5)
    weights = load_weights(hf, "fp32")
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [7], [2, 7, 1, 8, 2]]  # chunked prefill (12-token steps) + decode
    want, _ = _run(weights, "reference", prompts, 5)
    got, engine = _run(weights, "triton", prompts, 5)
    assert engine.executor.kernels == "triton"
    assert got == want
    assert any(s.num_prefill and s.num_decode for s in engine.step_log)  # mixed steps ran through the kernels


def test_in_flight_greedy_with_fp8_kv_triton_kernels_equals_reference(tmp_path):
    """The same with an FP8 KV cache (per-layer scales set here; some K rows saturate at +-448): the interpreted
    kernels store the reference's bytes and give its tokens."""
    hf = synth_checkpoint(preset_dict("tiny"), tmp_path / "hf", dtype="fp32", seed=5)
    weights = load_weights(hf, "fp32")
    for i in range(weights.config.num_hidden_layers):
        weights.tensors[f"layers.{i}.attn.k_scale"] = torch.tensor(0.002 * (i + 1))
        weights.tensors[f"layers.{i}.attn.v_scale"] = torch.tensor(0.003)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [7], [2, 7, 1, 8, 2]]
    want, ref_engine = _run(weights, "reference", prompts, 5, kv_dtype="fp8")
    got, engine = _run(weights, "triton", prompts, 5, kv_dtype="fp8")
    assert got == want
    for name, pool in engine.executor.pools.items():
        if name.startswith("kv_cache"):
            assert pool.dtype == torch.float8_e4m3fn and (pool.float().abs() == 448).any()
            assert torch.equal(pool.view(torch.uint8), ref_engine.executor.pools[name].view(torch.uint8)), name


def test_cli_generate_with_triton_kernels_on_cpu(tmp_path):
    hf = synth_checkpoint(preset_dict("tiny"), tmp_path / "hf", dtype="fp32", seed=5)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CLI must set it itself
    cmd = [sys.executable, "-m", "trtfalcon.cli", "generate", str(hf), "--prompt-ids", "3,1,4", "--max-new-tokens",
           "3", "--json", "--ignore-eos"]
    tri = subprocess.run([*cmd, "--kernels", "triton"], env=env, capture_output=True, text=True)
    ref = subprocess.run([*cmd, "--kernels", "reference"], env=env, capture_output=True, text=True)
    assert tri.returncode == 0 and ref.returncode == 0, tri.stderr + ref.stderr
    assert json.loads(tri.stdout)["token_ids"] == json.loads(ref.stdout)["token_ids"]
