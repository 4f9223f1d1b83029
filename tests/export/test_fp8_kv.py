"""FP8 KV cache end to end on the tiny model (an FP8 deploy checkpoint with calibrated k/v scales, made in the test):

- the torch executor with a float8_e4m3fn KV pool computes what a dense oracle computes when every K/V row is
  fake-quantized where it enters the cache, written here independently of the plugin code;
- in-flight batching (chunked prefill, sequences joining and leaving) gives that oracle's greedy tokens;
- the exported graph (float8e4m3fn KV pools, k/v scale initializers on the attention nodes) in onnxruntime equals
  the torch executor step by step, pools byte for byte, and in greedy generation;
- a checkpoint without scales is refused, naming the tensor.
"""

import onnx
import pytest
import torch

from trtfalcon.errors import CheckpointError, ConfigError
from trtfalcon.export import MODEL_FILE, export_onnx, read_manifest
from trtfalcon.model.layers import apply_rope, linear, split_qkv
from trtfalcon.model.reference import ReferenceModel
from trtfalcon.model.weights import load_weights
from trtfalcon.runtime.backends import RuntimeOptions, create_executor
from trtfalcon.runtime.contract import StepBatch
from trtfalcon.runtime.executors.onnxruntime import OnnxRuntimeExecutor
from trtfalcon.runtime.executors.torch import TorchExecutor
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, SamplingParams
from export_helpers import BLOCK_SIZE, NUM_BLOCKS, NUM_SLOTS, greedy_tokens, make_fp8_deploy, scenario

SIZES = dict(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, num_slots=NUM_SLOTS)
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def fp8kv(deploy_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8kv")
    weights = make_fp8_deploy(deploy_checkpoints("base"), root / "deploy", kv_cache=True)
    return root / "deploy", weights, export_onnx(root / "deploy", root / "onnx", kv_dtype="fp8")


def fake_quant_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What an E4M3 cache row reads back as: x / scale saturated to +-448, rounded to E4M3 (nearest even), * scale."""
    return ((x.float() / scale).clamp(-448.0, 448.0).to(FP8).float() * scale).to(x.dtype)


class FakeQuantKVOracle(ReferenceModel):
    """The dense one-sequence oracle with K and V fake-quantized as they enter its cache: what an FP8 paged cache
    must compute, with no pages, blocks, kernels or spec involved."""

    def _attention(self, n, i, lc, cos, sin, start):
        cfg, w, p = self.cfg, self.w, f"layers.{i}"
        q, k, v = split_qkv(linear(n, w, f"{p}.attn.qkv_proj"), cfg)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = fake_quant_kv(k, w[f"{p}.attn.k_scale"]), fake_quant_kv(v, w[f"{p}.attn.v_scale"])
        keys, values = torch.cat([lc.k, k]), torch.cat([lc.v, v])
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        scores = torch.einsum("qhd,khd->hqk", q.float(), keys.float().repeat_interleave(rep, 1)) / cfg.head_dim**0.5
        qpos = torch.arange(start, start + q.shape[0])
        scores = scores.masked_fill(torch.arange(keys.shape[0])[None, None, :] > qpos[None, :, None], -torch.inf)
        o = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), values.float().repeat_interleave(rep, 1))
        return linear(o.to(q.dtype).reshape(o.shape[0], cfg.q_size), w, f"{p}.attn.o_proj"), keys, values


def _steps(vocab: int):
    """Three sequences (name, new tokens) per step: prefill chunks crossing blocks, a mixed step, decode."""
    g = torch.Generator().manual_seed(11)
    layout = {"A": (0, 0), "B": (2, 6), "C": (1, 12)}  # slot, first block (6 contiguous blocks each)
    plan = [[("A", 5), ("B", 9)], [("A", 1), ("B", 4), ("C", 7)], [("A", 1), ("B", 1), ("C", 1)],
            [("A", 3), ("C", 1)]]
    done = {k: 0 for k in layout}
    for step in plan:
        ids = {name: torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32) for name, n in step}
        lens = [n for _, n in step]
        batch = StepBatch(
            torch.cat([ids[s] for s, _ in step]),
            torch.cat([torch.arange(done[s], done[s] + n) for s, n in step]).int(),
            torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32),
            torch.tensor([done[s] for s, _ in step], dtype=torch.int32),
            torch.tensor([layout[s][0] for s, _ in step], dtype=torch.int32),
            torch.tensor([[layout[s][1] + j for j in range(6)] for s, _ in step], dtype=torch.int32),
        )
        yield step, ids, batch
        for s, n in step:
            done[s] += n


def test_fp8_kv_checkpoint_loads_with_its_scales(fp8kv):
    deploy, weights, _ = fp8kv
    loaded = load_weights(deploy)
    for i in range(weights.config.num_hidden_layers):
        for kind in ("k", "v"):
            t = loaded[f"layers.{i}.attn.{kind}_scale"]
            assert t.dtype == torch.float32 and t.shape == () and float(t) > 0
            assert torch.equal(t, weights[f"layers.{i}.attn.{kind}_scale"])


@pytest.mark.parametrize("kernels", ["torch", "reference"])
def test_torch_executor_equals_fake_quantized_oracle(fp8kv, kernels):
    _, weights, _ = fp8kv
    ex = TorchExecutor(weights, kernels=kernels, kv_dtype="fp8", **SIZES)
    assert all(ex.pools[f"kv_cache.{i}"].dtype == FP8 for i in range(weights.config.num_hidden_layers))
    oracle, plain = FakeQuantKVOracle(weights), ReferenceModel(weights)
    caches, plain_caches, moved = {}, {}, []
    for step, ids, batch in _steps(ex.vocab_size):
        got = ex.execute(batch)
        for row, (s, _) in enumerate(step):
            want, caches[s] = oracle.forward(ids[s], caches.get(s))
            unquantized, plain_caches[s] = plain.forward(ids[s], plain_caches.get(s))
            # this tiny random model's logits are ~0.05: fp32 sums in another order differ by ~1e-8
            torch.testing.assert_close(got[row], want[-1], rtol=0, atol=1e-6, msg=lambda m: f"{s}: {m}")
            moved.append(float((unquantized[-1] - want[-1]).abs().max()))
    # the FP8 cache is live: it moves every sequence's logits (by ~1e-5 here), well beyond the tolerance above
    assert min(moved) > 4e-6, moved
    # every cached row holds fp8(k / k_scale): A's first token, layer 0, read back through its scale
    k_scale = weights["layers.0.attn.k_scale"]
    row = ex.pools["kv_cache.0"][0, 0, 0].float() * k_scale
    assert torch.equal(row, caches["A"].layers[0].k[0].float())


def test_in_flight_greedy_equals_fake_quantized_oracle(fp8kv):
    """Chunked prefill (8-token steps), decode, requests joining and leaving: each request gets the oracle's tokens."""
    _, weights, _ = fp8kv
    ex = TorchExecutor(weights, num_blocks=40, block_size=4, num_slots=3, kv_dtype="fp8")
    engine = LLMEngine(ex, max_batch_size=3, max_num_tokens=8, max_seq_len=40)
    prompts = [[5, 17, 200, 3], list(range(30, 43)), [9], list(range(100, 120, 2))]
    outs = engine.generate([Request(str(i), p, SamplingParams(max_new_tokens=7, ignore_eos=True))
                            for i, p in enumerate(prompts)])
    oracle = FakeQuantKVOracle(weights)
    for p, out in zip(prompts, outs):
        assert out.finish_reason == "length", out.error
        logits, cache = oracle.forward(torch.tensor(p))
        tokens = [int(logits[-1].argmax())]
        while len(tokens) < 7:
            last, cache = oracle.decode(tokens[-1], cache)
            tokens.append(int(last.argmax()))
        assert out.token_ids == tokens, p


def test_fp8_kv_graph_matches_torch_executor(fp8kv):
    _, weights, export = fp8kv
    manifest = read_manifest(export)
    assert manifest["cache_dtypes"]["kv_cache"] == "fp8"
    assert manifest["inputs"]["kv_cache.1"]["dtype"] == manifest["outputs"]["kv_cache_out.1"]["dtype"] == "fp8"
    model = onnx.load(str(export / MODEL_FILE), load_external_data=False)
    kinds = {i.name: i.type.tensor_type.elem_type for i in list(model.graph.input) + list(model.graph.output)}
    assert kinds["kv_cache.0"] == kinds["kv_cache_out.0"] == onnx.TensorProto.FLOAT8E4M3FN
    for i, node in enumerate(n for n in model.graph.node if n.op_type.startswith("paged_attention")):
        assert list(node.input[-2:]) == [f"layers.{i}.attn.k_scale", f"layers.{i}.attn.v_scale"]

    torch_ex = TorchExecutor(weights, kv_dtype="fp8", **SIZES)
    ort_ex = OnnxRuntimeExecutor(export, **SIZES)
    assert ort_ex.pools["kv_cache.0"].dtype == FP8
    for what, batch in scenario(torch_ex.vocab_size, seed=5):
        expected, got = torch_ex.execute(batch), ort_ex.execute(batch)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
    for name, pool in torch_ex.pools.items():
        if pool.dtype == FP8:
            assert torch.equal(ort_ex.pools[name].view(torch.uint8), pool.view(torch.uint8)), name
        else:
            torch.testing.assert_close(ort_ex.pools[name], pool, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_fp8_kv_greedy_tokens_identical_in_onnxruntime(fp8kv):
    deploy, _, export = fp8kv
    tokens = []
    opts = RuntimeOptions(max_batch_size=3, max_num_tokens=8, max_seq_len=32, block_size=4, num_blocks=30,
                          kv_dtype="fp8")
    for backend, path in (("torch", deploy), ("onnxruntime", export)):
        ex, _ = create_executor(backend, path, opts)
        assert ex.cache_spec.kv_dtype == FP8
        tokens.append(greedy_tokens(ex))
    assert tokens[0] == tokens[1]


def test_unquantized_kv_export_passes_scale_fills(onnx_exports):
    """A bf16/fp32 KV export feeds every attention node the spec's fill (1.0, an fp32 scalar) for its scales."""
    model = onnx.load(str(onnx_exports("base") / MODEL_FILE))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type.startswith("paged_attention")):
        for name in node.input[-2:]:
            assert inits[name].shape == () and inits[name].dtype.name == "float32" and inits[name] == 1.0


def test_fp8_kv_refused_without_scales(deploy_checkpoints, onnx_exports, fp8kv):
    plain = load_weights(deploy_checkpoints("base"))
    with pytest.raises(CheckpointError, match=r"fp8: the checkpoint has no tensor 'layers\.0\.attn\.k_scale'"):
        TorchExecutor(plain, kv_dtype="fp8", **SIZES)
    opts = RuntimeOptions(num_blocks=8, block_size=4, max_batch_size=2, max_num_tokens=8, kv_dtype="fp8")
    with pytest.raises(ConfigError, match=r"--kv-cache-dtype fp8: .* takes fp32 KV cache pools"):
        create_executor("onnxruntime", onnx_exports("base"), opts)
    # a bf16/fp32 pool ignores the scales a checkpoint carries: the same as a checkpoint without them
    _, weights, _ = fp8kv
    a = TorchExecutor(weights, **SIZES)
    b = TorchExecutor(type(weights)(weights.config, {k: v for k, v in weights.tensors.items()
                                                     if not k.endswith(("k_scale", "v_scale"))}, weights.dtype),
                      **SIZES)
    for what, batch in scenario(a.vocab_size, seed=2)[:2]:
        assert torch.equal(a.execute(batch), b.execute(batch)), what
