"""What only a GPU can show of the torch executor's CUDA path (bench/gpu/check.sh runs these; they skip elsewhere).

- a CUDA graph captures the decode forward (no host sync, no allocation outside its pool) with the Triton kernels
  and FP8 GEMMs, and its replays equal eager steps (tokens, and the pools of the real sequences);
- torch._scaled_mm accepts the prepared FP8 arguments at the 7B's shapes and computes their emulation's values;
- the sampler reads nothing back from the device until its one copy of the results.
The CPU tests of the same code (bucketing, padding, argument preparation, the sampler's host reads) are in
tests/runtime/test_cuda_graphs.py, tests/test_fp8_gemm.py and tests/runtime/test_sampler_device.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from trtfalcon.config import preset
from trtfalcon.model.fp8_gemm import ScaledMmLinears, scaled_mm_emulated, scaled_mm_problem
from trtfalcon.model.random_weights import random_deploy_weights
from trtfalcon.model.weights import DeployWeights
from trtfalcon.checkpoint.deploy_fp8 import FP8_MAX, quantize_fp8
from trtfalcon.runtime.executors.torch import TorchExecutor
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams
from trtfalcon.runtime.sampler import Sampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (bench/gpu/check.sh)")
CUDA = torch.device("cuda")


def _generate(weights, *, graphs: bool, kv=None, ssm="fp32", n_requests=7, seed=0):
    ex = TorchExecutor(weights, num_blocks=96, block_size=16, num_slots=8, device=CUDA, kv_dtype=kv, ssm_dtype=ssm,
                       cuda_graphs=graphs)
    engine = LLMEngine(ex, max_batch_size=8, max_num_tokens=64, max_seq_len=96)
    rng = random.Random(seed)
    reqs = [Request(str(i), [rng.randrange(weights.config.vocab_size) for _ in range(rng.randint(1, 40))],
                    SamplingParams(max_new_tokens=rng.randint(4, 24), ignore_eos=True)) for i in range(n_requests)]
    outs = engine.generate(reqs)
    assert all(o.finish_reason == "length" for o in outs), [o.error for o in outs]
    return [o.token_ids for o in outs], ex


@pytest.mark.parametrize("fp8, kv, ssm", [(False, None, "fp32"), (True, "fp8", "bf16")])
def test_decode_graphs_give_the_eager_tokens_on_gpu(fp8, kv, ssm):
    """fp32 compute (exact GEMMs, no TF32): a padded bucket's replay must give the eager path's greedy tokens, also
    with an FP8 KV cache and a bf16 SSM state through the graphs."""
    w = random_deploy_weights(preset("tiny"), dtype=torch.float32, device=CUDA, seed=3, fp8=fp8, kv_cache_fp8=fp8)
    want, eager = _generate(w, graphs=False, kv=kv, ssm=ssm)
    got, ex = _generate(w, graphs=True, kv=kv, ssm=ssm)
    assert ex.kernels == "triton" and ex.graphs.replays > 0 and eager.graphs is None
    assert got == want


def test_fp8_gemms_in_graphs_on_gpu():
    """bf16 compute with FP8 weights: _scaled_mm runs inside the captured graphs; replay equals eager closely (the
    same GEMMs; only the padded M differs)."""
    w = random_deploy_weights(preset("tiny"), dtype=torch.bfloat16, device=CUDA, seed=4, fp8=True)
    ex = TorchExecutor(w, num_blocks=40, block_size=16, num_slots=8, device=CUDA, cuda_graphs=True)
    assert ex.fp8_gemm == "scaled_mm" and ex.model.fp8_gemms.names()
    engine = LLMEngine(ex, max_batch_size=8, max_num_tokens=64, max_seq_len=64)
    for i in range(3):
        engine.add_request(Request(str(i), [5 + i, 7, 11], SamplingParams(max_new_tokens=8, ignore_eos=True)))
    engine.step()  # prefill (eager)
    sched_step = engine.scheduler.schedule()
    assert sched_step.batch.num_tokens == sched_step.batch.num_seqs == 3
    pools = {k: v.clone() for k, v in ex.pools.items()}
    graph_logits = ex.execute(sched_step.batch).clone()
    graph_pools = {k: v.clone() for k, v in ex.pools.items()}
    for k, v in pools.items():
        ex.pools[k].copy_(v)
    eager_logits = ex._forward(ex._inputs.load(sched_step.batch))
    torch.testing.assert_close(graph_logits, eager_logits, rtol=2e-2, atol=2e-2)
    for k, v in ex.pools.items():  # every slot and block but the scratch ones (the last) that padding rows write
        if k.startswith("kv_cache"):
            torch.testing.assert_close(v[:, :-1].float(), graph_pools[k][:, :-1].float(), rtol=2e-2, atol=2e-2)
        else:
            torch.testing.assert_close(v[:-1].float(), graph_pools[k][:-1].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rows, cols", [(2048, 3072), (3072, 1536), (6680, 3072), (24576, 3072), (3072, 12288)])
@pytest.mark.parametrize("m", [1, 64, 512])
def test_scaled_mm_at_7b_shapes(rows, cols, m):
    """The 7B's FP8 linears (qkv, o, in_proj with its 6680 rows padded, gate_up, down) through torch._scaled_mm."""
    g = torch.Generator(CUDA).manual_seed(rows + m)
    dense = torch.randn(rows, cols, device=CUDA, generator=g) / cols**0.5
    scale = dense.abs().amax(1) / FP8_MAX
    cfg = preset("tiny")
    w = DeployWeights(cfg, {"x.weight": quantize_fp8(dense, scale[:, None]), "x.weight_scale": scale,
                            "x.input_scale": torch.tensor(4.0 / FP8_MAX, device=CUDA)}, torch.bfloat16)
    gemms = ScaledMmLinears(w)
    x = torch.randn(m, cols, device=CUDA, generator=g).to(torch.bfloat16)
    a, b, sa, sb = gemms.arguments(x, "x")
    assert scaled_mm_problem(a, b, sa, sb, torch.bfloat16) is None
    got = gemms(x, "x")
    want = scaled_mm_emulated(a, b, sa, sb, torch.float32)[:, :rows]
    assert got.shape == (m, rows) and got.dtype == torch.bfloat16
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 1e-2, float(rel)


def test_sampler_does_not_sync_before_its_one_copy():
    logits = torch.randn(64, 130048, device=CUDA)
    params = [SamplingParams(temperature=0.7, top_k=50 if i % 2 else 0, top_p=0.9, logprobs=5 if i % 3 else 0)
              for i in range(64)]
    rngs = [random.Random(i) for i in range(64)]
    sampler = Sampler()
    sampler.sample_on_device(logits, params, rngs)  # allocates the pinned table once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = sampler.sample_on_device(logits, params, [random.Random(i) for i in range(64)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ids, lps = result.to_host(params)
    # the same draws on the CPU: equal but for rows whose u falls within rounding of a CDF step
    want_ids, want_lps = Sampler().sample(logits.cpu(), params, [random.Random(i) for i in range(64)])
    same = [i for i in range(64) if ids[i] == want_ids[i]]
    assert len(same) >= 60
    assert all((lps[i] is None) == (want_lps[i] is None) for i in range(64))
    assert all(lps[i].top_ids == want_lps[i].top_ids for i in same if lps[i] is not None)


def test_deepconf_confidence_and_window_push_do_not_sync_before_the_one_copy():
    """DeepConf online on the GPU: the confidences (mixed k), the group-confidence push and the stop flags stay on
    the device until to_host_with_confidence's one copy, and equal the CPU's."""
    from trtfalcon.runtime.confidence import OnlineConfidence
    from trtfalcon.runtime.request import ConfidenceParams

    logits = torch.randn(64, 130048, device=CUDA)
    params = [SamplingParams(temperature=0.6 if i % 4 else 0.0, top_p=0.95,
                             confidence=ConfidenceParams(top_k=20 if i % 5 else 7, window=4, threshold=1e9))
              if i % 8 else SamplingParams(temperature=0.6) for i in range(64)]
    slots = list(range(63, -1, -1))

    def run(device):
        online = OnlineConfidence(num_slots=64)
        online.begin([], torch.device(device))
        online.group(4).start(torch.arange(64, device=device), 1e9)
        sampler = Sampler()
        for step in range(5):
            x = logits.to(device)
            sample = sampler.sample_on_device(x, params, [random.Random(i + step) for i in range(64)], slots)
            if device == "cuda" and step == 4:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    sample = sampler.sample_on_device(x, params, [random.Random(i + 9) for i in range(64)], slots)
                    online.track(sample, params)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            else:
                online.track(sample, params)
            out = sample.to_host_with_confidence(params)
        return out

    _, _, gpu = run("cuda")
    _, _, cpu = run("cpu")
    asked = [i for i in range(64) if params[i].confidence is not None]
    assert all(gpu.confidence[i] is None for i in range(64) if i not in asked)
    for i in asked:
        assert abs(gpu.confidence[i] - cpu.confidence[i]) < 1e-3 * abs(cpu.confidence[i])
    assert all(gpu.stop[i] for i in asked)  # after 5 tokens the window of 4 is full, and below 1e9
