"""A small ONNX graph builder: nodes with readable, unique names, inline constants, and weights planned as
external data that is written later, one tensor at a time.

Names follow onnxruntime-genai's model builder: a node is `<scope>/<OpType>` (`/model/layers.0/attn/qkv_proj/Gemm`),
its outputs `<node name>/output_<k>`; weights keep their deploy checkpoint names (`layers.0.attn.qkv_proj.weight`),
so a reader of the graph finds each weight in the checkpoint and in the code that emitted it.

The graph is built before any weight is read: an external initializer is only (name, dtype, shape, a function
that yields its bytes in row chunks). `write_external_data` then streams them into one file, each at a
4096-byte aligned offset (so onnxruntime and TensorRT can map them), and fills in each TensorProto's
`external_data` (location, offset, length).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from trtfalcon.dtypes import lookup

ALIGN = 4096


@dataclass
class ExternalTensor:
    proto: TensorProto  # dims and data_type set; external_data filled when written
    nbytes: int
    produce: Callable[[], Iterable[torch.Tensor]]  # yields the tensor in dim-0 chunks of the right dtype


@dataclass
class GraphBuilder:
    nodes: list[Any] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)  # inline: small derived constants
    external: list[ExternalTensor] = field(default_factory=list)
    value_info: list[Any] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)
    _consts: dict[tuple, str] = field(default_factory=dict)

    # ---- nodes ----
    def node(self, op_type: str, inputs: list[str], scope: str, *, outputs: int | list[str] = 1, domain: str = "",
             **attrs: Any) -> list[str]:
        """Add `op_type` named `<scope>/<op_type>` (unique); returns its output names."""
        name = f"{scope}/{op_type}"
        base, k = name, 1
        while name in self._names:
            name = f"{base}_{k}"
            k += 1
        self._names.add(name)
        outs = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op_type: str, inputs: list[str], scope: str, **attrs: Any) -> str:
        """A node with one output; returns its name."""
        return self.node(op_type, inputs, scope, **attrs)[0]

    def annotate(self, name: str, dtype: torch.dtype, shape: Iterable[int | str] | None) -> None:
        """Declare a value's type where ONNX shape inference cannot (the outputs of plugin nodes)."""
        dims = None if shape is None else list(shape)
        self.value_info.append(helper.make_tensor_value_info(name, lookup(dtype, "torch").onnx, dims))

    # ---- constants ----
    def const(self, value: torch.Tensor | np.ndarray, name: str) -> str:
        """An inline initializer (small derived constants: shapes, split sizes, eps, RoPE frequencies); identical
        constants are shared."""
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        key = (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        if key in self._consts:
            return self._consts[key]
        proto = _tensor_proto(t.contiguous(), name)
        self.initializers.append(proto)
        self._consts[key] = name
        return name

    def ints(self, values: Iterable[int], name: str | None = None) -> str:
        vals = [int(v) for v in values]
        return self.const(torch.tensor(vals, dtype=torch.int64), name or f"/model/constants/int64_{_key(vals)}")

    def scalar(self, value: float, dtype: torch.dtype, name: str | None = None) -> str:
        t = torch.tensor(value, dtype=dtype)
        return self.const(t, name or f"/model/constants/{_dtype_tag(dtype)}_{_key([value])}")

    def external_tensor(self, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                        produce: Callable[[], Iterable[torch.Tensor]]) -> str:
        """A weight written later as external data by streaming `produce()` (dim-0 chunks of `dtype`)."""
        proto = TensorProto()
        proto.name = name
        proto.data_type = lookup(dtype, "torch").onnx
        proto.dims.extend(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        self.external.append(ExternalTensor(proto, nbytes, produce))
        return name

    def external_bytes(self) -> int:
        return sum(t.nbytes for t in self.external)

    # ---- the model ----
    def make_model(self, inputs: list[Any], outputs: list[Any], opset: int, ir_version: int, domains: dict[str, int],
                   doc: str) -> Any:
        graph = helper.make_graph(self.nodes, "falcon_h1", inputs, outputs,
                                  initializer=self.initializers + [t.proto for t in self.external],
                                  value_info=self.value_info, doc_string=doc)
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in domains.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="trtfalcon", ir_version=ir_version)
        return model


def write_external_data(tensors: list[ExternalTensor], fh: BinaryIO, location: str,
                        on_tensor: Callable[[str, int], None] | None = None) -> int:
    """Stream every tensor's bytes into `fh` at 4096-aligned offsets; set each proto's external_data. Peak memory
    is one chunk. Returns the bytes written."""
    offset = 0
    for t in tensors:
        pad = (-offset) % ALIGN
        if pad:
            fh.write(b"\0" * pad)
            offset += pad
        written = 0
        for piece in t.produce():
            buf = piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            fh.write(memoryview(buf))
            written += buf.nbytes
        if written != t.nbytes:
            raise RuntimeError(f"internal: tensor '{t.proto.name}' produced {written} bytes, expected {t.nbytes}")
        del t.proto.external_data[:]
        t.proto.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(written))):
            entry = t.proto.external_data.add()
            entry.key, entry.value = k, v
        offset += written
        if on_tensor is not None:
            on_tensor(t.proto.name, written)
    return offset


def _tensor_proto(t: torch.Tensor, name: str) -> TensorProto:
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):
        proto = TensorProto()
        proto.name = name
        proto.data_type = lookup(t.dtype, "torch").onnx
        proto.dims.extend(t.shape)
        proto.raw_data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return proto
    return numpy_helper.from_array(t.numpy(), name)


def _dtype_tag(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _key(values: list) -> str:
    return "_".join(str(v).replace("-", "m").replace(".", "p") for v in values)


def save_model_proto(model: Any, path: Path) -> None:
    """Serialize the (small) graph; weights are already in the external data file."""
    path.write_bytes(model.SerializeToString())
