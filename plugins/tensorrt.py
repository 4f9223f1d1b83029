"""TensorRT plugins generated from the op declarations in plugins/spec.py: what TensorRT 11 and TensorRT for RTX
share, and TensorRT 11's quickly deployable plugins.

Shared by both builds (TensorRT for RTX's IPluginV3 classes are in plugins/tensorrt_rtx.py):
- `plugin_kernels()`: one plugin per op kernel, "trtfalcon::<OpSpec.plugin_name>", the ONNX node's op type;
- `spec_dtype` / `trt_dtype`: TensorRT data types <-> the spec's dtype names;
- `compile_plugin_kernel()`: the op's Triton kernel compiled ahead of time (plugins/aot.py `compile_kernel`) for
  the input dtypes and the dimensions TensorRT knows to be build-time constants;
- `launch_exprs()`: the kernel's grid and scalar arguments, the spec's shape expressions evaluated over the
  input shapes: TensorRT symbolic expressions in TensorRT 11's aot_impl, integers at enqueue for TensorRT for RTX.

TensorRT 11 (`register_plugins()`): for every op kernel, `tensorrt.plugin.register` (inputs as TensorDesc, then the
attributes typed as in the spec; outputs `like()` their input, or `aliased()` to it for the in-place cache/state
updates) and `tensorrt.plugin.aot_impl`, which compiles the kernel for the GPU doing the build and returns
(kernel name, PTX, launch params whose grid and shared memory are shape expressions, scalar arguments as SymInt32
shape expressions). The engine then holds the kernel: no Python at run time. TensorRT 11.4 validates both
signatures (tensorrt_bindings/plugin/_validate.py): attributes may have no default value (TensorRT passes every
attribute: the ONNX export writes them all, and `add_plugin` fills in the spec's defaults) and aot_impl must
annotate its return. tests/plugins/test_tensorrt.py runs those validators from the pinned wheel.

TensorRT is imported lazily, through trtfalcon/tensorrt_import.py, and only when called.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Tuple

from trtfalcon.dtypes import lookup
from trtfalcon.errors import TrtFalconError
from trtfalcon.plugins.ops import OPS
from trtfalcon.plugins.spec import DOMAIN, TENSOR_DTYPES, KernelSpec, OpSpec
from trtfalcon.tensorrt_import import import_tensorrt_plugin

_REGISTERED: set[str] = set()


# ---------------------------------------------------------------------------------------------------------------
# Shared by TensorRT 11 and TensorRT for RTX


def plugin_kernels() -> dict[str, tuple[OpSpec, KernelSpec]]:
    """Plugin name (the ONNX op type) -> its op and kernel, for every kernel of every op."""
    return {op.plugin_name(ks): (op, ks) for op in OPS.values() for ks in op.kernels}


def plugin_ids() -> list[str]:
    """The plugin ids both builds register ("trtfalcon::ssd", "trtfalcon::ssd_recurrent", ...); no TensorRT needed."""
    return [f"{DOMAIN}::{name}" for name in plugin_kernels()]


def trt_dtype(trt: Any, name: str) -> Any:
    """The installed tensorrt module's DataType for a spec dtype name ("bfloat16", "float8_e4m3fn", ...)."""
    return getattr(trt, lookup(name, "long", among=TENSOR_DTYPES).tensorrt)


def spec_dtype(trt: Any, dt: Any) -> str:
    for name in TENSOR_DTYPES:  # each resolved against the installed tensorrt module
        if getattr(trt, lookup(name, "long").tensorrt, None) == dt:
            return name
    raise TrtFalconError(f"TensorRT dtype {dt} has no plugin kernel configuration; expected one of "
                         f"{', '.join(TENSOR_DTYPES)}")


def compile_plugin_kernel(op: OpSpec, ks: KernelSpec, dtypes: dict[str, str], attrs: dict[str, Any],
                          static_dim: Callable[[str, int], int | None], cc: int | None) -> Any:
    """plugins/aot.py compile_kernel for one plugin instance. static_dim(tensor, axis) is the dimension if TensorRT
    knows it at build time, else None: the dimensions a kernel's constants read (head counts, sizes) must be."""
    from trtfalcon.plugins.aot import compile_kernel

    def constant(tensor: str, axis: int) -> int:
        d = static_dim(tensor, axis)
        if d is None:
            raise TrtFalconError(f"{DOMAIN}::{op.plugin_name(ks)}: {tensor}.shape[{axis}] must be a build-time "
                                 "constant (it is a kernel compile-time constant), found a dynamic dimension")
        return int(d)

    return compile_kernel(op, ks, dtypes, attrs, constant, cc=cc, resources=False)


def launch_exprs(ks: KernelSpec, constexprs: dict[str, Any], dim: Callable[[str, int], Any],
                 cdiv: Callable | None = None) -> tuple[list[Any], list[Any]]:
    """(grid, scalar arguments) of a compiled kernel: the spec's shape expressions over dim(tensor, axis), which
    gives TensorRT shape expressions (cdiv then is tensorrt.plugin.cdiv) or integers."""
    grid = [e.evaluate(dim, constexprs, cdiv) for e in ks.grid]
    return grid, [e.evaluate(dim, constexprs, cdiv) for _, e in ks.scalars]


# ---------------------------------------------------------------------------------------------------------------
# TensorRT 11: quickly deployable plugins with ahead-of-time kernels


def _register_one(trt: Any, trtp: Any, op: OpSpec, ks: KernelSpec) -> str:
    plugin_id = f"{DOMAIN}::{op.plugin_name(ks)}"
    if plugin_id in _REGISTERED:
        return plugin_id
    tensor_params = [inspect.Parameter(i.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc)
                     for i in op.inputs]
    attr_params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a.type)
                   for a in op.attributes]
    out_ann = Tuple[tuple(trtp.TensorDesc for _ in op.outputs)]  # type: ignore[misc]

    def describe(*args: Any, **kwargs: Any) -> tuple:
        a = describe.__signature__.bind(*args, **kwargs).arguments  # type: ignore[attr-defined]
        outs = []
        for o in op.outputs:
            src = a[o.alias or o.like]
            if o.alias:
                outs.append(src.aliased())
                continue
            desc = src.like()
            if o.dtype_attr:
                desc.dtype = trt_dtype(trt, a[o.dtype_attr])
            outs.append(desc)
        return tuple(outs)

    describe.__signature__ = inspect.Signature(tensor_params + attr_params, return_annotation=out_ann)  # type: ignore[attr-defined]
    describe.__name__ = f"{op.name}_{ks.name}_desc"
    trtp.register(plugin_id)(describe)

    def aot_impl(*args: Any) -> tuple:
        n_in, n_attr = len(op.inputs), len(op.attributes)
        descs = dict(zip([i.name for i in op.inputs], args[:n_in]))
        attrs = dict(zip([a.name for a in op.attributes], args[n_in:n_in + n_attr]))
        dtypes = {n: spec_dtype(trt, d.dtype) for n, d in descs.items()}

        def static_dim(t: str, axis: int) -> int | None:
            expr = descs[t].shape_expr[axis]
            return int(expr.constant_value()) if expr.is_constant else None

        comp = compile_plugin_kernel(op, ks, dtypes, attrs, static_dim, cc=None)  # cc None: the GPU building
        grid, scalars = launch_exprs(ks, comp.constexprs, lambda t, axis: descs[t].shape_expr[axis], trtp.cdiv)
        launch = trtp.KernelLaunchParams()
        for axis, g in zip(("grid_x", "grid_y", "grid_z"), grid):
            setattr(launch, axis, g)
        launch.block_x = comp.num_warps * 32
        launch.shared_mem = comp.shared_mem
        extra = trtp.SymIntExprs(len(scalars))
        for i, s in enumerate(scalars):
            extra[i] = trtp.SymInt32(s)
        return comp.name, comp.ptx, launch, extra

    aot_params = ([inspect.Parameter(i.name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for i in op.inputs]
                  + [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in op.attributes]
                  + [inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                     inspect.Parameter("tactic", inspect.Parameter.POSITIONAL_OR_KEYWORD)])
    aot_impl.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        aot_params, return_annotation=tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs])
    aot_impl.__name__ = f"{op.name}_{ks.name}_aot_impl"
    trtp.aot_impl(plugin_id)(aot_impl)
    _REGISTERED.add(plugin_id)
    return plugin_id


def register_plugins() -> list[str]:
    """Register every op's TensorRT 11 plugins (idempotent); returns their ids, as plugin_ids()."""
    trt, trtp = import_tensorrt_plugin()
    return [_register_one(trt, trtp, op, ks) for op, ks in plugin_kernels().values()]


def add_plugin(network: Any, plugin: str, inputs: list[Any], **attrs: Any) -> Any:
    """Add plugin `plugin` (e.g. "ssd") to a TensorRT 11 network with its AOT kernel; returns the layer.
    Attributes not given take the spec's defaults (TensorRT's plugin call wants every one, in order)."""
    _, trtp = import_tensorrt_plugin()
    register_plugins()
    if plugin not in plugin_kernels():
        raise TrtFalconError(f"no trtfalcon plugin {plugin!r}; expected one of {', '.join(plugin_kernels())}")
    op, _ = plugin_kernels()[plugin]
    values = {**op.attr_defaults(), **attrs}
    op_fn = getattr(getattr(trtp.op, DOMAIN), plugin)
    return network.add_plugin(op_fn(*inputs, **{a.name: values[a.name] for a in op.attributes}), aot=True)


__all__ = ["add_plugin", "compile_plugin_kernel", "launch_exprs", "plugin_ids", "plugin_kernels", "register_plugins",
           "spec_dtype", "trt_dtype"]
