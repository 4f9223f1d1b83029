"""TensorRT plugins: the API names used exist in the 11.4 plugin API; a one-layer engine per plugin where TensorRT
and a GPU exist."""

import inspect

import pytest
import torch

from trtfalcon.errors import MissingDependencyError
from trtfalcon.plugins import tensorrt as trt_plugins
from trtfalcon.plugins.ops import OPS
from helpers import wheel_plugin_api_names

@pytest.fixture(scope="module")
def plugin_api_names(trt_bindings_wheel) -> set[str]:
    return wheel_plugin_api_names(trt_bindings_wheel)


def test_plugin_api_names_exist(plugin_api_names):
    used = {"register", "aot_impl", "KernelLaunchParams", "SymIntExprs", "SymInt32", "cdiv", "TensorDesc",
            "aliased", "like", "shape_expr", "constant_value", "is_constant", "dtype"}
    assert used <= plugin_api_names, f"missing from the 11.4 plugin API: {used - plugin_api_names}"


def test_missing_tensorrt_raises_clear_error():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="tensorrt"):
            trt_plugins.register_plugins()
    else:
        pytest.skip("tensorrt is installed here")


class _FakeDesc:
    def __init__(self, name):
        self.name = name

    def like(self):
        return ("like", self.name)

    def aliased(self):
        return ("aliased", self.name)


def test_generated_signatures_follow_the_plugin_schema(monkeypatch):
    """With a recording stand-in for tensorrt.plugin: one plugin per kernel; register's signature lists the
    inputs as TensorDesc then typed attributes; aot_impl's is (inputs, attributes, outputs, tactic), the schema
    tensorrt_bindings/plugin/_validate.py enforces; aliased outputs for the in-place state and cache."""
    seen: dict[str, dict] = {}

    class FakeTrtp:
        TensorDesc = _FakeDesc

        @staticmethod
        def register(pid):
            def deco(f):
                seen.setdefault(pid, {})["register"] = f
                return f
            return deco

        @staticmethod
        def aot_impl(pid):
            def deco(f):
                seen.setdefault(pid, {})["aot_impl"] = f
                return f
            return deco

    monkeypatch.setattr(trt_plugins, "_REGISTERED", set())
    monkeypatch.setattr(trt_plugins, "import_tensorrt_plugin", lambda: (object(), FakeTrtp))
    ids = trt_plugins.register_plugins()
    assert ids == trt_plugins.plugin_ids() and set(seen) == set(ids)
    for op in OPS.values():
        for ks in op.kernels:
            fns = seen[f"trtfalcon::{op.plugin_name(ks)}"]
            sig = inspect.signature(fns["register"])
            names = [i.name for i in op.inputs] + [a.name for a in op.attributes]
            assert list(sig.parameters) == names
            assert all(sig.parameters[i.name].annotation is _FakeDesc for i in op.inputs)
            assert list(inspect.signature(fns["aot_impl"]).parameters) == names + ["outputs", "tactic"]
            if op.name == "gated_rms_norm":
                continue  # its output dtype is set through a real TensorDesc
            outs = fns["register"](*[_FakeDesc(i.name) for i in op.inputs])
            assert outs == tuple(("aliased", o.alias) if o.alias else ("like", o.like) for o in op.outputs)


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

    from trtfalcon.plugins.spec import DTYPES

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
        inputs.append(network.add_input(i.name, getattr(trt, {"float32": "float32", "bfloat16": "bfloat16",
                                                              "int32": "int32"}[[k for k, v in DTYPES.items()
                                                                                 if v[0] == t.dtype][0]]),
                                        tuple(t.shape)))
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
