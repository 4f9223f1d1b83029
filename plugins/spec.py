"""The framework of the op declarations: one `OpSpec` per custom op, and every backend's view derived from it.

Each op's declaration lives beside its kernel and its torch reference (conv1d.py, ssd.py, attention.py,
gated_norm.py: shapes, tiles, chunk caps and warps next to the code they tune); plugins/ops.py is the registry
(`OPS`). This module knows no op: the op modules import it, the registry imports them.

An `OpSpec` says, once: the op type and domain (ONNX / TensorRT plugin namespace "trtfalcon"), its input and
output tensors (names, symbolic shapes, dtypes), its attributes (typed, with defaults), which outputs alias
which inputs (the in-place cache and state updates), the torch reference, and its Triton kernels with their
launch grid, scalar arguments and compile-time constants as shape expressions. From it come:

- the torch executor's call (`launch`, used by `get_ops("triton")`), which binds the reference's arguments
  (`OpSpec.bind`: derived from the reference's signature and the attributes' declarations, no per-op code);
- the TensorRT quickly-deployable plugin with its ahead-of-time kernel (plugins/tensorrt.py);
- the ahead-of-time build for each GPU architecture (plugins/aot.py);
- the ONNX node and the onnxruntime custom op (op_type, domain, attributes, input/output names and dtypes;
  `OpSpec.ref_arguments` turns a node's inputs and attributes back into the reference's arguments).

Kernel ABI, fixed by TensorRT's AOT plugins (tensorrt_bindings/plugin/_lib.py, `aot_impl`): the kernel takes
the input tensors in the spec's order, then the scalar arguments, then the output tensors. An aliased output is
its own pointer argument (TensorRT passes the output buffer, which is the input's). Grid and scalars may only be
expressions of the input SHAPES (TensorRT evaluates them per call); per-sequence layout (cu_seqlens,
context_lens, state_slots, block_tables) is read by the kernels from device tensors. Compile-time constants
come from attributes, dtypes and dimensions that are constant for a given model (head counts, sizes).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from trtfalcon.dtypes import lookup
from trtfalcon.errors import TrtFalconError
from trtfalcon.plugins.triton_lang import require_triton, triton

DOMAIN = "trtfalcon"
OP_VERSION = 1

# The dtypes a plugin tensor may have, by long name (their other spellings: trtfalcon/dtypes.py)
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int32", "float8_e4m3fn")  # float8: FP8 KV cache only (sm_89+)
FLOATS = ("float32", "bfloat16", "float16")


def pow2(n: int) -> int:
    """The next power of two >= n (Triton's block sizes)."""
    return triton.next_power_of_2(int(n))


def dtype_name(dt: torch.dtype) -> str:
    return lookup(dt, "torch", among=TENSOR_DTYPES, what="plugin ops: dtype", error=TrtFalconError).long


# ---------------------------------------------------------------------------------------------------------------
# Shape expressions: one tree, evaluated to ints (torch), to TensorRT symbolic expressions, or printed (JSON).
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expr:
    kind: str  # "dim" | "const" | "constexpr" | "add" | "mul" | "floordiv" | "cdiv"
    args: tuple

    def __add__(self, o: Expr | int) -> Expr:
        return Expr("add", (self, _e(o)))

    def __mul__(self, o: Expr | int) -> Expr:
        return Expr("mul", (self, _e(o)))

    def __floordiv__(self, o: Expr | int) -> Expr:
        return Expr("floordiv", (self, _e(o)))

    def evaluate(self, dim: Callable[[str, int], Any], constexprs: dict[str, Any], cdiv: Callable | None = None) -> Any:
        """dim(tensor, axis) gives an int or a symbolic expression; cdiv overrides ceil-division for symbols."""
        k, a = self.kind, self.args
        if k == "dim":
            return dim(*a)
        if k == "const":
            return a[0]
        if k == "constexpr":
            return constexprs[a[0]]
        lhs, rhs = (x.evaluate(dim, constexprs, cdiv) for x in a)
        if k == "add":
            return lhs + rhs
        if k == "mul":
            return lhs * rhs
        if k == "floordiv":
            return lhs // rhs
        if isinstance(lhs, int) and isinstance(rhs, int):
            return -(-lhs // rhs)
        return cdiv(lhs, rhs) if cdiv is not None else -(-lhs // rhs)

    def __str__(self) -> str:
        k, a = self.kind, self.args
        if k == "dim":
            return f"{a[0]}.shape[{a[1]}]"
        if k in ("const", "constexpr"):
            return str(a[0])
        if k == "cdiv":
            return f"cdiv({a[0]}, {a[1]})"
        return f"({a[0]} {dict(add='+', mul='*', floordiv='//')[k]} {a[1]})"


def _e(v: Expr | int) -> Expr:
    return v if isinstance(v, Expr) else Expr("const", (int(v),))


def dim(tensor: str, axis: int) -> Expr:
    return Expr("dim", (tensor, axis))


def cexpr(name: str) -> Expr:
    """A compile-time constant of the kernel (known when the kernel is compiled, so a constant in the grid)."""
    return Expr("constexpr", (name,))


def cdiv(a: Expr | int, b: Expr | int) -> Expr:
    return Expr("cdiv", (_e(a), _e(b)))


# ---------------------------------------------------------------------------------------------------------------
# The declaration
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorArg:
    name: str
    shape: tuple[str, ...]  # symbolic, as in the contract
    dtypes: tuple[str, ...]
    optional: bool = False  # absent in the reference call (None); graph formats pass `fill` instead
    fill: float | None = None  # the value that makes a present tensor equivalent to an absent one


def int32_input(name: str, shape: tuple[str, ...]) -> TensorArg:
    return TensorArg(name, shape, ("int32",))


@dataclass(frozen=True)
class OutputArg:
    name: str
    like: str  # the input whose shape (and, unless dtype_attr, dtype) it has
    alias: str | None = None  # the input whose memory it IS (in-place update)
    dtype_attr: str | None = None  # attribute holding its dtype name, when it differs from `like`


@dataclass(frozen=True)
class Attr:
    """An attribute of the op (ONNX node attribute, TensorRT plugin field, kernel compile-time input) and how the
    reference's arguments carry it. By default it is the reference parameter of the same name, cast to `type`."""

    name: str
    type: type  # int | float | bool | str: what ONNX attributes and TensorRT plugin fields can carry
    default: Any
    doc: str = ""
    param: str | None = None  # the reference parameter it comes from, when not `name`
    index: int | None = None  # the element of that (tuple) parameter: dt_limit[1] is dt_max
    encode: Callable[[Any], Any] | None = None  # reference value -> attribute value (default: `type`)
    decode: Callable[[Any], Any] | None = None  # attribute value -> reference value (default: unchanged)
    presence_of: str | None = None  # True when this optional input is given; False: the reference gets None

    @property
    def source(self) -> str:
        """The reference parameter this attribute is read from."""
        return self.presence_of or self.param or self.name

    def from_reference(self, value: Any) -> Any:
        if self.presence_of:
            return value is not None
        if self.index is not None:
            value = value[self.index]
        return self.encode(value) if self.encode is not None else self.type(value)

    def to_reference(self, value: Any) -> Any:
        return self.decode(value) if self.decode is not None else value


class KernelContext:
    """What a kernel's compile-time constants may depend on: attributes, dtypes, presence, static dimensions, and
    the compute capability it is compiled for (89 for sm_89; None where unknown, as in the interpreter: the
    default tiles), since how many registers a tile needs depends on the GPU's tensor-core instructions."""

    def __init__(self, attrs: dict[str, Any], dtypes: dict[str, str], present: dict[str, bool],
                 static_dim: Callable[[str, int], int], cc: int | None = None):
        self.attrs, self.dtypes, self.present, self._static_dim = attrs, dtypes, present, static_dim
        self.cc = cc

    def dim(self, tensor: str, axis: int) -> int:
        return self._static_dim(tensor, axis)


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: Any  # triton.JITFunction
    grid: tuple[Expr, ...]
    constexprs: Callable[[KernelContext], dict[str, Any]]
    scalars: tuple[tuple[str, Expr], ...] = ()  # (kernel parameter, shape expression), after the inputs
    num_warps: Callable[[dict[str, Any]], int] = lambda c: 4
    num_stages: int = 2
    doc: str = ""


@dataclass(frozen=True)
class OpSpec:
    name: str
    doc: str
    inputs: tuple[TensorArg, ...]
    outputs: tuple[OutputArg, ...]
    attributes: tuple[Attr, ...]
    ref: Callable
    kernels: tuple[KernelSpec, ...]
    # Picks a kernel from the input shapes (torch executor); TensorRT gets one plugin per kernel instead.
    select: Callable[[dict[str, tuple[int, ...]]], str] = lambda shapes: ""
    # Checks the reference's arguments (by name) before a launch: what the reference itself checks on entry.
    check: Callable[[dict[str, Any]], None] | None = None
    domain: str = DOMAIN
    version: int = OP_VERSION

    def __post_init__(self) -> None:
        params = list(inspect.signature(self.ref).parameters)
        inputs = [i.name for i in self.inputs]
        carried = inputs + [a.source for a in self.attributes]
        missing = [p for p in params if p not in carried]
        unknown = [n for n in carried if n not in params]
        if missing or unknown:
            raise TypeError(f"op {self.name!r}: {self.ref.__name__} parameters {missing} are neither inputs nor "
                            f"attributes; inputs/attributes {unknown} are not its parameters")

    def bind(self, *args: Any, **kwargs: Any) -> tuple[dict[str, torch.Tensor | None], dict[str, Any]]:
        """The reference's arguments -> (tensors by input name, attributes by name)."""
        bound = inspect.signature(self.ref).bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if self.check is not None:
            self.check(a)
        return ({i.name: a[i.name] for i in self.inputs},
                {at.name: at.from_reference(a[at.source]) for at in self.attributes})

    def ref_arguments(self, tensors: dict[str, torch.Tensor], attrs: dict[str, Any]) -> dict[str, Any]:
        """The inverse of `bind`: a graph node's inputs and attributes -> the reference's keyword arguments.

        An attribute carrying an input's presence (gated_rms_norm's has_norm) makes that input None when False;
        the elements of a tuple parameter (dt_limit) are gathered from their attributes in index order."""
        missing = [i.name for i in self.inputs if i.name not in tensors]
        if missing:
            raise TrtFalconError(f"{self.name}: inputs {missing} are missing; expected {[i.name for i in self.inputs]}")
        kwargs: dict[str, Any] = dict(tensors)
        elements: dict[str, dict[int, Any]] = {}
        for at in self.attributes:
            value = attrs[at.name]
            if at.presence_of:
                if not value:
                    kwargs[at.presence_of] = None
            elif at.index is not None:
                elements.setdefault(at.source, {})[at.index] = at.to_reference(value)
            else:
                kwargs[at.source] = at.to_reference(value)
        for param, parts in elements.items():
            kwargs[param] = tuple(parts[i] for i in sorted(parts))
        return {p: kwargs[p] for p in inspect.signature(self.ref).parameters}

    def kernel(self, name: str = "") -> KernelSpec:
        if not name:
            return self.kernels[0]
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(f"op {self.name!r} has no kernel {name!r}; it has {[k.name for k in self.kernels]}")

    def plugin_name(self, kernel: KernelSpec) -> str:
        """TensorRT plugin / ONNX op type for one kernel: the first kernel is the general one and takes the op's
        name; others (valid for every input too, faster for some shapes) get a suffix, so an exporter or an
        engine built for a decode-only profile can pick them."""
        return self.name if kernel is self.kernels[0] else f"{self.name}_{kernel.name}"

    def attr_defaults(self) -> dict[str, Any]:
        return {a.name: a.default for a in self.attributes}

    def output_dtype(self, out: OutputArg, dtypes: dict[str, str], attrs: dict[str, Any]) -> str:
        return attrs[out.dtype_attr] if out.dtype_attr else dtypes[out.like]

    def kernel_param_names(self, kernel: KernelSpec) -> list[str]:
        """Pointer and scalar parameters in ABI order: inputs, scalars, outputs (each pointer named NAME_ptr)."""
        return ([f"{i.name}_ptr" for i in self.inputs] + [s for s, _ in kernel.scalars]
                + [f"{o.name}_ptr" for o in self.outputs])

    def onnx_schema(self) -> dict[str, Any]:
        """What the ONNX node and an onnxruntime custom op need, as plain data."""
        return {
            "op_type": self.name, "domain": self.domain, "version": self.version,
            "inputs": [{"name": i.name, "shape": list(i.shape), "dtypes": list(i.dtypes), "optional": i.optional,
                        "fill": i.fill} for i in self.inputs],
            "outputs": [{"name": o.name, "like": o.like, "alias": o.alias, "dtype_attr": o.dtype_attr}
                        for o in self.outputs],
            "attributes": [{"name": a.name, "type": a.type.__name__, "default": a.default, "doc": a.doc}
                           for a in self.attributes],
            "kernels": {self.plugin_name(k): k.name for k in self.kernels},
        }


# ---------------------------------------------------------------------------------------------------------------
# What op declarations may ask of the target GPU
# ---------------------------------------------------------------------------------------------------------------
def mma_sync_only(cc: int | None) -> bool:
    """GPUs whose tensor cores take both dot operands and the accumulator from registers (mma.sync: sm_80/86/89,
    and sm_120/121, the RTX Blackwell parts), not Hopper's wgmma or datacenter Blackwell's tcgen05 (sm_90, sm_100)."""
    return cc is not None and (cc < 90 or cc >= 120)


# ---------------------------------------------------------------------------------------------------------------
# The torch executor's call
# ---------------------------------------------------------------------------------------------------------------
def _check(op: OpSpec, tensors: dict[str, torch.Tensor | None]) -> dict[str, str]:
    dtypes: dict[str, str] = {}
    for arg in op.inputs:
        t = tensors[arg.name]
        if t is None:
            if not arg.optional:
                raise TrtFalconError(f"{op.name}: input {arg.name!r} is required, found None")
            continue
        if t.dim() != len(arg.shape):
            raise TrtFalconError(f"{op.name}: input {arg.name!r} expected rank {len(arg.shape)} {arg.shape}, "
                                 f"found shape {tuple(t.shape)}")
        name = dtype_name(t.dtype)
        if name not in arg.dtypes:
            raise TrtFalconError(f"{op.name}: input {arg.name!r} expected dtype in {arg.dtypes}, found {name}")
        if not t.is_contiguous():
            raise TrtFalconError(f"{op.name}: input {arg.name!r} must be contiguous (the kernels index dense layouts)")
        dtypes[arg.name] = name
    return dtypes


def launch(op: OpSpec, *args: Any, kernel: str | None = None, cc: int | None = None, **kwargs: Any) -> torch.Tensor:
    """Run `op`'s Triton kernel with the reference's arguments; in-place outputs update their inputs.

    On CPU tensors this needs TRITON_INTERPRET=1 (Triton's interpreter); on CUDA tensors it is the GPU path.
    cc: the compute capability whose tiles to use (KernelContext.cc); default the CUDA tensors' GPU's, None on the
    CPU (the interpreter runs any GPU's tiles: the tests pass cc to check a GPU's tiles there).
    Returns what the reference returns (its one non-aliased output).
    """
    require_triton()
    tensors, attrs = op.bind(*args, **kwargs)
    attrs = {**op.attr_defaults(), **attrs}
    dtypes = _check(op, tensors)
    shapes = {n: tuple(t.shape) for n, t in tensors.items() if t is not None}
    ks = op.kernel(kernel if kernel is not None else op.select(shapes))
    present = {i.name: tensors[i.name] is not None for i in op.inputs}
    first = next(t for t in tensors.values() if t is not None)
    if cc is None and first.is_cuda:
        major, minor = torch.cuda.get_device_capability(first.device)
        cc = major * 10 + minor
    ctx = KernelContext(attrs, dtypes, present, lambda t, a: shapes[t][a], cc)
    constexprs = ks.constexprs(ctx)

    def dim_of(t: str, a: int) -> int:
        return shapes[t][a]

    outputs: dict[str, torch.Tensor] = {}
    for o in op.outputs:
        if o.alias:
            outputs[o.name] = tensors[o.alias]
        else:
            dt = lookup(op.output_dtype(o, dtypes, attrs), "long", among=TENSOR_DTYPES,
                        what=f"{op.name}: output {o.name!r} dtype", error=TrtFalconError).torch
            outputs[o.name] = torch.empty(shapes[o.like], dtype=dt, device=tensors[o.like].device)
    grid = tuple(int(e.evaluate(dim_of, constexprs)) for e in ks.grid)
    kargs = [tensors[i.name] if tensors[i.name] is not None else first for i in op.inputs]
    kargs += [int(e.evaluate(dim_of, constexprs)) for _, e in ks.scalars]
    kargs += [outputs[o.name] for o in op.outputs]
    if all(g > 0 for g in grid):
        ks.fn[grid](*kargs, **{k: v for k, v in constexprs.items() if k in ks.fn.arg_names},
                    num_warps=ks.num_warps(constexprs), num_stages=ks.num_stages)
    results = [outputs[o.name] for o in op.outputs if not o.alias]
    return results[0] if len(results) == 1 else tuple(results)


def torch_call(op: OpSpec) -> Callable[..., torch.Tensor]:
    """A function with exactly the reference's signature that runs the Triton kernel."""

    def call(*args: Any, **kwargs: Any) -> torch.Tensor:
        return launch(op, *args, **kwargs)

    call.__name__ = f"{op.name}_triton"
    call.__doc__ = f"Triton kernel(s) of {op.name!r} with the arguments of {op.ref.__name__}."
    call.__signature__ = inspect.signature(op.ref)  # type: ignore[attr-defined]
    return call


__all__ = ["DOMAIN", "FLOATS", "OP_VERSION", "TENSOR_DTYPES", "Attr", "Expr", "KernelContext", "KernelSpec",
           "OpSpec", "OutputArg", "TensorArg", "cdiv", "cexpr", "dim", "dtype_name", "int32_input", "launch",
           "mma_sync_only", "pow2", "torch_call"]
