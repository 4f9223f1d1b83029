"""TensorRT for RTX plugins: IPluginV3 classes generated from plugins/spec.py, one creator per op kernel.

TensorRT for RTX has no quickly deployable plugins (no `tensorrt.plugin`, no `add_plugin*`): a custom op enters
through its ONNX parser, which looks a creator up by the node's op type, its `plugin_version` attribute (default
"1") and its `plugin_namespace` ("trtfalcon"), and passes the node attributes that the creator's field names list,
converted to their types. `register_rtx_plugins()` registers, for every op kernel, a creator whose plugins

- at build time describe their outputs from the spec (the shape of `like`, the dtype of `like` or of the
  `dtype_attr` attribute), alias each pool output to its input (IPluginV3OneBuildV2.get_aliased_input: the in-place
  KV / conv / SSM updates; the builder needs PreviewFeature.ALIASED_PLUGIN_IO_10_03), accept the spec's dtypes in
  linear layout, and in configure_plugin compile the kernel for the target compute capability with the same call
  TensorRT 11's aot_impl makes (plugins/tensorrt.py compile_plugin_kernel); the PTX, kernel name and launch
  constants are serialized into the engine with the attributes;
- at run time are rebuilt from those fields and, in enqueue, launch the PTX on TensorRT's stream with the CUDA
  driver (plugins/cuda_driver.py), grid and scalar arguments evaluated from the actual input shapes
  (plugins/tensorrt.py launch_exprs, the expressions TensorRT 11 evaluates for aot_impl).

An engine built with them runs the same Triton kernels as the other backends, without Triton or torch, but needs
Python at run time: these classes must be registered before the engine is deserialized (runtime/executors/tensorrt.py
does). What has run here, on a machine with no GPU: the parse and the build (kernel compile + serialization) for
sm_80/86/89/120. What has not: deserialization, enqueue and the launch (TensorRT for RTX cannot deserialize an
engine without a driver).

`build_observations()` is what the builder told the plugins while building: per plugin layer its op, input dtypes,
and the min/opt/max of every input dimension in the optimization profile; the way to read an engine's profile back
without a GPU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import traceback
from typing import Any

import numpy as np

from trtfalcon.errors import TrtFalconError
from trtfalcon.plugins.spec import DOMAIN, OutputArg, KernelSpec, OpSpec
from trtfalcon.plugins.tensorrt import compile_plugin_kernel, launch_exprs, plugin_kernels, spec_dtype, trt_dtype

# Serialized beside the attributes (not in the creator's field names, so the ONNX parser never passes them).
KERNEL_FIELD = "trtfalcon_kernel"  # JSON: kernel name, warps, shared memory, signature, constexprs, target
PTX_FIELD = "trtfalcon_ptx"

_KERNELS: dict[str, dict[str, Any]] = {}  # kernel key -> compiled kernel record (one per distinct configuration)
_OBSERVED: dict[str, dict[str, Any]] = {}  # plugin layer -> what configure_plugin was told
_ERRORS: list[str] = []  # exceptions raised inside TensorRT's callbacks (TensorRT logs only its own summary)
_LIVE: list[Any] = []  # plugin objects, creators and PluginField arrays: TensorRT holds raw pointers to them
_CREATORS: dict[str, Any] = {}
_TARGET: dict[str, int | None] = {"cc": None}


class PluginBuildError(TrtFalconError):
    """A plugin callback failed inside TensorRT for RTX's builder (kernel compile, unsupported dtype, ...)."""


def register_rtx_plugins(trt: Any, cc: int | None = None) -> list[str]:
    """Register every op kernel's creator with TensorRT for RTX (idempotent); kernels compile for compute
    capability `cc` (89 for sm_89) at build time; None at run time. Returns the plugin ids."""
    _TARGET["cc"] = cc
    registry = trt.get_plugin_registry()
    for name, (op, ks) in plugin_kernels().items():
        if name in _CREATORS:
            continue
        creator = plugin_classes(trt)[1](op, ks, name)
        if not registry.register_creator(creator, DOMAIN):
            raise PluginBuildError(f"TensorRT for RTX refused to register the plugin creator {DOMAIN}::{name} "
                                   "(another creator with that name, version 1 and namespace is registered)")
        _CREATORS[name] = creator
        _LIVE.append(creator)
    return [f"{DOMAIN}::{name}" for name in _CREATORS]


def creators() -> dict[str, Any]:
    """Plugin name -> its registered creator (what TensorRT calls to make a plugin, at build and at load)."""
    return dict(_CREATORS)


def start_build() -> None:
    """Forget the previous build's observations and errors (call before parsing)."""
    _OBSERVED.clear()
    _ERRORS.clear()


def build_observations() -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in _OBSERVED.items()}


def build_errors() -> list[str]:
    return list(_ERRORS)


# ---------------------------------------------------------------------------------------------------------------
# Plugin fields: what the parser passes (attributes) and what the engine stores (attributes + kernel)


def _field(trt: Any, keep: list, name: str, value: Any, typ: type) -> Any:
    # A PluginField keeps a raw pointer to its array: `keep` must outlive it.
    if typ is str:
        data = np.frombuffer(str(value).encode() + b"\0", dtype=np.int8).copy()
        kind = trt.PluginFieldType.CHAR
    elif typ is float:
        data, kind = np.array([value], dtype=np.float32), trt.PluginFieldType.FLOAT32
    else:  # int, bool (ONNX stores bools as ints)
        data, kind = np.array([int(value)], dtype=np.int32), trt.PluginFieldType.INT32
    keep.append(data)
    return trt.PluginField(name, data, kind)


def _read_fields(trt: Any, fc: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fc:
        data = np.asarray(f.data)
        if f.type == trt.PluginFieldType.CHAR:
            out[f.name] = bytes(data.astype(np.int8).view(np.uint8)).split(b"\0")[0].decode()
        else:
            out[f.name] = data.reshape(-1)[0].item()
    return out


def _attrs_from_fields(op: OpSpec, got: dict[str, Any]) -> dict[str, Any]:
    attrs = op.attr_defaults()
    for a in op.attributes:
        if a.name in got:
            attrs[a.name] = a.type(got[a.name]) if a.type is not bool else bool(int(got[a.name]))
    return attrs


# ---------------------------------------------------------------------------------------------------------------
# The classes (made once per TensorRT module: their bases come from it)

_CLASS_CACHE: dict[int, tuple[type, type]] = {}


def plugin_classes(trt: Any) -> tuple[type, type]:
    """(plugin class, creator class) over that TensorRT module's IPluginV3 interfaces."""
    if id(trt) not in _CLASS_CACHE:
        _CLASS_CACHE[id(trt)] = _make_classes(trt)
    return _CLASS_CACHE[id(trt)]


def _reported(fn):
    """TensorRT turns a Python exception in a callback into one log line; keep the whole error for the build."""
    @functools.wraps(fn)
    def wrapper(self, *args):
        try:
            return fn(self, *args)
        except BaseException as e:
            where = getattr(self, "layer", None) or getattr(self, "name", "?")
            _ERRORS.append(f"{where} ({getattr(self, 'plugin_name', '')}).{fn.__name__}: "
                           f"{type(e).__name__}: {e}")
            if not isinstance(e, TrtFalconError):
                traceback.print_exc(file=sys.stderr)
            raise
    return wrapper


def _make_classes(trt: Any) -> tuple[type, type]:
    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuildV2, trt.IPluginV3OneRuntime):
        def __init__(self, op: OpSpec, ks: KernelSpec, name: str, layer: str, attrs: dict[str, Any],
                     kernel_key: str | None = None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuildV2.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.op, self.ks, self.layer, self.attrs, self.kernel_key = op, ks, layer, attrs, kernel_key
            self.plugin_name, self.plugin_namespace, self.plugin_version = name, op.domain, str(op.version)
            self.num_outputs = len(op.outputs)
            self._index = {a.name: i for i, a in enumerate(op.inputs)}

        def _out_dtype(self, o: OutputArg, like_type: Any) -> Any:
            return trt_dtype(trt, self.attrs[o.dtype_attr]) if o.dtype_attr else like_type

        def get_capability_interface(self, type):
            return self

        def clone(self):
            c = Plugin(self.op, self.ks, self.plugin_name, self.layer, dict(self.attrs), self.kernel_key)
            _LIVE.append(c)
            return c

        @_reported
        def get_output_data_types(self, input_types):
            return [self._out_dtype(o, input_types[self._index[o.like]]) for o in self.op.outputs]

        @_reported
        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[self._index[o.like]]) for o in self.op.outputs]

        def get_aliased_input(self, output_index):
            o = self.op.outputs[output_index]
            return self._index[o.alias] if o.alias else -1

        @_reported
        def supports_format_combination(self, pos, in_out, num_inputs):
            d = in_out[pos].desc
            if d.format != trt.TensorFormat.LINEAR:
                return False
            if pos < num_inputs:
                return d.type in [trt_dtype(trt, n) for n in self.op.inputs[pos].dtypes]
            o = self.op.outputs[pos - num_inputs]
            return d.type == self._out_dtype(o, in_out[self._index[o.like]].desc.type)

        @_reported
        def configure_plugin(self, inp, out):
            """Compile the kernel for these dtypes and constant dimensions (once per distinct configuration) and
            record what the builder says of the inputs' ranges."""
            names = [a.name for a in self.op.inputs]
            dtypes = {n: spec_dtype(trt, inp[i].desc.type) for i, n in enumerate(names)}
            dims = {n: [int(d) for d in inp[i].desc.dims] for i, n in enumerate(names)}
            cc = _TARGET["cc"]
            if cc is None:
                raise PluginBuildError(f"{self.plugin_name}: no target compute capability (register_rtx_plugins(trt, "
                                       "cc) before building)")
            key = hashlib.sha256(json.dumps([self.plugin_name, dtypes, self.attrs, dims, cc], sort_keys=True,
                                            default=str).encode()).hexdigest()[:20]
            if key not in _KERNELS:
                comp = compile_plugin_kernel(self.op, self.ks, dtypes, self.attrs,
                                             lambda t, a: dims[t][a] if dims[t][a] >= 0 else None, cc)
                _KERNELS[key] = {"name": comp.name, "ptx": comp.ptx, "num_warps": comp.num_warps,
                                 "shared_mem": comp.shared_mem, "signature": comp.signature,
                                 "constexprs": comp.constexprs, "arch": comp.arch, "plugin": self.plugin_name}
            self.kernel_key = key
            _OBSERVED[self.layer] = {
                "plugin": self.plugin_name, "kernel": _KERNELS[key]["name"], "arch": _KERNELS[key]["arch"],
                "dtypes": dtypes,
                "inputs": {n: {"min": list(inp[i].min), "opt": list(inp[i].opt), "max": list(inp[i].max)}
                           for i, n in enumerate(names)},
                "aliases": {o.name: o.alias for o in self.op.outputs if o.alias},
            }

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inp, out):
            pass

        def attach_to_context(self, context):
            return self.clone()

        @_reported
        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from trtfalcon.plugins.cuda_driver import driver

            k = _KERNELS[self.kernel_key]
            dims = {a.name: [int(d) for d in input_desc[i].dims] for i, a in enumerate(self.op.inputs)}
            grid, scalars = launch_exprs(self.ks, k["constexprs"], lambda t, a: dims[t][a])
            cuda = driver()
            fn = cuda.function(self.kernel_key, k["name"], k["ptx"], k["shared_mem"])
            cuda.launch(fn, k["name"], [int(g) for g in grid], k["num_warps"] * 32, k["shared_mem"], int(stream),
                        k["signature"], [int(p) for p in inputs] + [int(s) for s in scalars] + [int(p) for p in outputs])

        @_reported
        def get_fields_to_serialize(self):
            if self.kernel_key is None:
                raise PluginBuildError(f"{self.layer}: {self.plugin_name} was never configured, so it has no kernel")
            k = _KERNELS[self.kernel_key]
            if self.layer in _OBSERVED:
                _OBSERVED[self.layer]["serialized"] = True  # the layer and its kernel are in the engine
            meta = {key: k[key] for key in ("name", "num_warps", "shared_mem", "signature", "constexprs", "arch")}
            meta["key"] = self.kernel_key
            keep: list = []
            fields = [_field(trt, keep, a.name, self.attrs[a.name], a.type) for a in self.op.attributes]
            fields.append(_field(trt, keep, KERNEL_FIELD, json.dumps(meta, default=str), str))
            fields.append(_field(trt, keep, PTX_FIELD, k["ptx"], str))
            _LIVE.append(keep)
            return trt.PluginFieldCollection(fields)

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self, op: OpSpec, ks: KernelSpec, name: str):
            trt.IPluginCreatorV3One.__init__(self)
            self.op, self.ks = op, ks
            self.name, self.plugin_namespace, self.plugin_version = name, op.domain, str(op.version)
            keep: list = []
            self.field_names = trt.PluginFieldCollection(
                [_field(trt, keep, a.name, a.default, a.type) for a in op.attributes])
            self._keep = keep

        @_reported
        def create_plugin(self, name, fc, phase):
            got = _read_fields(trt, fc)
            key = None
            if KERNEL_FIELD in got:  # from an engine: the kernel travels with it
                meta = json.loads(got[KERNEL_FIELD])
                key = meta.pop("key")
                _KERNELS.setdefault(key, {**meta, "ptx": got.get(PTX_FIELD, ""), "plugin": self.name})
            p = Plugin(self.op, self.ks, self.name, name, _attrs_from_fields(self.op, got), key)
            _LIVE.append(p)
            return p

    return Plugin, Creator


__all__ = ["KERNEL_FIELD", "PTX_FIELD", "PluginBuildError", "build_errors", "build_observations", "creators",
           "plugin_classes", "register_rtx_plugins", "start_build"]
