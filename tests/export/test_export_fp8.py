"""FP8: the explicit Q/DQ graph in onnxruntime computes what the torch executor computes on the same FP8 deploy
checkpoint (fake-quantized, trtfalcon/checkpoint/deploy_fp8.py), and only the six quantized linears get Q/DQ."""

import onnx
import pytest
import torch
from onnx import TensorProto

from trtfalcon.export import MODEL_FILE, export_onnx, read_manifest
from trtfalcon.model.weights import load_weights
from trtfalcon.checkpoint.deploy_fp8 import QUANTIZED_LINEARS
from trtfalcon.runtime.executors.onnxruntime import OnnxRuntimeExecutor
from trtfalcon.runtime.executors.torch import TorchExecutor
from export_helpers import BLOCK_SIZE, NUM_BLOCKS, NUM_SLOTS, greedy_tokens, make_fp8_deploy, scenario

SIZES = dict(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, num_slots=NUM_SLOTS)


@pytest.fixture(scope="module")
def fp8(deploy_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    weights = make_fp8_deploy(deploy_checkpoints("base"), root / "deploy")
    return root / "deploy", weights, export_onnx(root / "deploy", root / "onnx")


def test_fp8_checkpoint_loads_as_built(fp8):
    """The deploy loader reads the test's FP8 checkpoint back to the very tensors it was built from."""
    deploy, weights, _ = fp8
    loaded = load_weights(deploy)
    assert set(loaded.tensors) == set(weights.tensors)
    for name, t in weights.tensors.items():
        assert loaded[name].dtype == t.dtype, name
        as_bits = (lambda x: x.view(torch.uint8)) if t.dtype == torch.float8_e4m3fn else (lambda x: x)
        assert torch.equal(as_bits(loaded[name]), as_bits(t)), name


def test_qdq_graph_matches_fake_quantized_torch(fp8, onnx_exports, deploy_checkpoints):
    _, weights, export = fp8
    torch_ex, ort_ex = TorchExecutor(weights, **SIZES), OnnxRuntimeExecutor(export, **SIZES)
    float_ex = OnnxRuntimeExecutor(onnx_exports("base"), **SIZES)
    errors = []
    for what, batch in scenario(torch_ex.vocab_size, seed=3):
        expected, got, unquantized = torch_ex.execute(batch), ort_ex.execute(batch), float_ex.execute(batch)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), what
        errors.append(float((unquantized - expected).abs().max() / expected.abs().max()))
    for name, pool in torch_ex.pools.items():
        torch.testing.assert_close(ort_ex.pools[name], pool, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the Q/DQ is live: FP8 moves the logits away from the float graph's, by an FP8-sized amount
    assert 1e-3 < max(errors) < 0.5, errors


def test_fp8_greedy_tokens_identical(fp8):
    _, weights, export = fp8
    sizes = dict(num_blocks=30, block_size=4, num_slots=3)
    assert greedy_tokens(TorchExecutor(weights, **sizes)) == greedy_tokens(OnnxRuntimeExecutor(export, **sizes))


def test_only_the_quantized_linears_get_qdq(fp8):
    deploy, weights, export = fp8
    model = onnx.load(str(export / MODEL_FILE), load_external_data=False)
    layers = weights.config.num_hidden_layers
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in model.graph.initializer}

    quantized_gemms = set()
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert next(a.i for a in n.attribute if a.name == "saturate") == 1
            assert inits[n.input[2]].data_type == TensorProto.FLOAT8E4M3FN  # the zero point sets the output type
            (dq,) = consumers[n.output[0]]
            assert dq.op_type == "DequantizeLinear"
            (gemm,) = consumers[dq.output[0]]
            assert gemm.op_type == "Gemm" and gemm.input[0] == dq.output[0]
            w_dq = producer[gemm.input[1]]
            assert w_dq.op_type == "DequantizeLinear" and next(a.i for a in w_dq.attribute if a.name == "axis") == 0
            w = inits[w_dq.input[0]]
            assert w.data_type == TensorProto.FLOAT8E4M3FN and w.data_location == TensorProto.EXTERNAL
            assert w.name.endswith(".weight")
            assert inits[w_dq.input[1]].name == w.name.replace(".weight", ".weight_scale")
            quantized_gemms.add(gemm.name)
    expected = {f"/model/layers.{i}/{leaf.replace('.', '/')}/Gemm"
                for i in range(layers) for leaf in QUANTIZED_LINEARS}
    assert quantized_gemms == expected
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == len(expected)
    # everything else reads plain tensors: lm_head, conv1d, norms, embeddings
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for n in model.graph.node:
        if n.name not in quantized_gemms:
            assert not dq_outputs & set(n.input), f"{n.name} reads a dequantized tensor"
    assert nodes["/lm_head/Gemm"].input[1] == "lm_head.weight"
    assert inits["lm_head.weight"].data_type == TensorProto.FLOAT
    for n in model.graph.node:
        if n.op_type in ("causal_conv1d", "gated_rms_norm", "Gather"):
            for i in n.input:
                assert i not in inits or inits[i].data_type != TensorProto.FLOAT8E4M3FN, (n.name, i)
    fp8_inits = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN}
    assert fp8_inits == {f"layers.{i}.{leaf}.weight" for i in range(layers) for leaf in QUANTIZED_LINEARS} | {
        "/model/constants/fp8_zero_point"}
    assert read_manifest(export)["fp8"]["linears"] == [f"layers.{i}.{leaf}" for i in range(layers)
                                                       for leaf in QUANTIZED_LINEARS]


def test_modelopt_fp8_checkpoint_through_convert_and_export(hf_checkpoints, tmp_path):
    """The whole FP8 path: ModelOpt calibration (`trtfalcon quantize`) -> convert -> export; the Q/DQ graph in
    onnxruntime matches the torch executor running the converted FP8 deploy checkpoint."""
    pytest.importorskip("modelopt", reason="FP8 calibration needs nvidia-modelopt (pip install 'trtfalcon[quant]')")
    from trtfalcon.checkpoint.convert import convert_checkpoint
    from trtfalcon.quantize.fp8 import quantize_fp8

    quantize_fp8(hf_checkpoints("base"), tmp_path / "fp8-hf", calib_size=2, calib_seq_len=16, accuracy=False)
    dep = convert_checkpoint(tmp_path / "fp8-hf", tmp_path / "fp8-deploy", dtype="fp32")
    export = export_onnx(dep, tmp_path / "fp8-onnx")
    layers = read_manifest(export)["fp8"]["linears"]
    assert len(layers) == 6 * 2
    torch_ex, ort_ex = TorchExecutor(load_weights(dep), **SIZES), OnnxRuntimeExecutor(export, **SIZES)
    for what, batch in scenario(torch_ex.vocab_size, seed=5):
        torch.testing.assert_close(ort_ex.execute(batch), torch_ex.execute(batch), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what}: {m}")


def test_bf16_fp8_graph_is_well_typed(fp8, tmp_path):
    """The graph TensorRT builds (bf16 activations): scales in bf16, as QuantizeLinear needs x and its scale to share
    a type; FP8 weights keep their bytes; every value gets a type from ONNX inference."""
    deploy, _, _ = fp8
    out = export_onnx(deploy, tmp_path / "bf16", dtype="bf16")
    onnx.checker.check_model(str(out / MODEL_FILE))
    model = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert inits["layers.0.attn.qkv_proj.input_scale"] == TensorProto.BFLOAT16
    assert inits["layers.0.attn.qkv_proj.weight_scale"] == TensorProto.BFLOAT16
    assert inits["layers.0.attn.qkv_proj.weight"] == TensorProto.FLOAT8E4M3FN
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    gemm = next(n for n in model.graph.node if n.name == "/model/layers.0/attn/qkv_proj/Gemm")
    assert types[gemm.input[0]] == types[gemm.input[1]] == types[gemm.output[0]] == TensorProto.BFLOAT16
