"""Step scenarios (prefill chunks, mixed, decode, slot reuse) and an FP8 deploy checkpoint made in the test."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from trtfalcon.model import layers
from trtfalcon.model.layers import FalconH1Model
from trtfalcon.model.weights import DeployWeights, load_weights
from trtfalcon.plugins.ops import get_ops
from trtfalcon.checkpoint.deploy_fp8 import FP8_MAX, QUANTIZED_LINEARS, quantize_fp8
from trtfalcon.runtime.contract import CacheSpec, StepBatch
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams

BLOCK_SIZE, NUM_BLOCKS, NUM_SLOTS = 4, 24, 4


def step(vocab: int, seqs: list[tuple[int, int, int, int]], gen: torch.Generator) -> StepBatch:
    """seqs: (new tokens, tokens already cached, state slot, first block) per sequence; blocks are contiguous."""
    lens = [s[0] for s in seqs]
    ids = torch.randint(0, vocab, (sum(lens),), generator=gen, dtype=torch.int32)
    positions = torch.cat([torch.arange(c, c + n) for n, c, _, _ in seqs]).int()
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    tables = torch.tensor([[b + j for j in range(6)] for *_, b in seqs], dtype=torch.int32)
    return StepBatch(ids, positions, cu, torch.tensor([s[1] for s in seqs], dtype=torch.int32),
                     torch.tensor([s[2] for s in seqs], dtype=torch.int32), tables)


def scenario(vocab: int, seed: int = 0) -> list[tuple[str, StepBatch]]:
    """Steps of three sequences A (slot 0, blocks 0-5), B (slot 2, blocks 6-11), C (slot 1, blocks 12-17):
    prefill chunks crossing the SSD chunk (8) and block (4) sizes, a mixed step, decode, then slot reuse (D starts
    fresh in A's slot, which still holds A's state: context_lens 0 must ignore it)."""
    g = torch.Generator().manual_seed(seed)
    return [
        ("prefill chunks", step(vocab, [(5, 0, 0, 0), (9, 0, 2, 6)], g)),
        ("mixed", step(vocab, [(1, 5, 0, 0), (4, 9, 2, 6), (7, 0, 1, 12)], g)),
        ("decode", step(vocab, [(1, 6, 0, 0), (1, 13, 2, 6), (1, 7, 1, 12)], g)),
        ("slot reuse", step(vocab, [(6, 0, 0, 18), (1, 14, 2, 6)], g)),
        ("decode after reuse", step(vocab, [(1, 6, 0, 18), (1, 8, 1, 12), (1, 15, 2, 6)], g)),
    ]


GREEDY_PROMPTS = [[5, 17, 200, 3], list(range(30, 43)), [9]]


def greedy_tokens(executor, prompts=GREEDY_PROMPTS, max_new_tokens: int = 6) -> list[list[int]]:
    """Each prompt's greedy tokens (max_new_tokens, EOS ignored), generated in flight on `executor`: three at a
    time in steps of at most 8 tokens, so that prefill is chunked and sequences join and leave."""
    engine = LLMEngine(executor, max_batch_size=3, max_num_tokens=8, max_seq_len=32)
    outs = engine.generate([Request(str(i), p, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
                            for i, p in enumerate(prompts)])
    return [o.token_ids for o in outs]


def zero_pools(cfg) -> dict[str, torch.Tensor]:
    """fp32 cache pools of NUM_BLOCKS blocks and NUM_SLOTS state slots, zeroed: what a calibration prefill runs on."""
    return CacheSpec.for_model(cfg, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, num_slots=NUM_SLOTS,
                               kv_dtype=torch.float32, conv_dtype=torch.float32, ssm_dtype=torch.float32).allocate()


def calibrate_input_amax(weights: DeployWeights, batch: StepBatch) -> dict[str, float]:
    """max |x| of each linear's input over one prefill (ModelOpt's "max" calibration, done by hand)."""
    amax: dict[str, float] = {}
    original = layers.linear

    def recording(x, w, name):
        amax[name] = max(amax.get(name, 0.0), float(x.abs().max()))
        return original(x, w, name)

    layers.linear = recording
    try:
        FalconH1Model(weights, get_ops("torch")).forward(batch, zero_pools(weights.config))
    finally:
        layers.linear = original
    return amax


def calibrate_kv_amax(weights: DeployWeights, batch: StepBatch) -> dict[str, float]:
    """max |k| and |v| entering each layer's KV cache over one prefill ("layers.{i}.attn.k_scale" -> amax), as
    ModelOpt's k/v bmm quantizers calibrate them (K after RoPE and the folded key multiplier)."""
    ops = get_ops("torch")
    amax: dict[str, float] = {}
    calls = []

    def recording(q, k, v, *args, **kwargs):
        i = len(calls) % weights.config.num_hidden_layers
        calls.append(i)
        for kind, t in (("k", k), ("v", v)):
            name = f"layers.{i}.attn.{kind}_scale"
            amax[name] = max(amax.get(name, 0.0), float(t.abs().max()))
        return ops.paged_attention(q, k, v, *args, **kwargs)

    FalconH1Model(weights, dataclasses.replace(ops, paged_attention=recording)).forward(batch, zero_pools(weights.config))
    return amax


def make_fp8_deploy(deploy_dir: Path, out: Path, kv_cache: bool = False) -> DeployWeights:
    """An FP8 deploy checkpoint per trtfalcon/checkpoint/deploy_fp8.py from an fp32 one: per-row weight scales
    (row amax / 448), per-tensor input scales from a calibration prefill; kv_cache: also k/v scales (amax / 448)
    for an FP8 KV cache. Returns the same tensors as DeployWeights (what the torch executor runs, fake-quantized)."""
    weights = load_weights(deploy_dir)
    cfg = weights.config
    calib = step(cfg.vocab_size, [(12, 0, 0, 0), (7, 0, 1, 6)], torch.Generator().manual_seed(7))
    amax = calibrate_input_amax(weights, calib)
    kv_amax = calibrate_kv_amax(weights, calib) if kv_cache else {}
    tensors = dict(weights.tensors)
    for name, a in kv_amax.items():
        tensors[name] = torch.tensor(a / FP8_MAX, dtype=torch.float32)
    for i in range(cfg.num_hidden_layers):
        for leaf in QUANTIZED_LINEARS:
            name = f"layers.{i}.{leaf}"
            w = tensors[f"{name}.weight"]
            scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
            tensors[f"{name}.weight"] = quantize_fp8(w, scale[:, None])
            tensors[f"{name}.weight_scale"] = scale.float()
            tensors[f"{name}.input_scale"] = torch.tensor(amax[name] / FP8_MAX, dtype=torch.float32)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors")
    raw = json.loads((deploy_dir / "config.json").read_text())
    raw["trtfalcon"]["quantization"] = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if kv_cache else None,
                                        "exclude_modules": []}
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return DeployWeights(cfg, tensors, torch.float32)
