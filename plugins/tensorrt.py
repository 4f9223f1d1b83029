"""TensorRT quickly-deployable plugins, generated from the op declarations in plugins/spec.py.

`register_plugins()` registers, for every op and each of its kernels, a plugin "trtfalcon::<plugin_name>" with
`tensorrt.plugin.register` (inputs as TensorDesc, attributes typed as in the spec, outputs `like()` their input or
`aliased()` to it for the in-place cache/state updates) and `tensorrt.plugin.aot_impl`, which compiles the Triton
kernel for the GPU doing the build (plugins/aot.py `compile_kernel`) and returns (kernel name, PTX, launch params
whose grid and shared memory are shape expressions, scalar arguments as SymInt32 shape expressions). The engine
then holds the kernel: no Python at run time.

`tensorrt` is imported lazily, only here, and only when called: where it is missing a MissingDependencyError says
what to install (TensorRT's builder comes from NVIDIA's index or an NGC container, not PyPI).
"""

from __future__ import annotations

import inspect
from typing import Any, Tuple

from trtfalcon.errors import MissingDependencyError
from trtfalcon.plugins.ops import OPS
from trtfalcon.plugins.spec import DOMAIN, KernelSpec, OpSpec

# TensorRT dtype attribute names per spec dtype name (resolved against the installed tensorrt module).
_TRT_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "int32": "int32",
              "float8_e4m3fn": "fp8"}  # the FP8 KV cache (trt.fp8 is E4M3)
_REGISTERED: set[str] = set()


def import_tensorrt_plugin() -> tuple[Any, Any]:
    """(tensorrt, tensorrt.plugin), or MissingDependencyError naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependencyError(
            "TensorRT plugins need the `tensorrt` Python package with its builder libraries (TensorRT 11: install "
            "from NVIDIA's index, `pip install tensorrt-cu13 --extra-index-url https://pypi.nvidia.com`, or use an "
            f"NGC TensorRT container); import failed: {e}"
        ) from e
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise MissingDependencyError(f"this TensorRT has no `tensorrt.plugin` (quickly deployable plugins, "
                                     f"TensorRT >= 10.9): {e}") from e
    return trt, trtp


def _dtype_name(trt: Any, dt: Any) -> str:
    for name, attr in _TRT_DTYPE.items():
        if getattr(trt, attr, None) == dt:
            return name
    raise MissingDependencyError(f"TensorRT dtype {dt} has no Triton kernel configuration")


def _static_dim(op: OpSpec, descs: dict[str, Any]):
    def get(tensor: str, axis: int) -> int:
        expr = descs[tensor].shape_expr[axis]
        if not expr.is_constant:
            raise ValueError(f"trtfalcon::{op.name}: {tensor}.shape[{axis}] must be a build-time constant "
                             f"(it is a kernel compile-time constant), found a dynamic dimension")
        return int(expr.constant_value())
    return get


def _register_one(trt: Any, trtp: Any, op: OpSpec, ks: KernelSpec) -> str:
    plugin_id = f"{DOMAIN}::{op.plugin_name(ks)}"
    if plugin_id in _REGISTERED:
        return plugin_id
    tensor_params = [inspect.Parameter(i.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc)
                     for i in op.inputs]
    attr_params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a.type,
                                     default=a.default) for a in op.attributes]
    out_ann = Tuple[tuple(trtp.TensorDesc for _ in op.outputs)]  # type: ignore[misc]

    def describe(*args: Any, **kwargs: Any) -> tuple:
        bound = describe.__signature__.bind(*args, **kwargs)  # type: ignore[attr-defined]
        bound.apply_defaults()
        a = bound.arguments
        outs = []
        for o in op.outputs:
            src = a[o.alias or o.like]
            if o.alias:
                outs.append(src.aliased())
                continue
            desc = src.like()
            if o.dtype_attr:
                desc.dtype = getattr(trt, _TRT_DTYPE[a[o.dtype_attr]])
            outs.append(desc)
        return tuple(outs)

    describe.__signature__ = inspect.Signature(tensor_params + attr_params, return_annotation=out_ann)  # type: ignore[attr-defined]
    describe.__name__ = f"{op.name}_{ks.name}_desc"
    trtp.register(plugin_id)(describe)

    def aot_impl(*args: Any) -> tuple:
        from trtfalcon.plugins.aot import compile_kernel

        n_in, n_attr = len(op.inputs), len(op.attributes)
        descs = dict(zip([i.name for i in op.inputs], args[:n_in]))
        attrs = dict(zip([a.name for a in op.attributes], args[n_in:n_in + n_attr]))
        dtypes = {n: _dtype_name(trt, d.dtype) for n, d in descs.items()}
        comp = compile_kernel(op, ks, dtypes, attrs, _static_dim(op, descs), cc=None, resources=False)

        def dim_expr(t: str, axis: int) -> Any:
            return descs[t].shape_expr[axis]

        launch = trtp.KernelLaunchParams()
        grid = [e.evaluate(dim_expr, comp.constexprs, trtp.cdiv) for e in ks.grid]
        for axis, g in zip(("grid_x", "grid_y", "grid_z"), grid):
            setattr(launch, axis, g)
        launch.block_x = comp.num_warps * 32
        launch.shared_mem = comp.shared_mem
        extra = trtp.SymIntExprs(len(ks.scalars))
        for i, (_, e) in enumerate(ks.scalars):
            extra[i] = trtp.SymInt32(e.evaluate(dim_expr, comp.constexprs, trtp.cdiv))
        return comp.name, comp.ptx, launch, extra

    aot_params = ([inspect.Parameter(i.name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for i in op.inputs]
                  + [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in op.attributes]
                  + [inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                     inspect.Parameter("tactic", inspect.Parameter.POSITIONAL_OR_KEYWORD)])
    aot_impl.__signature__ = inspect.Signature(aot_params)  # type: ignore[attr-defined]
    aot_impl.__name__ = f"{op.name}_{ks.name}_aot_impl"
    trtp.aot_impl(plugin_id)(aot_impl)
    _REGISTERED.add(plugin_id)
    return plugin_id


def register_plugins() -> list[str]:
    """Register every op's plugins (idempotent); returns their ids ("trtfalcon::ssd", "trtfalcon::ssd_recurrent", ...)."""
    trt, trtp = import_tensorrt_plugin()
    return [_register_one(trt, trtp, op, ks) for op in OPS.values() for ks in op.kernels]


def plugin_ids() -> list[str]:
    """The plugin ids register_plugins() creates (no TensorRT needed)."""
    return [f"{DOMAIN}::{op.plugin_name(ks)}" for op in OPS.values() for ks in op.kernels]


def add_plugin(network: Any, plugin: str, inputs: list[Any], **attrs: Any) -> Any:
    """Add plugin `plugin` (e.g. "ssd") to a TensorRT network with its AOT kernel; returns the layer."""
    _, trtp = import_tensorrt_plugin()
    register_plugins()
    op_fn = getattr(getattr(trtp.op, DOMAIN), plugin)
    return network.add_plugin(op_fn(*inputs, **attrs), aot=True)


__all__ = ["add_plugin", "import_tensorrt_plugin", "plugin_ids", "register_plugins"]
