"""FP8 linears as FP8 GEMMs: the arguments CUDA's torch._scaled_mm will get are checked against its rules, and their
math (emulated, and torch's CPU _scaled_mm) against the fake-quantized linear. The real CUDA call: tests/gpu/."""

from __future__ import annotations

import pytest
import torch

from trtfalcon.config import preset
from trtfalcon.model.fp8_gemm import ScaledMmLinears, scaled_mm_emulated, scaled_mm_problem
from trtfalcon.model.layers import linear
from trtfalcon.model.random_weights import random_deploy_weights
from trtfalcon.model.weights import DeployWeights
from trtfalcon.checkpoint.deploy_fp8 import FP8_DTYPE, FP8_MAX, QUANTIZED_LINEARS, quantize_fp8
from trtfalcon.runtime.executors.torch import TorchExecutor, resolve_fp8_gemm
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams


def checked_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=False):
    """torch._scaled_mm on the CPU, refusing what the CUDA one would refuse."""
    problem = scaled_mm_problem(a, b, scale_a, scale_b, out_dtype)
    assert problem is None, problem
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=use_fast_accum)


def _one_linear(rows: int, cols: int, dtype=torch.float32, seed=0) -> DeployWeights:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=g) / cols**0.5
    scale = dense.abs().amax(1) / FP8_MAX
    return DeployWeights(preset("tiny"), {"x.weight": quantize_fp8(dense, scale[:, None]), "x.weight_scale": scale,
                                          "x.input_scale": torch.tensor(3.0 / FP8_MAX)}, dtype)


def test_the_problem_check_names_each_cuda_rule():
    a = torch.randn(5, 32).to(FP8_DTYPE)
    w = torch.randn(48, 32).to(FP8_DTYPE)
    ok = (a, w.t(), torch.ones(5, 1), torch.ones(1, 48), torch.bfloat16)
    assert scaled_mm_problem(*ok) is None
    bad = {
        "column-major": (a, w.t().contiguous(), *ok[2:]),
        "multiples of 16": (torch.randn(5, 24).to(FP8_DTYPE), torch.randn(48, 24).to(FP8_DTYPE).t(), *ok[2:]),
        "row-major": (torch.randn(32, 5).to(FP8_DTYPE).t(), *ok[1:]),
        "float8_e4m3fn": (a.float(), *ok[1:]),
        "contiguous (5, 1)": (a, w.t(), torch.ones(5, 2)[:, :1], torch.ones(1, 48), torch.bfloat16),
        "scale_a must be": (a, w.t(), torch.tensor(1.0), torch.ones(1, 48), torch.bfloat16),
        "scale_b must be": (a, w.t(), torch.ones(5, 1), torch.ones(48), torch.bfloat16),
        "float32": (a, w.t(), torch.ones(5, 1, dtype=torch.float64), torch.ones(1, 48), torch.bfloat16),
        "out_dtype": (*ok[:4], torch.float8_e4m3fn),
    }
    for why, args in bad.items():  # each is refused, with the rule it breaks in the message
        problem = scaled_mm_problem(*args)
        assert problem is not None and why in problem, (why, problem)


@pytest.mark.parametrize("rows, cols", [(6680, 3072), (2048, 3072)])  # the 7B's in_proj (padded) and qkv
@pytest.mark.parametrize("m", [1, 7, 64])
def test_prepared_arguments_at_7b_shapes(rows, cols, m):
    w = _one_linear(rows, cols, torch.bfloat16)
    original = w["x.weight"]
    gemms = ScaledMmLinears(w, mm=checked_mm)
    a, b, sa, sb = gemms.arguments(torch.randn(m, cols).to(torch.bfloat16), "x")
    assert scaled_mm_problem(a, b, sa, sb, torch.bfloat16) is None
    padded = -(-rows // 16) * 16
    assert b.shape == (cols, padded) and sb.shape == (1, padded) and sa.shape == (m, 1)
    if padded != rows:  # one copy of the weight in memory: the deploy tensor is a view of the padded one
        assert w["x.weight"].data_ptr() == b.data_ptr() and torch.equal(w["x.weight"], original)
        assert torch.equal(sb[0, rows:], torch.ones(padded - rows)) and not b.t()[rows:].float().any()


def test_scaled_mm_equals_its_emulation_and_the_fake_quantized_linear():
    """fp32 compute: the FP8 GEMM (torch's CPU _scaled_mm, checked against CUDA's rules) = the emulation = the
    fake-quantized linear (whose dequantized operands are exact in fp32)."""
    w = _one_linear(196, 64)  # the tiny in_proj: 196 rows, padded to 208
    x = torch.randn(9, 64) * 2
    gemms = ScaledMmLinears(w, mm=checked_mm)
    got = gemms(x, "x")
    a, b, sa, sb = gemms.arguments(x, "x")
    emulated = scaled_mm_emulated(a, b, sa, sb, torch.float32)[:, :196]
    assert got.shape == (9, 196)
    torch.testing.assert_close(got, emulated, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, linear(x, w, "x"), rtol=1e-5, atol=1e-5)


def test_executor_fp8_gemms_give_the_fake_quant_tokens():
    w = random_deploy_weights(preset("tiny"), dtype=torch.float32, seed=7, fp8=True)
    tokens = {}
    for mode in ("fake_quant", "scaled_mm"):
        ex = TorchExecutor(w, num_blocks=32, block_size=4, num_slots=4, fp8_gemm=mode)
        assert ex.fp8_gemm == mode
        if mode == "scaled_mm":
            assert sorted(ex.model.fp8_gemms.names()) == sorted(f"layers.{i}.{leaf}" for i in range(2)
                                                                 for leaf in QUANTIZED_LINEARS)
        engine = LLMEngine(ex, max_batch_size=4, max_num_tokens=16, max_seq_len=40)
        outs = engine.generate([Request(str(i), [3 + i, 1, 4, 1, 5][: i + 2], SamplingParams(max_new_tokens=8,
                                                                                            ignore_eos=True))
                                for i in range(4)])
        tokens[mode] = [o.token_ids for o in outs]
    assert tokens["scaled_mm"] == tokens["fake_quant"]


def test_auto_picks_fake_quant_off_the_gpu():
    assert resolve_fp8_gemm("auto", torch.device("cpu"), torch.bfloat16) == "fake_quant"
    assert resolve_fp8_gemm("scaled_mm", torch.device("cpu"), torch.float32) == "scaled_mm"
    with pytest.raises(ValueError, match="fp8_gemm"):
        resolve_fp8_gemm("fp8", torch.device("cpu"), torch.float32)
