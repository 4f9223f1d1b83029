"""The one dtype vocabulary: one record per dtype trtfalcon handles, holding every spelling of it.

The pipeline meets each dtype under several names: trtfalcon's own short names ("bf16", "fp8": CLI options, build
configs, deploy config.json's trtfalcon.dtype, the export and engine manifests), torch dtypes, long names
("bfloat16", "float8_e4m3fn": torch's attribute names, which are also HF config.json's torch_dtype and the plugin
specs' tensor dtypes), Triton signature types ("bf16", "fp8e4nv"), ONNX TensorProto enums, TensorRT DataType
names, safetensors header strings, and a size in bytes. Each module looks its spelling up here instead of keeping
a table of its own, so a new dtype (NVFP4, say) is one record, not thirteen edits.

`lookup(value, by=...)` finds the record whose `by` spelling is `value`, optionally among a subset, and otherwise
raises an error naming the field, what was expected and what was found. tests/test_dtypes.py checks every spelling
against the library that defines it (torch, Triton, onnx, safetensors, TensorRT 11.4's bindings).

torch is imported only when a torch dtype is asked for: the CLI and the config modules import this one, and
`trtfalcon --help` must not pay for importing torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal, get_args

from trtfalcon.errors import ConfigError

if TYPE_CHECKING:
    import torch

# The spellings `lookup` can search by: the fields of Dtype, plus "torch".
Spelling = Literal["name", "long", "torch", "triton", "onnx", "tensorrt", "safetensors"]


@dataclass(frozen=True)
class Dtype:
    name: str  # trtfalcon's short name: CLI, build configs, deploy config.json trtfalcon.dtype, manifests
    long: str  # torch's attribute name = HF config.json torch_dtype = plugins/spec.py tensor dtypes
    itemsize: int  # bytes per element
    triton: str  # Triton signature type (a pointer argument is "*" + this)
    onnx: int  # onnx.TensorProto.DataType value
    tensorrt: str  # the attribute of the tensorrt module (trt.bfloat16; trt.fp8 is E4M3)
    safetensors: str  # "dtype" in a safetensors header

    @cached_property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.long)


DTYPES: tuple[Dtype, ...] = (
    Dtype("bf16", "bfloat16", 2, "bf16", 16, "bfloat16", "BF16"),
    Dtype("fp16", "float16", 2, "fp16", 10, "float16", "F16"),
    Dtype("fp32", "float32", 4, "fp32", 1, "float32", "F32"),
    # E4M3 with NaN and no infinities (OCP FP8): FP8 weights and the FP8 KV cache; Triton's float8e4nv needs sm_89+
    Dtype("fp8", "float8_e4m3fn", 1, "fp8e4nv", 17, "fp8", "F8_E4M3"),
    Dtype("int32", "int32", 4, "i32", 6, "int32", "I32"),
    Dtype("int64", "int64", 8, "i64", 7, "int64", "I64"),
    Dtype("int8", "int8", 1, "i8", 3, "int8", "I8"),
    Dtype("uint8", "uint8", 1, "u8", 2, "uint8", "U8"),
)
_BY_NAME = {**{d.long: d for d in DTYPES}, **{d.name: d for d in DTYPES}}  # `among` takes either
_SPELLINGS: tuple[str, ...] = get_args(Spelling)

# Choice lists, by short name, as Literal types for pydantic fields and as tuples for click.Choice and checks.
# Floating-point dtypes of weights, activations (the compute dtype), the conv state and, in the runtime, the SSM state.
FloatName = Literal["bf16", "fp16", "fp32"]
# A KV cache pool: a float, or FP8 (E4M3, with per-layer k/v scales from the checkpoint).
KvCacheName = Literal["bf16", "fp16", "fp32", "fp8"]
# The SSM state pool the SSD kernels are built for (plugins/spec.py ssm_state, plugins/aot.py configurations).
SsmStateName = Literal["fp32", "bf16"]
FLOAT_NAMES: tuple[str, ...] = get_args(FloatName)
KV_CACHE_NAMES: tuple[str, ...] = get_args(KvCacheName)
SSM_STATE_NAMES: tuple[str, ...] = get_args(SsmStateName)


def lookup(value: object, by: Spelling = "name", *, among: Iterable[str] | None = None, what: str = "dtype",
           error: type[Exception] = ConfigError) -> Dtype:
    """The record whose `by` spelling equals `value`, among the dtypes named in `among` (short or long names;
    default every dtype). Otherwise raises `error` (ConfigError unless the caller's context says otherwise, e.g.
    CheckpointError for a file's contents): "{what}: expected one of <the `by` spellings>, found <value>"."""
    if by not in _SPELLINGS:
        raise ValueError(f"by: expected one of {', '.join(_SPELLINGS)}, found {by!r}")
    records = DTYPES if among is None else tuple(_BY_NAME[n] for n in among)
    for d in records:
        if getattr(d, by) == value:
            return d
    expected = ", ".join(str(getattr(d, by)) for d in records)
    raise error(f"{what}: expected one of {expected}, found {value!r}")


__all__ = ["DTYPES", "FLOAT_NAMES", "KV_CACHE_NAMES", "SSM_STATE_NAMES", "Dtype", "FloatName", "KvCacheName",
           "Spelling", "SsmStateName", "lookup"]
