"""TensorRT 11 plugins: registered through TensorRT 11.4's own tensorrt.plugin (its validators and descriptor
classes, from the pinned bindings wheel); a one-layer engine per plugin where TensorRT and a GPU exist."""

import inspect

import pytest
import torch

from trtfalcon.errors import MissingDependencyError
from trtfalcon.plugins import tensorrt as trt_plugins
from trtfalcon.plugins.ops import OPS


def test_missing_tensorrt_raises_clear_error():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="tensorrt"):
            trt_plugins.register_plugins()
    else:
        pytest.skip("tensorrt is installed here")


@pytest.fixture
def trtp(trt_bindings_wheel, tmp_path, monkeypatch):
    """TensorRT 11.4's own `tensorrt.plugin` (helpers.tensorrt_plugin_api); registrations start from scratch."""
    from helpers import tensorrt_plugin_api

    monkeypatch.setattr(trt_plugins, "_REGISTERED", set())
    with tensorrt_plugin_api(trt_bindings_wheel, tmp_path) as api:
        yield api


def test_registration_passes_tensorrt_11_4_validators(trtp):
    """register_plugins() through TensorRT 11.4's real register / aot_impl decorators, which run its validators
    (_validate.py: no attribute defaults, typed attributes, TensorDesc inputs first, the aot_impl argument schema and
    return annotation): one plugin per kernel, each with the spec's inputs, attributes and outputs."""
    from tensorrt.plugin import _lib

    ids = trt_plugins.register_plugins()
    assert ids == trt_plugins.plugin_ids()
    for op in OPS.values():
        for ks in op.kernels:
            pid = f"trtfalcon::{op.plugin_name(ks)}"
            d = _lib.QDP_REGISTRY[pid]
            assert d.input_tensor_names == [i.name for i in op.inputs]
            assert d.input_attrs == {a.name: a.type for a in op.attributes}
            assert d.num_outputs == len(op.outputs)
            assert d.aot_impl_func is not None and d.aot_impl_attr_names == [a.name for a in op.attributes]
            assert d.impl_func is None  # AOT only: the engine holds the kernel, no Python at run time
            assert getattr(trtp.op.trtfalcon, op.plugin_name(ks)) is d
    assert trt_plugins.register_plugins() == ids  # idempotent: a second call registers nothing twice


def test_validators_reject_what_tensorrt_11_4_rejects(trtp):
    """The check discriminates: the two mistakes TensorRT 11.4 refused in this project's earlier registration."""
    from tensorrt.plugin import _validate

    def with_default(x: trtp.TensorDesc, activation: bool = True) -> tuple[trtp.TensorDesc]:
        return (x.like(),)

    with pytest.raises(ValueError, match="Argument activation has a default value"):
        _validate._parse_register_inputs(with_default, False)

    @trtp.register("trtfalcon_test::one")
    def one(x: trtp.TensorDesc, activation: bool) -> tuple[trtp.TensorDesc]:
        return (x.like(),)

    with pytest.raises(ValueError, match="No return annotation found for aot_impl function"):
        trtp.aot_impl("trtfalcon_test::one")(lambda x, activation, outputs, tactic: None)


def test_output_descriptors_alias_the_pools(trtp):
    """Each registered description, called as TensorRT calls it on real TensorDescs: aliased outputs for the in-place
    cache/state updates (the same input's descriptor), like() for the others, gated_rms_norm's dtype from its
    out_dtype attribute."""
    import tensorrt as trt
    from tensorrt.plugin import _lib

    trt_plugins.register_plugins()
    for op in OPS.values():
        d = _lib.QDP_REGISTRY[f"trtfalcon::{op.plugin_name(op.kernels[0])}"]
        descs = {i.name: trtp.TensorDesc(trtp.ShapeExprs.from_tuple((2, 3)), trt.float32) for i in op.inputs}
        attrs = {a.name: ("bfloat16" if a.name == "out_dtype" else a.default) for a in op.attributes}
        outs = d.register_func(*descs.values(), **attrs)
        assert len(outs) == len(op.outputs)
        for o, desc in zip(op.outputs, outs):
            if o.alias:
                assert desc.is_aliased and desc.get_aliased() is descs[o.alias], (op.name, o.name)
            else:
                assert not desc.is_aliased
                assert desc.dtype is (trt.bfloat16 if o.dtype_attr else descs[o.like].dtype), (op.name, o.name)


def _tensorrt_and_gpu_or_skip():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("TensorRT is not installed here (its builder comes from NVIDIA's index, not PyPI)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: TensorRT's builder needs one")


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("plugin", ["causal_conv1d", "ssd", "ssd_recurrent", "gated_rms_norm", "paged_attention",
                                    "paged_attention_decode"])
def test_one_layer_engine_matches_reference(plugin):
    _tensorrt_and_gpu_or_skip()
    import tensorrt as trt

    from trtfalcon.dtypes import lookup

    op = next(o for o in OPS.values() if any(o.plugin_name(k) == plugin for k in o.kernels))
    args, kwargs, attrs = _example_call(op.name)
    tensors, _ = op.bind(*args, **kwargs)
    ref_tensors = {n: (t.clone() if t is not None else None) for n, t in tensors.items()}
    expected = op.ref(*[ref_tensors.get(n, a) if isinstance(a, torch.Tensor) else a
                        for n, a in zip(inspect.signature(op.ref).parameters, args)], **kwargs)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    inputs = []
    for i in op.inputs:
        t = tensors[i.name]
        if t is None:
            t = torch.full(tensors[op.outputs[0].like].shape[-1:], i.fill or 0.0)
            tensors[i.name] = t
        inputs.append(network.add_input(i.name, getattr(trt, lookup(t.dtype, "torch").tensorrt), tuple(t.shape)))
    layer = trt_plugins.add_plugin(network, plugin, inputs, **attrs)
    for j, o in enumerate(op.outputs):
        layer.get_output(j).name = o.name
        network.mark_output(layer.get_output(j))
    engine_bytes = builder.build_serialized_network(network, builder.create_builder_config())
    assert engine_bytes is not None, "TensorRT failed to build the one-layer engine"
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    ctx = engine.create_execution_context()
    dev = {n: t.cuda().contiguous() for n, t in tensors.items()}
    outs = {}
    for o in op.outputs:
        outs[o.name] = dev[o.alias] if o.alias else torch.empty_like(dev[o.like])
    for n, t in list(dev.items()) + list(outs.items()):
        ctx.set_tensor_address(n, t.data_ptr())
    stream = torch.cuda.Stream()
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    got = outs[op.outputs[0].name].cpu().float()
    torch.testing.assert_close(got, expected.float(), atol=2e-2, rtol=2e-2)


def _example_call(name: str):
    """Small inputs of each op: (reference args, kwargs, plugin attributes)."""
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    ctx = torch.tensor([0, 2], dtype=torch.int32)
    slots = torch.tensor([1, 0], dtype=torch.int32)
    if name == "causal_conv1d":
        return ((torch.randn(4, 32), torch.randn(32, 4), torch.randn(32), torch.randn(2, 32, 3), cu, ctx, slots),
                {}, dict(activation=True))
    if name == "ssd":
        h, p, g, n = 4, 16, 1, 16
        return ((torch.randn(4, h, p), torch.randn(4, h), -torch.rand(h) - 0.5, torch.randn(4, g, n),
                 torch.randn(4, g, n), torch.randn(h), torch.randn(h), torch.randn(2, h, p, n), cu, ctx, slots, 16),
                {}, dict(chunk_size=16, dt_min=0.0, dt_max=float("inf")))
    if name == "gated_rms_norm":
        return ((torch.randn(4, 64), torch.randn(4, 64), torch.randn(64), 1, 1e-5, False, torch.float32), {},
                dict(n_groups=1, eps=1e-5, norm_before_gate=False, has_norm=True, out_dtype="float32"))
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    return ((torch.randn(4, 4, 32), torch.randn(4, 2, 32), torch.randn(4, 2, 32), torch.randn(2, 4, 4, 2, 32),
             tables, cu, ctx), {}, dict(scale=0.0))
