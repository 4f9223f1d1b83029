"""One declaration per custom op; every backend derives its view of the op from it.

An `OpSpec` says, once: the op type and domain (ONNX / TensorRT plugin namespace "trtfalcon"), its input and
output tensors (names, symbolic shapes, dtypes), its attributes (typed, with defaults), which outputs alias
which inputs (the in-place cache and state updates), the torch reference, and its Triton kernels with their
launch grid, scalar arguments and compile-time constants as shape expressions. From it come:

- the torch executor's call (`launch`, used by `get_ops("triton")`), which binds the reference's arguments;
- the TensorRT quickly-deployable plugin with its ahead-of-time kernel (plugins/tensorrt.py);
- the ahead-of-time build for each GPU architecture (plugins/aot.py);
- the ONNX node and the onnxruntime custom op (op_type, domain, attributes, input/output names and dtypes).

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
from trtfalcon.plugins import attention, conv1d, gated_norm, ssd
from trtfalcon.plugins._triton import require_triton, triton

DOMAIN = "trtfalcon"
OP_VERSION = 1

# The dtypes a plugin tensor may have, by long name (their other spellings: trtfalcon/dtypes.py)
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int32", "float8_e4m3fn")  # float8: FP8 KV cache only (sm_89+)
FLOATS = ("float32", "bfloat16", "float16")


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


@dataclass(frozen=True)
class OutputArg:
    name: str
    like: str  # the input whose shape (and, unless dtype_attr, dtype) it has
    alias: str | None = None  # the input whose memory it IS (in-place update)
    dtype_attr: str | None = None  # attribute holding its dtype name, when it differs from `like`


@dataclass(frozen=True)
class Attr:
    name: str
    type: type  # int | float | bool | str: what ONNX attributes and TensorRT plugin fields can carry
    default: Any
    doc: str = ""


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
    # Maps the reference's arguments to (tensors by input name, attributes by name).
    bind: Callable[..., tuple[dict[str, torch.Tensor | None], dict[str, Any]]]
    kernels: tuple[KernelSpec, ...]
    # Picks a kernel from the input shapes (torch executor); TensorRT gets one plugin per kernel instead.
    select: Callable[[dict[str, tuple[int, ...]]], str] = lambda shapes: ""
    domain: str = DOMAIN
    version: int = OP_VERSION

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
# The four ops
# ---------------------------------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))


def _i32(name: str, shape: tuple[str, ...]) -> TensorArg:
    return TensorArg(name, shape, ("int32",))


def _bind_conv(x, weight, bias, conv_state, cu_seqlens, context_lens, state_slots, activation=True):
    return (dict(x=x, weight=weight, bias=bias, conv_state=conv_state, cu_seqlens=cu_seqlens,
                 context_lens=context_lens, state_slots=state_slots), dict(activation=bool(activation)))


CAUSAL_CONV1D = OpSpec(
    name="causal_conv1d",
    doc=conv1d.__doc__ or "",
    inputs=(
        TensorArg("x", ("num_tokens", "conv_dim"), FLOATS),
        TensorArg("weight", ("conv_dim", "d_conv"), FLOATS),
        TensorArg("bias", ("conv_dim",), FLOATS, optional=True, fill=0.0),
        TensorArg("conv_state", ("num_slots", "conv_dim", "d_conv-1"), FLOATS),
        _i32("cu_seqlens", ("num_seqs+1",)), _i32("context_lens", ("num_seqs",)), _i32("state_slots", ("num_seqs",)),
    ),
    outputs=(OutputArg("out", like="x"), OutputArg("conv_state_out", like="conv_state", alias="conv_state")),
    attributes=(Attr("activation", bool, True, "apply SiLU after the bias"),),
    ref=conv1d.causal_conv1d_varlen_ref,
    bind=_bind_conv,
    kernels=(
        KernelSpec(
            name="varlen",
            fn=conv1d.causal_conv1d_kernel,
            grid=(dim("context_lens", 0), cdiv(dim("x", 1), cexpr("BLOCK_C"))),
            scalars=(("conv_dim", dim("x", 1)),),
            constexprs=lambda c: dict(
                K=c.dim("weight", 1), HAS_BIAS=c.present["bias"], SILU=c.attrs["activation"],
                BLOCK_T=8, BLOCK_C=64, BLOCK_S=max(2, _pow2(c.dim("weight", 1) - 1)),
            ),
            doc="prefill chunks and decode tokens alike: one program per sequence x 64 channels",
        ),
    ),
)


def _bind_ssd(x, dt, A, B, C, D, dt_bias, ssm_state, cu_seqlens, context_lens, state_slots, chunk_size,
              dt_limit=(0.0, float("inf"))):
    lo, hi = dt_limit
    return (dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, ssm_state=ssm_state, cu_seqlens=cu_seqlens,
                 context_lens=context_lens, state_slots=state_slots),
            dict(chunk_size=int(chunk_size), dt_min=float(lo), dt_max=float(hi)))


def ssd_kernel_chunk(chunk_size: int, d_state: int) -> int:
    """The chunked kernel's chunk length: the model's chunk_size capped where the per-program tiles
    (chunk x d_state for B and C, plus the state) would spill registers; at least 16 (tl.dot's minimum).
    The scan's result does not depend on it (the chunked form equals the recurrence for any chunk length)."""
    cap = 64 if d_state <= 64 else 16  # for d_state 256: no register spill on sm_90 in fp32 and bf16
    return max(16, min(cap, _pow2(chunk_size)))


def _ssd_common(c: KernelContext) -> dict[str, Any]:
    H, P, N = c.dim("x", 1), c.dim("x", 2), c.dim("B", 2)
    dt_max = c.attrs["dt_max"]
    return dict(
        H=H, P=P, G=c.dim("B", 1), N=N, HAS_D=c.present["D"], DT_MIN=float(c.attrs["dt_min"]),
        DT_MAX=float(dt_max) if dt_max != float("inf") else 0.0, BLOCK_N=_pow2(N),
    )


_SSD_GRID = (dim("context_lens", 0), dim("x", 1), cdiv(dim("x", 2), cexpr("BLOCK_P")))

SSD = OpSpec(
    name="ssd",
    doc=ssd.__doc__ or "",
    inputs=(
        TensorArg("x", ("num_tokens", "H", "P"), FLOATS),
        TensorArg("dt", ("num_tokens", "H"), FLOATS),
        TensorArg("A", ("H",), ("float32",)),
        TensorArg("B", ("num_tokens", "G", "N"), FLOATS),
        TensorArg("C", ("num_tokens", "G", "N"), FLOATS),
        TensorArg("D", ("H",), ("float32",), optional=True, fill=0.0),
        TensorArg("dt_bias", ("H",), ("float32",)),
        TensorArg("ssm_state", ("num_slots", "H", "P", "N"), ("float32", "bfloat16")),
        _i32("cu_seqlens", ("num_seqs+1",)), _i32("context_lens", ("num_seqs",)), _i32("state_slots", ("num_seqs",)),
    ),
    outputs=(OutputArg("y", like="x"), OutputArg("ssm_state_out", like="ssm_state", alias="ssm_state")),
    attributes=(
        Attr("chunk_size", int, 256, "the model's chunk length; the kernel's chunk is ssd_kernel_chunk() of it"),
        Attr("dt_min", float, 0.0, "time_step_limit[0]"),
        Attr("dt_max", float, float("inf"), "time_step_limit[1]; inf = no upper clamp"),
    ),
    ref=ssd.ssd_varlen_ref,
    bind=_bind_ssd,
    kernels=(
        KernelSpec(
            name="chunked",
            fn=ssd.ssd_chunked_kernel,
            grid=_SSD_GRID,
            constexprs=lambda c: dict(
                _ssd_common(c), BLOCK_T=ssd_kernel_chunk(c.attrs["chunk_size"], c.dim("B", 2)),
                BLOCK_P=min(16 if c.dim("B", 2) > 64 else 32, _pow2(c.dim("x", 2))),
            ),
            num_warps=lambda k: 8 if k["BLOCK_N"] >= 128 else 4,
            num_stages=1,  # software pipelining would double the live B/C/x tiles and spill
            doc="any batch (prefill chunks, decode tokens, mixed)",
        ),
        KernelSpec(
            name="recurrent",
            fn=ssd.ssd_recurrent_kernel,
            grid=_SSD_GRID,
            constexprs=lambda c: dict(_ssd_common(c), BLOCK_P=min(16, _pow2(c.dim("x", 2)))),
            num_warps=lambda k: 4,
            doc="any batch, token by token; chosen when num_tokens == num_seqs (decode)",
        ),
    ),
    # num_tokens == num_seqs: every sequence has one token in a decode step (the recurrent kernel is correct
    # for any batch, so an odd batch with the same counts is still computed right).
    select=lambda s: "recurrent" if s["x"][0] == s["context_lens"][0] else "chunked",
)


def _bind_norm(y, z, weight, n_groups, eps, norm_before_gate, out_dtype):
    return (dict(y=y, z=z, weight=weight),
            dict(n_groups=int(n_groups), eps=float(eps), norm_before_gate=bool(norm_before_gate),
                 has_norm=weight is not None, out_dtype=dtype_name(out_dtype)))


GATED_RMS_NORM = OpSpec(
    name="gated_rms_norm",
    doc=gated_norm.__doc__ or "",
    inputs=(
        TensorArg("y", ("num_tokens", "d_ssm"), FLOATS),
        TensorArg("z", ("num_tokens", "d_ssm"), FLOATS),
        TensorArg("weight", ("d_ssm",), FLOATS, optional=True, fill=1.0),
    ),
    outputs=(OutputArg("out", like="y", dtype_attr="out_dtype"),),
    attributes=(
        Attr("n_groups", int, 1), Attr("eps", float, 1e-5), Attr("norm_before_gate", bool, False),
        Attr("has_norm", bool, True, "False: y * silu(z) only (mamba_rms_norm false); weight is ignored"),
        Attr("out_dtype", str, "bfloat16"),
    ),
    ref=gated_norm.gated_rms_norm_ref,
    bind=_bind_norm,
    kernels=(
        KernelSpec(
            name="rows",
            fn=gated_norm.gated_rms_norm_kernel,
            grid=(dim("y", 0), cexpr("N_GROUPS")),
            scalars=(("d_ssm", dim("y", 1)),),
            constexprs=lambda c: dict(
                GROUP_SIZE=c.dim("y", 1) // c.attrs["n_groups"], EPS=float(c.attrs["eps"]),
                HAS_NORM=bool(c.attrs["has_norm"]), NORM_BEFORE_GATE=bool(c.attrs["norm_before_gate"]),
                BLOCK=_pow2(c.dim("y", 1) // c.attrs["n_groups"]), N_GROUPS=int(c.attrs["n_groups"]),
            ),
            num_warps=lambda k: 8 if k["BLOCK"] >= 2048 else 4,
        ),
    ),
)


def _bind_attn(q, k, v, kv_cache, block_tables, cu_seqlens, context_lens, scale=None, k_scale=None, v_scale=None):
    attention.check_kv_scales(k_scale, v_scale)
    return (dict(q=q, k=k, v=v, kv_cache=kv_cache, block_tables=block_tables, cu_seqlens=cu_seqlens,
                 context_lens=context_lens, k_scale=k_scale, v_scale=v_scale),
            dict(scale=float(scale) if scale is not None else 0.0))


def mma_sync_only(cc: int | None) -> bool:
    """GPUs whose tensor cores take both dot operands and the accumulator from registers (mma.sync: sm_80/86/89,
    and sm_120/121, the RTX Blackwell parts), not Hopper's wgmma or datacenter Blackwell's tcgen05 (sm_90, sm_100)."""
    return cc is not None and (cc < 90 or cc >= 120)


def _attn_constexprs(block_m: int, block_n: int, mma_sync_tile: tuple[int, int]
                     ) -> Callable[[KernelContext], dict[str, Any]]:
    def make(c: KernelContext) -> dict[str, Any]:
        hq, hkv, d = c.dim("q", 1), c.dim("k", 1), c.dim("q", 2)
        qg = hq // hkv
        scale = c.attrs["scale"] or d**-0.5
        # only an FP8 cache reads its scales: bf16/fp32 kernels stay the code they were (no loads, no division)
        fp8 = c.dtypes["kv_cache"] == "float8_e4m3fn"
        # fp32 operands take twice the registers: halve the key tile (and for heads wider than 128)
        bn = block_n // (2 if c.dtypes["q"] == "float32" else 1) // (2 if d > 128 else 1)
        rows = block_m
        if mma_sync_only(c.cc) and (fp8 or c.dtypes["q"] == "float32"):
            # fp8 -> bf16 conversions of K/V, or fp32 operands, beside register-held dot operands: at 7B heads the
            # default tile spills on sm_80/86/89/120 (ptxas -v, plugins/aot.py); mma_sync_tile = (rows, keys) caps
            rows, bn = min(rows, mma_sync_tile[0]), min(bn, mma_sync_tile[1])
        bm = max(rows, _pow2(qg))
        return dict(HQ=hq, HKV=hkv, HEAD_DIM=d, SCALE=float(scale), TOKENS_PER_TILE=bm // qg,
                    BLOCK_TT=_pow2(bm // qg), BLOCK_M=bm, BLOCK_N=max(16, bn), BLOCK_D=max(16, _pow2(d)),
                    KV_FP8=fp8, HAS_KV_SCALE=fp8 and bool(c.present["k_scale"]))
    return make


_ATTN_GRID = (cdiv(dim("q", 0), cexpr("TOKENS_PER_TILE")), dim("context_lens", 0), dim("k", 1))
_ATTN_SCALARS = (("num_blocks", dim("kv_cache", 1)), ("block_size", dim("kv_cache", 2)),
                 ("max_blocks", dim("block_tables", 1)))

PAGED_ATTENTION = OpSpec(
    name="paged_attention",
    doc=attention.__doc__ or "",
    inputs=(
        TensorArg("q", ("num_tokens", "Hq", "D"), FLOATS),
        TensorArg("k", ("num_tokens", "Hkv", "D"), FLOATS),
        TensorArg("v", ("num_tokens", "Hkv", "D"), FLOATS),
        TensorArg("kv_cache", ("2", "num_blocks", "block_size", "Hkv", "D"), FLOATS + ("float8_e4m3fn",)),
        _i32("block_tables", ("num_seqs", "max_blocks")), _i32("cu_seqlens", ("num_seqs+1",)),
        _i32("context_lens", ("num_seqs",)),
        # FP8 KV cache: cache = fp8(k / k_scale), read as cache * k_scale (fp8_format.py); 1.0 = unscaled
        TensorArg("k_scale", (), ("float32",), optional=True, fill=1.0),
        TensorArg("v_scale", (), ("float32",), optional=True, fill=1.0),
    ),
    outputs=(OutputArg("out", like="q"), OutputArg("kv_cache_out", like="kv_cache", alias="kv_cache")),
    attributes=(Attr("scale", float, 0.0, "softmax scale; 0 = head_dim ** -0.5"),),
    ref=attention.paged_attention_ref,
    bind=_bind_attn,
    kernels=(
        KernelSpec(name="prefill", fn=attention.paged_attention_kernel, grid=_ATTN_GRID, scalars=_ATTN_SCALARS,
                   constexprs=_attn_constexprs(64, 32, (32, 32)), num_warps=lambda k: 8 if k["BLOCK_M"] >= 64 else 4,
                   doc="any batch; 64 (token, head) rows per program (32 on sm_80/86/89/120 for FP8 caches and "
                       "fp32)"),
        KernelSpec(name="decode", fn=attention.paged_attention_kernel, grid=_ATTN_GRID, scalars=_ATTN_SCALARS,
                   constexprs=_attn_constexprs(16, 32, (16, 16)), num_warps=lambda k: 4,
                   doc="any batch; 16 rows per program, chosen when num_tokens == num_seqs"),
    ),
    select=lambda s: "decode" if s["q"][0] == s["context_lens"][0] else "prefill",
)

OPS: dict[str, OpSpec] = {op.name: op for op in (CAUSAL_CONV1D, SSD, GATED_RMS_NORM, PAGED_ATTENTION)}


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


__all__ = ["DOMAIN", "OPS", "TENSOR_DTYPES", "Attr", "Expr", "KernelContext", "KernelSpec", "OpSpec", "OutputArg",
           "TensorArg", "cdiv", "dim", "cexpr", "launch", "mma_sync_only", "ssd_kernel_chunk", "torch_call"]
