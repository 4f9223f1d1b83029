"""Random deploy weights made on a device: the deploy format's names, shapes and dtypes (FP8 too), reproducible,
and a model that runs on them."""

from __future__ import annotations

import pytest
import torch

from trtfalcon.checkpoint.deploy import deploy_tensor_shapes
from trtfalcon.config import preset
from trtfalcon.model.random_weights import random_deploy_weights
from trtfalcon.checkpoint.deploy_fp8 import fp8_tensor_specs, quantization_meta
from trtfalcon.runtime.executors.torch import TorchExecutor
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams


@pytest.mark.parametrize("fp8", [False, True])
def test_names_shapes_dtypes_follow_the_deploy_format(fp8):
    cfg = preset("tiny")
    w = random_deploy_weights(cfg, dtype=torch.bfloat16, fp8=fp8, kv_cache_fp8=fp8)
    shapes = deploy_tensor_shapes(cfg.without_multipliers())
    specs = fp8_tensor_specs(shapes, cfg.num_hidden_layers, quantization_meta(True)) if fp8 else {}
    assert set(w.tensors) == set(shapes) | set(specs)
    for name, t in w.tensors.items():
        shape, dtype = specs.get(name) or (shapes[name], None)
        assert tuple(t.shape) == tuple(shape), name
        if dtype is not None:
            assert t.dtype == dtype, name
        elif name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias"):
            assert t.dtype == torch.float32, name
        else:
            assert t.dtype == torch.bfloat16, name
    assert not w.config.has_multipliers
    again = random_deploy_weights(cfg, dtype=torch.bfloat16, fp8=fp8, kv_cache_fp8=fp8)
    assert all(torch.equal(t.reshape(-1).view(torch.uint8), again[n].reshape(-1).view(torch.uint8)) for n, t in w.tensors.items())
    other = random_deploy_weights(cfg, dtype=torch.bfloat16, fp8=fp8, seed=1)
    assert not torch.equal(w["lm_head.weight"].float(), other["lm_head.weight"].float())


def test_a_random_fp8_model_generates_finite_logits():
    w = random_deploy_weights(preset("tiny"), dtype=torch.float32, fp8=True, kv_cache_fp8=True)
    ex = TorchExecutor(w, num_blocks=16, block_size=4, num_slots=2, kv_dtype="fp8")
    engine = LLMEngine(ex, max_batch_size=2, max_num_tokens=16, max_seq_len=32)
    out = engine.generate([Request("a", [1, 2, 3, 4], SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=3))])
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 5
    assert all(lp.logprob > float("-inf") and lp.logprob <= 0 for lp in out[0].logprobs)


def test_fp8_kv_scales_need_fp8_weights():
    with pytest.raises(ValueError, match="kv_cache_fp8 needs fp8"):
        random_deploy_weights(preset("tiny"), kv_cache_fp8=True)
