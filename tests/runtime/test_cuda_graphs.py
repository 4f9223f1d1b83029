"""The CUDA-graph decode path on a CPU: buckets, the packed and padded step inputs, and EagerReplay standing in for
torch.cuda.CUDAGraph (same static buffers, same padding, same output buffer overwritten by each replay). The capture
itself needs a GPU: tests/gpu/test_gpu_path.py."""

from __future__ import annotations

import random

import pytest
import torch

from trtfalcon.config import preset
from trtfalcon.model.random_weights import random_deploy_weights
from trtfalcon.runtime.contract import StepBatch
from trtfalcon.runtime.executors.cuda_graphs import DecodeGraphs, EagerReplay, decode_buckets
from trtfalcon.runtime.executors.step_inputs import StepInputBuffer, packed_size
from trtfalcon.runtime.executors.torch import TorchExecutor
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams


def _batch(lens, ctx, slots, tables) -> StepBatch:
    i32 = dict(dtype=torch.int32)
    n = sum(lens)
    return StepBatch(input_ids=torch.arange(100, 100 + n, **i32), positions=torch.arange(n, **i32) + 7,
                     cu_seqlens=torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], **i32),
                     context_lens=torch.tensor(ctx, **i32), state_slots=torch.tensor(slots, **i32),
                     block_tables=torch.tensor(tables, **i32))


def test_buckets():
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert decode_buckets(3) == (1, 2, 3)
    assert decode_buckets(20) == (1, 2, 4, 8, 16, 20)
    with pytest.raises(ValueError, match="max_batch_size"):
        decode_buckets(0)
    g = DecodeGraphs(lambda b: None, decode_buckets(20), torch.device("cpu"), scratch_slot=20, scratch_block=99)
    assert [g.bucket(n) for n in (1, 3, 5, 16, 17, 20, 21)] == [1, 4, 8, 16, 20, 20, None]
    assert g.runs(_batch([1, 1, 1], [4, 0, 9], [0, 1, 2], [[1, 2], [3, 4], [5, 6]]))
    assert not g.runs(_batch([2, 1], [4, 0], [0, 1], [[1, 2], [3, 4]]))  # a prefill chunk: eager


def test_padded_inputs_pack_the_batch_then_scratch_rows():
    buf = StepInputBuffer("cpu", scratch_slot=9, scratch_block=77)
    b = _batch([1, 1, 1], [4, 0, 9], [5, 2, 0], [[1, 2], [3, 4], [5, 6]])
    out = buf.load(b, num_seqs=8, width=4)
    assert out.input_ids.tolist() == [100, 101, 102] + [0] * 5
    assert out.positions.tolist() == [7, 8, 9] + [0] * 5
    assert out.cu_seqlens.tolist() == list(range(9))  # padding rows: one token each
    assert out.context_lens.tolist() == [4, 0, 9] + [0] * 5  # start fresh: no state read
    assert out.state_slots.tolist() == [5, 2, 0] + [9] * 5
    assert out.block_tables.tolist() == [[1, 2, 77, 77], [3, 4, 77, 77], [5, 6, 77, 77]] + [[77] * 4] * 5
    ptrs = {k: v.data_ptr() for k, v in out.as_dict().items()}
    again = buf.load(_batch([1], [3], [1], [[8, 9]]), num_seqs=8, width=4)  # same sizes: the same memory
    assert {k: v.data_ptr() for k, v in again.as_dict().items()} == ptrs
    assert again.state_slots.tolist() == [1] + [9] * 7 and again.cu_seqlens.tolist() == list(range(9))
    unpadded = buf.load(_batch([3, 1], [0, 2], [0, 1], [[1, 2], [3, 4]]))
    assert unpadded.num_tokens == 4 and unpadded.cu_seqlens.tolist() == [0, 3, 4]
    assert packed_size(4, 2, 2) == sum(t.numel() for t in unpadded.as_dict().values())
    with pytest.raises(ValueError, match="does not fit"):
        buf.load(b, num_seqs=2)
    with pytest.raises(ValueError, match="columns"):
        buf.load(b, num_seqs=4, width=1)


def test_eager_replay_overwrites_one_output_buffer():
    calls = []

    def fn():
        calls.append(1)
        return torch.full((2,), float(len(calls)))

    replay, out = EagerReplay()(fn)
    first = out.data_ptr()
    replay()
    replay()
    assert out.tolist() == [3.0, 3.0] and out.data_ptr() == first


def _run(weights, *, graphs, kernels="auto", kv=None, ssm="fp32", seed=0, n=9, max_new=(3, 12), slots=6):
    ex = TorchExecutor(weights, num_blocks=40, block_size=4, num_slots=slots, kernels=kernels, kv_dtype=kv,
                       ssm_dtype=ssm, cuda_graphs=graphs, graph_capture=EagerReplay() if graphs else None)
    engine = LLMEngine(ex, max_batch_size=slots, max_num_tokens=16, max_seq_len=48)
    rng = random.Random(seed)
    vocab = weights.config.vocab_size
    reqs = [Request(str(i), [rng.randrange(vocab) for _ in range(rng.randint(1, 14))],
                    SamplingParams(max_new_tokens=rng.randint(*max_new), ignore_eos=True)) for i in range(n)]
    outputs = {}
    pending = list(reqs)
    while pending or engine.has_work:  # random arrivals: decode batches of every size, with padding
        for _ in range(rng.randint(0, 2)):
            if pending:
                r = pending.pop(0)
                outputs[r.request_id] = engine.add_request(r)
        engine.step()
    for o in outputs.values():
        assert o.finish_reason == "length", o.error
    return [outputs[r.request_id].token_ids for r in reqs], ex, engine


def test_graph_path_gives_the_eager_tokens_and_state():
    """In-flight generation with chunked prefill and preemption (40 blocks of 4): decode steps replay their bucket's
    graph padded to it, and give the eager path's tokens; the real slots and blocks end as eagerly computed, the
    padding rows wrote only the scratch slot and block."""
    w = random_deploy_weights(preset("tiny"), dtype=torch.float32, seed=2)
    want, eager, _ = _run(w, graphs=False)
    got, ex, engine = _run(w, graphs=True)
    assert got == want
    decode_sizes = {s.num_seqs for s in engine.step_log if s.num_decode == s.num_seqs}
    assert decode_sizes - set(ex.graphs.buckets), "some decode step had to be padded to its bucket"
    assert ex.graphs.replays == sum(1 for s in engine.step_log if s.num_decode == s.num_seqs)
    assert ex.graphs.captures == len(ex.graphs.buckets)  # one width (max_seq_len 48 / block 4), captured once
    assert ex.eager_steps == len(engine.step_log) - ex.graphs.replays
    assert engine.scheduler.blocks.num_free == 40
    for name, pool in eager.pools.items():
        dim = 1 if name.startswith("kv_cache") else 0  # blocks / slots
        mine = ex.pools[name]
        assert mine.shape[dim] == pool.shape[dim] + 1  # the scratch block / slot
        torch.testing.assert_close(mine.narrow(dim, 0, pool.shape[dim]), pool, rtol=1e-4, atol=1e-5)


def test_graph_path_with_fp8_weights_kv_and_bf16_state():
    """The cache options through the graph path: FP8 weights as FP8 GEMMs, FP8 KV cache, bf16 SSM state."""
    w = random_deploy_weights(preset("tiny"), dtype=torch.float32, seed=4, fp8=True, kv_cache_fp8=True)
    want, _, _ = _run(w, graphs=False, kv="fp8", ssm="bf16", seed=1)
    got, ex, _ = _run(w, graphs=True, kv="fp8", ssm="bf16", seed=1)
    assert got == want and ex.graphs.replays > 0
    assert ex.pools["kv_cache.0"].dtype == torch.float8_e4m3fn and ex.pools["ssm_state.0"].dtype == torch.bfloat16


def test_graph_path_through_the_interpreted_triton_kernels():
    """The Triton kernels (interpreted here) on padded buckets: context 0 rows in the scratch slot and block."""
    w = random_deploy_weights(preset("tiny"), dtype=torch.float32, seed=5)
    want, _, _ = _run(w, graphs=False, kernels="torch", n=3, max_new=(3, 4), slots=3)
    got, ex, _ = _run(w, graphs=True, kernels="triton", n=3, max_new=(3, 4), slots=3)
    assert ex.kernels == "triton" and ex.graphs.replays > 0
    assert got == want


def test_a_new_block_table_width_captures_again():
    w = random_deploy_weights(preset("tiny"), dtype=torch.float32, seed=6)
    ex = TorchExecutor(w, num_blocks=20, block_size=4, num_slots=2, cuda_graphs=True)
    ex.capture_graphs(max_seq_len=10)  # 3 columns
    assert ex.graphs.captures == 2
    ex.execute(_batch([1], [0], [0], [[0, 1, 2, 3, 4]]))  # 5 columns: buckets 1 and 2 again
    assert ex.graphs.captures == 4 and ex.graphs.replays == 1
