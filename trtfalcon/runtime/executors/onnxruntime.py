"""The onnxruntime executor: runs the exported ONNX graph (trtfalcon/export) on the CPU, one engine step per call.

Every standard node (Gather, Gemm, FP8 QuantizeLinear/DequantizeLinear, the RMSNorm and RoPE arithmetic, ...) runs
in onnxruntime. The `trtfalcon` plugin nodes, which onnxruntime does not know, run as custom ops generated from
their declarations (plugins/ops.py `OPS`): `PluginKernel` binds a node's inputs by the spec's input order, its
attributes by the spec's attribute types, and calls the op's vectorized torch implementation (plugins/ops.py,
`get_ops("torch")`) with the reference's arguments (`OpSpec.ref_arguments`); the spec's aliases say which outputs
ARE their inputs.

How the custom ops are hosted, and why not inside an onnxruntime session: onnxruntime's only Python custom-op
route (onnxruntime-extensions' PyOp, domain fixed to "ai.onnx.contrib") copies every input into a new numpy array
and returns outputs to C++ as Python lists (`_ocos.py: r.flatten().tolist()`): measured here at 0.46 s for one
8 MB pool per call, so a cache pool could never be updated in place and a step would cost seconds; it has no
bfloat16 either. A C++ custom-op library needs onnxruntime's C headers, which its wheel does not ship. So the
graph is cut at its plugin nodes into onnxruntime sessions (one per run of standard nodes, built from the exported
model's own nodes and initializers, unchanged) and plugin calls between them; values cross as zero-copy
numpy/torch views. The cost is a session call per segment (about 5 per layer).

In-place cache updates: the pools are torch tensors this executor owns (contract.CacheSpec.allocate). Only plugin
nodes read them, and the plugin's torch op updates the pool in place exactly as the spec's alias declares
(`conv_state_out` IS `conv_state`); the graph output `conv_state_out.{i}` is then the same tensor, which is
checked on every step (the same binding a TensorRT engine gets: input and aliased output on one buffer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trtfalcon.dtypes import FLOAT_NAMES, KV_CACHE_NAMES, lookup
from trtfalcon.errors import CheckpointError, MissingDependencyError, TrtFalconError
from trtfalcon.plugins.ops import OPS, get_ops
from trtfalcon.plugins.spec import DOMAIN, OpSpec
from trtfalcon.runtime.contract import CacheSpec, StepBatch, cache_names, cache_output_name
from trtfalcon.runtime.executors.base import TorchPools



def _import_ort():
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError(f"the onnxruntime backend needs `onnx` and `onnxruntime`: pip install "
                                     f"'trtfalcon[onnx]' ({e})") from e
    return onnx, ort


# --------------------------------------------------------------------------------------------------------------
# Plugin nodes as custom ops, derived from the spec


@dataclass(frozen=True)
class PluginKernel:
    """One plugin op type as a callable: (input tensors in spec order, ONNX attributes) -> output tensors."""

    op: OpSpec
    fn: Callable[..., torch.Tensor]

    def attributes(self, raw: dict[str, Any]) -> dict[str, Any]:
        """ONNX attribute values typed as the spec declares (ONNX ints -> bool, bytes -> str); TensorRT-only
        attributes (plugin_namespace, aot) are dropped."""
        out = self.op.attr_defaults()
        for a in self.op.attributes:
            if a.name in raw:
                v = raw[a.name]
                out[a.name] = (v.decode() if isinstance(v, bytes) else str(v)) if a.type is str else a.type(v)
        return out

    def __call__(self, inputs: list[torch.Tensor], attrs: dict[str, Any]) -> list[torch.Tensor]:
        tensors = {arg.name: t for arg, t in zip(self.op.inputs, inputs)}
        result = self.fn(**self.op.ref_arguments(tensors, attrs))
        results = iter(result if isinstance(result, tuple) else (result,))
        return [tensors[o.alias] if o.alias else next(results) for o in self.op.outputs]


def plugin_kernels(kernels: str = "torch") -> dict[str, PluginKernel]:
    """ONNX op type (every kernel variant's plugin name: "ssd", "ssd_recurrent", ...) -> its custom op."""
    ops = get_ops(kernels)
    table: dict[str, PluginKernel] = {}
    for op in OPS.values():
        for ks in op.kernels:
            table[op.plugin_name(ks)] = PluginKernel(op, getattr(ops, op.name))
    return table


# --------------------------------------------------------------------------------------------------------------
# The graph as onnxruntime segments and plugin calls


@dataclass
class _OrtSegment:
    session: Any
    inputs: list[str]
    outputs: list[str]


@dataclass
class _PluginCall:
    name: str
    kernel: PluginKernel
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]


class GraphProgram:
    """An exported graph ready to run: onnxruntime segments between the plugin nodes, in the graph's node order."""

    def __init__(self, model_path: Path, kernels: dict[str, PluginKernel], num_threads: int = 1):
        onnx, ort = _import_ort()
        from onnx import helper, numpy_helper

        model = onnx.load(str(model_path))  # with its external data: this executor is for CPU validation sizes
        types = _value_types(onnx, model)
        inits = {t.name: t for t in model.graph.initializer}
        opset = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
        graph_outputs = [o.name for o in model.graph.output]
        so = ort.SessionOptions()
        so.intra_op_num_threads = num_threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.constants: dict[str, torch.Tensor] = {}
        self.steps: list[_OrtSegment | _PluginCall] = []
        nodes = list(model.graph.node)
        # consumers after each position, to know which values a segment must hand on
        last_use: dict[str, int] = {name: len(nodes) for name in graph_outputs}
        for idx, n in enumerate(nodes):
            for i in n.input:
                last_use[i] = max(last_use.get(i, -1), idx)

        def flush(segment: list[Any], end: int) -> None:
            if not segment:
                return
            produced = {o for n in segment for o in n.output}
            needed = [i for n in segment for i in n.input if i and i not in produced]
            feeds = list(dict.fromkeys(i for i in needed if i not in inits))
            outs = [o for o in dict.fromkeys(o for n in segment for o in n.output) if last_use.get(o, -1) >= end]
            sub = helper.make_graph(
                segment, f"segment_{len(self.steps)}",
                [helper.make_tensor_value_info(i, types[i], None) for i in feeds],
                [helper.make_tensor_value_info(o, types[o], None) for o in outs],
                initializer=[inits[i] for i in dict.fromkeys(needed) if i in inits],
            )
            sub_model = helper.make_model(sub, opset_imports=opset, ir_version=model.ir_version)
            try:
                session = ort.InferenceSession(sub_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types
                raise CheckpointError(f"{model_path}: onnxruntime cannot run nodes {segment[0].name} .. "
                                      f"{segment[-1].name}: {e}") from e
            self.steps.append(_OrtSegment(session, feeds, outs))

        segment: list[Any] = []
        for idx, n in enumerate(nodes):
            if n.domain != DOMAIN:
                segment.append(n)
                continue
            flush(segment, idx)
            segment = []
            if n.op_type not in kernels:
                raise CheckpointError(f"{model_path}: node {n.name} has op type {DOMAIN}::{n.op_type}, which no "
                                      f"plugin declares (plugins/ops.py OPS has {sorted(kernels)})")
            kernel = kernels[n.op_type]
            for i in n.input:
                if i in inits and i not in self.constants:
                    self.constants[i] = torch.from_numpy(numpy_helper.to_array(inits[i]).copy())
            raw = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            self.steps.append(_PluginCall(n.name, kernel, list(n.input), list(n.output), kernel.attributes(raw)))
        flush(segment, len(nodes))
        self.outputs = graph_outputs

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env: dict[str, Any] = {**self.constants, **feeds}
        for step in self.steps:
            if isinstance(step, _PluginCall):
                outs = step.kernel([_as_torch(env[i]) for i in step.inputs], step.attrs)
                env.update(zip(step.outputs, outs))
            else:
                results = step.session.run(step.outputs, {i: _as_numpy(env[i]) for i in step.inputs})
                env.update(zip(step.outputs, results))
        return {o: _as_torch(env[o]) for o in self.outputs}


def _value_types(onnx: Any, model: Any) -> dict[str, int]:
    """Elem type of every value: ONNX shape inference, seeded by the exporter's value_info for plugin outputs."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[v.name] = v.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    return types


def _as_torch(v: Any) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.from_numpy(v)


def _as_numpy(v: Any) -> Any:
    return v.numpy() if isinstance(v, torch.Tensor) else v


# --------------------------------------------------------------------------------------------------------------
# The executor


class OnnxRuntimeExecutor(TorchPools):
    """The Executor protocol (runtime/executors/base.py) over an export directory (trtfalcon/export)."""

    def __init__(self, export_dir: str | Path, *, num_blocks: int, block_size: int, num_slots: int,
                 num_threads: int | None = None, kernels: str = "torch"):
        from trtfalcon.export.onnx import MODEL_FILE, load_export_config, read_manifest

        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        if manifest["dtype"] != "fp32":
            raise CheckpointError(
                f"{export_dir}: exported in {manifest['dtype']}, but onnxruntime's CPU provider has no "
                f"{manifest['dtype']} Gemm; export an fp32 graph for the onnxruntime backend: `trtfalcon export "
                f"{manifest['source']} OUT_DIR --dtype fp32`"
            )
        cfg = load_export_config(export_dir)
        self.config = cfg
        from trtfalcon.runtime.executors.torch import resolve_kernels

        self.kernels = resolve_kernels(kernels, torch.device("cpu"))  # auto -> the vectorized torch ops
        cache, what = manifest["cache_dtypes"], f"{export_dir}: export.json cache_dtypes"
        self.cache_spec = CacheSpec.for_model(
            cfg, num_blocks=num_blocks, block_size=block_size, num_slots=num_slots,
            kv_dtype=lookup(cache["kv_cache"], among=KV_CACHE_NAMES, what=what, error=CheckpointError).torch,
            conv_dtype=lookup(cache["conv_state"], among=FLOAT_NAMES, what=what, error=CheckpointError).torch,
            ssm_dtype=lookup(cache["ssm_state"], among=FLOAT_NAMES, what=what, error=CheckpointError).torch,
        )
        self.vocab_size = cfg.vocab_size
        self.pools = self.cache_spec.allocate("cpu")
        self._pool_names = cache_names(cfg.num_hidden_layers)
        threads = num_threads or (1 if cfg.num_parameters() < 50_000_000 else max(1, torch.get_num_threads()))
        self.program = GraphProgram(export_dir / MODEL_FILE, plugin_kernels(self.kernels), threads)

    def execute(self, batch: StepBatch) -> torch.Tensor:
        out = self.program.run({**batch.as_dict(), **self.pools})
        for name in self._pool_names:  # the aliased outputs must be the pools themselves: updated in place
            if out[cache_output_name(name)].data_ptr() != self.pools[name].data_ptr():
                raise TrtFalconError(f"internal: graph output {cache_output_name(name)} is not pool {name}")
        return out["logits"]


