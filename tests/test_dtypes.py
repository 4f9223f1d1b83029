"""The dtype vocabulary (trtfalcon/dtypes.py): every spelling of every record round-trips, and each one is what the
library that defines it says (torch, Triton, onnx, safetensors, TensorRT 11.4's bindings wheel)."""

import ast
import json
import struct
import subprocess
import sys
import zipfile
from typing import get_args

import pytest
import torch

from trtfalcon.dtypes import (
    DTYPES, FLOAT_NAMES, KV_CACHE_NAMES, SSM_STATE_NAMES, FloatName, KvCacheName, Spelling, SsmStateName, lookup,
)
from trtfalcon.errors import CheckpointError, ConfigError

SPELLINGS = get_args(Spelling)


@pytest.mark.parametrize("by", SPELLINGS)
def test_every_spelling_finds_its_own_record_and_no_other(by):
    values = [getattr(d, by) for d in DTYPES]
    assert len(set(values)) == len(DTYPES), f"two dtypes share the {by} spelling: {values}"
    for d in DTYPES:
        assert lookup(getattr(d, by), by) is d


@pytest.mark.parametrize("d", DTYPES, ids=lambda d: d.name)
def test_each_record_agrees_with_torch(d):
    assert isinstance(d.torch, torch.dtype) and d.torch is getattr(torch, d.long)
    assert d.itemsize == d.torch.itemsize == torch.empty((), dtype=d.torch).element_size()


@pytest.mark.parametrize("d", DTYPES, ids=lambda d: d.name)
def test_onnx_enum_is_onnx_own(d):
    helper = pytest.importorskip("onnx.helper")
    np_dtype = helper.tensor_dtype_to_np_dtype(d.onnx)
    assert np_dtype.name == d.long and np_dtype.itemsize == d.itemsize


@pytest.mark.parametrize("d", DTYPES, ids=lambda d: d.name)
def test_triton_signature_type_is_triton_own(d):
    pytest.importorskip("triton")
    import triton.language as tl
    from triton._utils import canonicalize_dtype

    assert canonicalize_dtype(d.torch) == d.triton  # what Triton's JIT writes for a tensor of this torch dtype
    assert tl.str_to_ty("*" + d.triton, None).element_ty.primitive_bitwidth == 8 * d.itemsize


@pytest.mark.parametrize("d", DTYPES, ids=lambda d: d.name)
def test_safetensors_string_is_what_safetensors_writes(d):
    from safetensors.torch import save

    raw = save({"t": torch.zeros(3, dtype=d.torch)})
    (n,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8:8 + n])["t"]["dtype"] == d.safetensors


def test_tensorrt_names_are_datatypes_of_the_11_4_bindings(trt_bindings_wheel):
    """tensorrt_bindings/__init__.py sizes each DataType by its module-level name (`_itemsize`'s mapping): every
    record's tensorrt name must be one of them, with the same size."""
    with zipfile.ZipFile(trt_bindings_wheel) as z:
        tree = ast.parse(z.read("tensorrt_bindings/__init__.py"))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_itemsize")
    mapping = next(n for n in ast.walk(fn) if isinstance(n, ast.Dict))
    sizes = {k.id: ast.literal_eval(v) for k, v in zip(mapping.keys, mapping.values)}
    assert {"float32", "bfloat16", "fp8", "int32"} <= set(sizes)  # the parse found the table
    for d in DTYPES:
        assert sizes.get(d.tensorrt) == d.itemsize, (d.name, d.tensorrt, sizes)


def test_choice_lists_name_known_dtypes_and_match_their_literals():
    assert FLOAT_NAMES == get_args(FloatName) == ("bf16", "fp16", "fp32")
    assert KV_CACHE_NAMES == get_args(KvCacheName) == (*FLOAT_NAMES, "fp8")
    assert SSM_STATE_NAMES == get_args(SsmStateName) and set(SSM_STATE_NAMES) <= set(FLOAT_NAMES)
    for names in (FLOAT_NAMES, KV_CACHE_NAMES, SSM_STATE_NAMES):
        assert all(lookup(n).name == n for n in names)


def test_among_restricts_by_short_or_long_name():
    assert lookup("bfloat16", "long", among=FLOAT_NAMES).name == "bf16"
    assert lookup(torch.float8_e4m3fn, "torch", among=("float32", "float8_e4m3fn")).name == "fp8"
    with pytest.raises(ConfigError, match=r"^kv_dtype: expected one of bf16, fp16, fp32, found 'fp8'$"):
        lookup("fp8", among=FLOAT_NAMES, what="kv_dtype")


@pytest.mark.parametrize("value, by, expected", [
    ("bfloat16", "name", "bf16, fp16, fp32, fp8, int32, int64, int8, uint8"),  # a long name is not a short name
    ("F64", "safetensors", "BF16, F16, F32, F8_E4M3, I32, I64, I8, U8"),
    (torch.float64, "torch", "torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn"),
    (11, "onnx", "16, 10, 1, 17, 6, 7, 3, 2"),
    (["bf16"], "name", "bf16, fp16"),  # unhashable input from a JSON file
])
def test_bad_spelling_names_what_was_expected_and_found(value, by, expected):
    among = ("bf16", "fp16") if isinstance(value, list) else None
    with pytest.raises(CheckpointError) as e:
        lookup(value, by, among=among, what="model.safetensors: tensor 'x' dtype", error=CheckpointError)
    assert str(e.value).startswith(f"model.safetensors: tensor 'x' dtype: expected one of {expected}")
    assert str(e.value).endswith(f"found {value!r}")


def test_default_error_is_config_error_and_bad_by_is_refused():
    with pytest.raises(ConfigError, match=r"^dtype: expected one of .*, found 'fp64'$"):
        lookup("fp64")
    with pytest.raises(ValueError, match="by: expected one of name, long, torch"):
        lookup("bf16", "itemsize")  # type: ignore[arg-type]


def test_importing_the_vocabulary_does_not_import_torch():
    """The CLI and config modules import it; `trtfalcon --help` must not pay for torch."""
    code = "import sys, trtfalcon.dtypes as d; d.lookup('bf16').itemsize; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_vocabulary_imports_nothing_of_trtfalcon_but_errors():
    """plugins/ and every stage import it: anything more could close an import cycle."""
    import trtfalcon.dtypes

    tree = ast.parse(open(trtfalcon.dtypes.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("trtfalcon")} == {"trtfalcon.errors"}
