"""The exported graph itself: valid ONNX, opset 21+, plugin nodes exactly as plugins/spec.py declares them (what
TensorRT's parser maps to the registered plugins), the engine I/O contract as graph I/O, readable names, weights
as aligned external data."""

import json

import onnx
import pytest
import torch
from onnx import AttributeProto, TensorProto

from trtfalcon.export import DATA_FILE, MANIFEST_FILE, MODEL_FILE
from trtfalcon.export.onnx import plugin_node_attrs
from trtfalcon.checkpoint.deploy_reader import open_deploy_checkpoint
from trtfalcon.plugins.ops import OPS
from trtfalcon.plugins.spec import DOMAIN
from trtfalcon.runtime.contract import STEP_INPUTS, STEP_OUTPUTS, CacheSpec, cache_names, cache_output_name
from trtfalcon.runtime.executors.onnxruntime import PluginKernel

ONNX_OF = {torch.int32: TensorProto.INT32, torch.float32: TensorProto.FLOAT}
TRT_ATTRS = {"plugin_namespace", "aot"}
ATTR_TYPE = {bool: AttributeProto.INT, int: AttributeProto.INT, float: AttributeProto.FLOAT, str: AttributeProto.STRING}
PLUGIN_TYPES = {op.plugin_name(k): op for op in OPS.values() for k in op.kernels}


@pytest.fixture(scope="module")
def exported(onnx_exports):
    d = onnx_exports("all_biases")
    return d, onnx.load(str(d / MODEL_FILE), load_external_data=False)


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_checker_opset_and_inference(exported):
    d, model = exported
    onnx.checker.check_model(str(d / MODEL_FILE))
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] >= 21 and opsets[DOMAIN] == 1
    inferred = onnx.shape_inference.infer_shapes(model)
    typed = {v.name for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    untyped = [o for n in model.graph.node for o in n.output if o not in typed]
    assert not untyped, f"values without a type: {untyped[:5]}"


def test_plugin_nodes_follow_the_spec(exported):
    _, model = exported
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = {o.name for o in model.graph.output}
    plugin_nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    layers = 2
    assert sorted(n.op_type for n in plugin_nodes) == sorted(
        ["causal_conv1d", "ssd", "gated_rms_norm", "paged_attention"] * layers)
    for n in plugin_nodes:
        op = PLUGIN_TYPES[n.op_type]
        assert len(n.input) == len(op.inputs) and len(n.output) == len(op.outputs), n.name
        attrs = {a.name: a for a in n.attribute}
        assert set(attrs) == {a.name for a in op.attributes} | TRT_ATTRS, n.name
        for a in op.attributes:
            assert attrs[a.name].type == ATTR_TYPE[a.type], (n.name, a.name)
        assert attrs["plugin_namespace"].s == DOMAIN.encode() and attrs["aot"].i == 1
        for o, out_name in zip(op.outputs, n.output):
            if o.alias:  # the aliased output is the graph output named after the pool it updates
                pool = n.input[[i.name for i in op.inputs].index(o.alias)]
                assert pool in graph_inputs and out_name == cache_output_name(pool) and out_name in graph_outputs


def test_io_follows_the_contract(exported, deploy_checkpoints):
    d, model = exported
    cfg = open_deploy_checkpoint(deploy_checkpoints("all_biases")).config
    spec = CacheSpec.for_model(cfg, num_blocks=7, block_size=5, num_slots=3, kv_dtype=torch.float32,
                               conv_dtype=torch.float32, ssm_dtype=torch.float32)
    pools = cache_names(cfg.num_hidden_layers)
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    assert list(inputs) == list(STEP_INPUTS) + pools
    assert list(outputs) == list(STEP_OUTPUTS) + [cache_output_name(p) for p in pools]
    for name, (dt, shape) in STEP_INPUTS.items():
        assert inputs[name].type.tensor_type.elem_type == ONNX_OF[dt] and dims(inputs[name]) == list(shape)
    assert dims(outputs["logits"]) == ["num_seqs", cfg.vocab_size]
    assert outputs["logits"].type.tensor_type.elem_type == TensorProto.FLOAT
    concrete = {"num_blocks": 7, "block_size": 5, "num_slots": 3}
    for pool in pools:
        kind = pool.split(".")[0]
        want = {"kv_cache": spec.kv_shape(), "conv_state": spec.conv_shape(), "ssm_state": spec.ssm_shape()}[kind]
        for vi in (inputs[pool], outputs[cache_output_name(pool)]):
            assert [concrete.get(x, x) for x in dims(vi)] == list(want), pool
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    assert manifest["aliases"] == {cache_output_name(p): p for p in pools}
    assert manifest["inputs"]["block_tables"] == {"dtype": "int32", "shape": ["num_seqs", "max_blocks"]}
    assert manifest["plugins"]["nodes"] == {"causal_conv1d": 2, "gated_rms_norm": 2, "paged_attention": 2, "ssd": 2}


def test_readable_names_and_external_weights(exported):
    d, model = exported
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names) and all(n.startswith("/") for n in names)
    for expected in ("/model/embed_tokens/Gather", "/model/layers.0/attn/qkv_proj/Gemm",
                     "/model/layers.1/mamba/conv1d/causal_conv1d", "/model/layers.0/mamba/ssd/ssd",
                     "/model/layers.0/attn/paged_attention/paged_attention", "/model/layers.1/mlp/down_proj/Gemm",
                     "/lm_head/Gemm"):
        assert expected in names
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert {t.name for t in external} >= {"embed_tokens.weight", "lm_head.weight", "layers.0.attn.qkv_proj.weight",
                                          "layers.0.attn.qkv_proj.bias", "layers.1.mamba.conv1d.weight"}
    size = (d / DATA_FILE).stat().st_size
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == DATA_FILE and int(info["offset"]) % 4096 == 0
        assert int(info["offset"]) + int(info["length"]) <= size
    assert (d / MODEL_FILE).stat().st_size < 200_000  # the graph only; weights are in the data file


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_custom_op_binding_inverts_the_spec(exported, op_name):
    """OpSpec.ref_arguments (graph node -> reference call) is the inverse of OpSpec.bind (reference call -> node)."""
    _, model = exported
    op = OPS[op_name]
    node = next(n for n in model.graph.node if n.domain == DOMAIN and n.op_type == op.name)
    kernel = PluginKernel(op, op.ref)
    attrs = kernel.attributes({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
    assert attrs == {**op.attr_defaults(), **attrs} and set(attrs) == {a.name for a in op.attributes}
    tensors = {i.name: torch.zeros((1,) * len(i.shape)) for i in op.inputs}  # of each input's rank (scales: ())
    bound_tensors, bound_attrs = op.bind(**op.ref_arguments(tensors, attrs))
    for name, t in tensors.items():
        absent = name == "weight" and op.name == "gated_rms_norm" and not attrs["has_norm"]
        assert bound_tensors[name] is (None if absent else t)
    for k, v in attrs.items():
        if k == "scale" and v == 0.0:
            continue
        assert bound_attrs[k] == pytest.approx(v) if isinstance(v, float) else bound_attrs[k] == v, k
    assert plugin_node_attrs(op, bound_attrs)["aot"] == 1


def test_variant_without_norm_and_conv_bias_passes_fills(onnx_exports):
    for variant, op, attr, fill in (("no_mamba_rms_norm", "gated_rms_norm", "has_norm", 1.0),
                                    ("no_conv_bias", "causal_conv1d", None, 0.0)):
        model = onnx.load(str(onnx_exports(variant) / MODEL_FILE))
        inits = {t.name: t for t in model.graph.initializer}
        node = next(n for n in model.graph.node if n.op_type == op)
        if attr:
            assert next(a.i for a in node.attribute if a.name == attr) == 0
        arg = [i.name for i in OPS[op].inputs].index("weight" if attr else "bias")
        values = onnx.numpy_helper.to_array(inits[node.input[arg]])
        assert (values == fill).all() and values.dtype.name == "float32"


def test_progress_reports_every_weight_byte(deploy_checkpoints, tmp_path):
    from trtfalcon.export import export_onnx

    seen = []
    out = export_onnx(deploy_checkpoints("one_group"), tmp_path / "o", progress=lambda *a: seen.append(a))
    model = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert [name for name, _, _ in seen] == [t.name for t in external]
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and done[-1] == seen[-1][2] == sum(
        int({e.key: e.value for e in t.external_data}["length"]) for t in external)
