"""Deploy checkpoint -> ONNX graph of one engine step: the engine I/O contract as graph inputs and outputs, the
plugin ops as `trtfalcon` nodes, FP8 linears as explicit Q/DQ, weights as external data.

The graph computes exactly trtfalcon/model/layers.py (FalconH1Model.forward), node for node:

    h = Gather(embed_tokens, input_ids)                       cos, sin = RoPE tables of `positions`
    per layer i (attention and Mamba2 in parallel on one pre-norm; multipliers already folded):
        n = rms_norm(h)
        z, xBC, dt = Split(linear(n, in_proj))
        xBC = trtfalcon::causal_conv1d(xBC, conv1d.weight, conv1d.bias, conv_state.i, ...)   -> conv_state_out.i
        y   = trtfalcon::ssd(x, dt, A, B, C, D, dt_bias, ssm_state.i, ...)                    -> ssm_state_out.i
        m   = linear(trtfalcon::gated_rms_norm(y, z, norm.weight), out_proj)
        q, k, v = rope(Split(linear(n, qkv_proj)))
        a   = linear(trtfalcon::paged_attention(q, k, v, kv_cache.i, ..., k_scale, v_scale), o_proj) -> kv_cache_out.i
        h = h + m + a ;  h = h + down_proj(up * silu(gate)), [gate | up] = linear(rms_norm(h), gate_up_proj)
    logits = Cast<float>(Gemm(rms_norm(h[cu_seqlens[1:] - 1]), lm_head))

A linear is Gemm(x, W, b, transB=1): the deploy weight's (out, in) layout as stored, so weights stream from the
checkpoint to the data file without a transpose. An FP8 linear (trtfalcon/checkpoint/deploy_fp8.py) is
    QuantizeLinear(x, input_scale, fp8 zero point, saturate=1) -> DequantizeLinear -> Gemm <- DequantizeLinear(W fp8,
    weight_scale per row, axis=0)
which TensorRT 11 (strongly typed) fuses into an FP8 GEMM; conv1d, norms, embeddings and lm_head never get Q/DQ.

Plugin nodes: op type = the spec's plugin name (`OpSpec.plugin_name` of its general kernel), domain "trtfalcon",
the spec's attributes (bools as 0/1 ints), plus `plugin_namespace="trtfalcon"` and `aot=1`: what TensorRT's ONNX
parser needs to map the node to the quickly deployable plugin "trtfalcon::<name>" registered by plugins/tensorrt.py
and to use its ahead-of-time kernel (TensorRT's samples/python/quickly_deployable_plugins: op = plugin name, string
attribute "plugin_namespace", bool attribute "aot" = True, which ONNX stores as an int). Optional inputs that are absent (no conv bias) are passed as
the spec's `fill` constant. Each aliased plugin output (the updated pool) is a graph output named by
contract.cache_output_name (`kv_cache_out.{i}`): a runtime binds it to the same buffer as the input pool, which
is how TensorRT's aliased plugin outputs (`inp.aliased()`) update a cache in place.

Output directory (EXPORT_FILES):
    model.onnx        the graph (a few hundred kB), opset 21, IR 10
    model.onnx.data   every checkpoint tensor, 4096-byte aligned, in graph-initializer order
    config.json       the deploy config (FalconH1Config reads it), copied from the checkpoint
    export.json       manifest: I/O contract (names, dtypes, symbolic shapes), aliases, pool dtypes, plugin node
                      counts, FP8 linears, opset, dtype, source checkpoint, trtfalcon version
    tokenizer files   copied when the checkpoint has them
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trtfalcon import __version__
from trtfalcon.checkpoint.deploy import copy_side_files, is_deploy_checkpoint
from trtfalcon.checkpoint.deploy_reader import DeployCheckpoint, open_deploy_checkpoint
from trtfalcon.checkpoint.safetensors_io import atomic_output_dir, check_output_differs, torch_dtype
from trtfalcon.config import FalconH1Config
from trtfalcon.dtypes import FLOAT_NAMES, KV_CACHE_NAMES, lookup
from trtfalcon.errors import CheckpointError, ConfigError, MissingDependencyError
from trtfalcon.plugins.ops import CAUSAL_CONV1D, GATED_RMS_NORM, PAGED_ATTENTION, SSD
from trtfalcon.plugins.spec import DOMAIN, OP_VERSION, OpSpec, dtype_name
from trtfalcon.runtime.contract import STEP_INPUTS, STEP_OUTPUTS, cache_names, cache_output_name

try:
    from onnx import TensorProto, helper

    from trtfalcon.export.graph import GraphBuilder, save_model_proto, write_external_data
except ImportError as e:  # pragma: no cover - the `onnx` extra is missing
    raise MissingDependencyError(
        f"trtfalcon export needs the `onnx` package: pip install 'trtfalcon[onnx]' ({e})"
    ) from e

DEFAULT_OPSET = 21  # float8 Q/DQ with saturate (19+), per-axis DQ, Split/ReduceMean sizes as inputs (18+)
MIN_OPSET = 21
IR_VERSION = 10  # the IR of opset 21
MODEL_FILE, DATA_FILE, MANIFEST_FILE = "model.onnx", "model.onnx.data", "export.json"
EXPORT_FILES = (MODEL_FILE, DATA_FILE, "config.json", MANIFEST_FILE)
MANIFEST_VERSION = 1

Progress = Callable[[str, int, int], None]  # (tensor name, bytes written so far, total bytes)


# --------------------------------------------------------------------------------------------------------------
# The public entry point


def export_onnx(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dtype: str | None = None,
    kv_dtype: str | None = None,
    conv_dtype: str | None = None,
    ssm_dtype: str = "fp32",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Export the deploy checkpoint at `checkpoint_dir` as an ONNX graph of one engine step into `out_dir`.

    dtype: compute dtype of the graph (activations and non-FP8 weights); default the checkpoint's. onnxruntime's
        CPU provider has no bfloat16 GEMM, so the onnxruntime executor needs an fp32 export.
    kv_dtype / conv_dtype / ssm_dtype: dtypes of the cache pools the graph takes (default: the compute dtype for
        KV and conv state, fp32 for the SSM state, as contract.CacheSpec and the torch executor default).
        kv_dtype "fp8": float8e4m3fn KV pools (graph I/O), each attention node fed its layer's k_scale / v_scale
        initializers; the checkpoint must carry them (`trtfalcon quantize --kv-cache-dtype fp8`, then convert).
    The graph is fully dynamic (num_tokens, num_seqs, max_blocks, num_blocks, block_size, num_slots are symbolic):
    maximum sizes belong to the TensorRT build's optimization profiles, not to the graph.

    Reads and validates the whole checkpoint's header first, then streams one tensor chunk at a time into
    model.onnx.data (peak memory about one 64 MiB chunk plus the graph). The output directory appears only when
    complete (atomic_output_dir); on any error nothing is left at `out_dir`. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(f"opset: expected an integer >= {MIN_OPSET} (float8 Q/DQ and TensorRT 11), found {opset!r}")
    src = open_deploy_checkpoint(checkpoint_dir)
    check_output_differs(checkpoint_dir, out_dir)
    compute = torch_dtype(dtype or src.stored_dtype)
    pools = {
        "kv_cache": _state_dtype(kv_dtype, compute, "kv_dtype", KV_CACHE_NAMES),
        "conv_state": _state_dtype(conv_dtype, compute, "conv_dtype"),
        "ssm_state": _state_dtype(ssm_dtype, compute, "ssm_dtype"),
    }
    if pools["kv_cache"] == torch.float8_e4m3fn and not src.has_kv_scales:
        raise CheckpointError(
            f"{src.directory}: kv_dtype fp8 needs tensor 'layers.0.attn.k_scale' (and every layer's k_scale / "
            "v_scale: cache = fp8(k / k_scale)), found none: config.json's trtfalcon.quantization.kv_cache_quant_algo "
            "is not 'FP8'; quantize with `trtfalcon quantize --kv-cache-dtype fp8` and convert, or export a "
            "bf16/fp32 KV cache"
        )
    t0 = time.perf_counter()
    emitter = FalconH1Graph(src, compute, pools)
    emitter.build()
    total = emitter.g.external_bytes()
    done = 0

    def on_tensor(name: str, nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(name, done, total)

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        with open(tmp / DATA_FILE, "wb") as fh:
            write_external_data(emitter.g.external, fh, DATA_FILE, on_tensor)
        save_model_proto(emitter.model(opset), tmp / MODEL_FILE)  # after the data: it holds their offsets
        shutil.copy2(src.directory / "config.json", tmp / "config.json")
        copy_side_files(src.directory, tmp)
        manifest = emitter.manifest(opset)
        manifest["external_bytes"] = total
        manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def is_export_dir(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / MODEL_FILE).is_file() and (d / MANIFEST_FILE).is_file()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    if not is_export_dir(d):
        if is_deploy_checkpoint(d):
            hint = f"it is a deploy checkpoint: export it first (`trtfalcon export {d} OUT --dtype fp32`), pass OUT"
        else:
            hint = "run `trtfalcon convert` then `trtfalcon export` to make one"
        raise CheckpointError(f"{d}: not an ONNX export directory (no {MODEL_FILE} + {MANIFEST_FILE}); {hint}")
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{d / MANIFEST_FILE}: version {manifest.get('version')!r}, this trtfalcon reads "
                              f"{MANIFEST_VERSION}; re-run `trtfalcon export`")
    return manifest


def _state_dtype(name: str | None, default: torch.dtype, what: str,
                 choices: tuple[str, ...] = FLOAT_NAMES) -> torch.dtype:
    if name is None:
        return default
    return lookup(name, among=choices, what=what).torch


# --------------------------------------------------------------------------------------------------------------
# The graph


def plugin_node_attrs(op: OpSpec, attrs: dict[str, Any]) -> dict[str, Any]:
    """The spec's attributes (defaults filled, bools as 0/1, as ONNX has no bool attribute) plus what TensorRT's ONNX
    parser reads to find the registered plugin and its AOT implementation."""
    values = {**op.attr_defaults(), **attrs}
    unknown = set(attrs) - {a.name for a in op.attributes}
    if unknown:
        raise ValueError(f"internal: {op.name} has no attributes {sorted(unknown)}")
    out: dict[str, Any] = {}
    for a in op.attributes:
        v = values[a.name]
        out[a.name] = int(bool(v)) if a.type is bool else a.type(v)
    out.update(plugin_namespace=op.domain, aot=1)  # the parser's plugin version defaults to "1" (OP_VERSION)
    return out


class FalconH1Graph:
    """Emits the graph of one step from a validated deploy checkpoint: one `make_*` method per op pattern."""

    def __init__(self, src: DeployCheckpoint, dtype: torch.dtype, pool_dtypes: dict[str, torch.dtype]):
        self.src, self.cfg, self.dtype, self.pool_dtypes = src, src.config, dtype, pool_dtypes
        self.fp8 = set(src.fp8_linears)
        self.g = GraphBuilder()
        self.plugin_counts: dict[str, int] = {}

    # ---- weights ----
    def weight(self, name: str, dtype: torch.dtype | None = None) -> str:
        """Checkpoint tensor `name` as an external initializer, in `dtype` or by the deploy rules: FP8 weights keep
        their bytes, A_log/D/dt_bias stay fp32, everything else takes the graph's dtype (cast a chunk at a time)."""
        if dtype is None:
            dtype = self.src.dtype_at(name, self.dtype)
        return self.g.external_tensor(name, dtype, self.src.shape(name), lambda: self.src.chunks(name, dtype))

    # ---- op patterns ----
    def make_linear(self, x: str, name: str, scope: str) -> str:
        """y = x @ W.T + b, with explicit FP8 Q/DQ when `name` is an FP8 linear."""
        bias = f"{name}.bias"
        b = self.weight(bias) if bias in self.src.reader else ""
        if name in self.fp8:
            # Scales in the compute dtype: QuantizeLinear requires x and its scale to share a type, and an FP8 GEMM
            # fusion wants DQ -> Gemm directly. In an fp32 graph this is exactly fake_quant_fp8 / dequantize_weight.
            s_in = self.weight(f"{name}.input_scale", self.dtype)
            zp = self.g.const(torch.zeros((), dtype=torch.float8_e4m3fn), "/model/constants/fp8_zero_point")
            xq = self.g.op("QuantizeLinear", [x, s_in, zp], f"{scope}/input_quantizer", saturate=1)
            x = self.g.op("DequantizeLinear", [xq, s_in, zp], f"{scope}/input_quantizer")
            w_scale = self.weight(f"{name}.weight_scale", self.dtype)
            w = self.g.op("DequantizeLinear", [self.weight(f"{name}.weight"), w_scale], f"{scope}/weight_quantizer",
                          axis=0)
        else:
            w = self.weight(f"{name}.weight")
        return self.g.op("Gemm", [x, w] + ([b] if b else []), scope, transB=1)

    def make_rms_norm(self, x: str, weight: str, scope: str) -> str:
        """transformers' FalconH1RMSNorm: statistics in fp32, cast back, then the weight (layers.rms_norm)."""
        g = self.g
        xf = self.make_cast(x, torch.float32, scope, self.dtype)
        sq = g.op("Mul", [xf, xf], scope)
        var = g.op("ReduceMean", [sq, g.ints([-1])], scope, keepdims=1)
        eps = g.scalar(self.cfg.rms_norm_eps, torch.float32)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, eps], scope)], scope)], scope)
        normed = self.make_cast(g.op("Mul", [xf, inv], scope), self.dtype, scope, torch.float32)
        return g.op("Mul", [self.weight(weight), normed], scope)

    def make_cast(self, x: str, to: torch.dtype, scope: str, source: torch.dtype) -> str:
        return x if source == to else self.g.op("Cast", [x], scope, to=lookup(to, "torch").onnx)

    def make_split(self, x: str, sizes: list[int], scope: str, axis: int = -1) -> list[str]:
        return self.g.node("Split", [x, self.g.ints(sizes)], scope, outputs=len(sizes), axis=axis)

    def make_reshape(self, x: str, shape: list[int], scope: str) -> str:
        return self.g.op("Reshape", [x, self.g.ints(shape)], scope)

    def make_rope_tables(self) -> tuple[str, str]:
        """cos, sin: (num_tokens, 1, head_dim) in the compute dtype, from int32 positions (layers.rope_cos_sin)."""
        g, cfg, scope = self.g, self.cfg, "/model/rotary_emb"
        hd = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        pos = g.op("Unsqueeze", [g.op("Cast", ["positions"], scope, to=TensorProto.FLOAT), g.ints([1])], scope)
        freqs = g.op("Mul", [pos, g.const(inv_freq, "/model/rotary_emb/inv_freq")], scope)
        emb = g.op("Concat", [freqs, freqs], scope, axis=-1)
        tables = []
        for fn in ("Cos", "Sin"):
            t = g.op(fn, [emb], scope)
            if self.dtype != torch.float32:
                t = g.op("Cast", [t], scope, to=lookup(self.dtype, "torch").onnx)
            tables.append(g.op("Unsqueeze", [t, g.ints([1])], scope))
        return tables[0], tables[1]

    def make_rope(self, x: str, cos: str, sin: str, scope: str) -> str:
        """x * cos + rotate_half(x) * sin on (tokens, heads, head_dim) (layers.apply_rope)."""
        g, half = self.g, self.cfg.head_dim // 2
        x1, x2 = self.make_split(x, [half, half], scope)
        rotated = g.op("Concat", [g.op("Neg", [x2], scope), x1], scope, axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos], scope), g.op("Mul", [rotated, sin], scope)], scope)

    def make_plugin(self, op: OpSpec, inputs: dict[str, str], attrs: dict[str, Any], scope: str,
                    outputs: dict[str, tuple[str | None, torch.dtype, list[int | str]]]) -> dict[str, str]:
        """A `trtfalcon` plugin node, inputs in the spec's order. outputs: spec output name -> (graph name or None
        for a generated one, dtype, shape), declared as value_info since ONNX cannot infer a custom op."""
        missing = [i.name for i in op.inputs if i.name not in inputs]
        if missing:
            raise ValueError(f"internal: {op.name} node lacks inputs {missing}")
        ks = op.kernels[0]
        op_type = op.plugin_name(ks)
        names = [outputs[o.name][0] or f"{scope}/{op_type}/{o.name}" for o in op.outputs]
        self.g.node(op_type, [inputs[i.name] for i in op.inputs], scope, outputs=names, domain=op.domain,
                    **plugin_node_attrs(op, attrs))
        for o, name in zip(op.outputs, names):
            _, dt, shape = outputs[o.name]
            self.g.annotate(name, dt, shape)
        self.plugin_counts[op_type] = self.plugin_counts.get(op_type, 0) + 1
        return {o.name: n for o, n in zip(op.outputs, names)}

    def fill(self, op: OpSpec, arg: str, n: int | None) -> str:
        """An absent optional plugin input as the spec's `fill` constant (one shared by every layer): graph formats
        pass a tensor that makes the op behave as if the input were absent (plugins/spec.py TensorArg.fill).
        n: its length (None: a scalar); dtype: the one the spec allows, else the graph's."""
        spec = next(a for a in op.inputs if a.name == arg)
        if spec.fill is None:
            raise ValueError(f"internal: {op.name}.{arg} has no fill value in plugins/spec.py")
        dtype = lookup(spec.dtypes[0], "long").torch if len(spec.dtypes) == 1 else self.dtype
        shape = () if n is None else (n,)
        return self.g.const(torch.full(shape, spec.fill, dtype=dtype), f"/model/constants/{op.name}_{arg}_fill")

    # ---- the model ----
    def build(self) -> None:
        """Emit every node; weights are registered as external tensors, read only when written."""
        cfg, g = self.cfg, self.g
        h = g.op("Gather", [self.weight("embed_tokens.weight"), "input_ids"], "/model/embed_tokens", axis=0)
        cos, sin = self.make_rope_tables()
        for i in range(cfg.num_hidden_layers):
            p, scope = f"layers.{i}", f"/model/layers.{i}"
            n = self.make_rms_norm(h, f"{p}.input_layernorm.weight", f"{scope}/input_layernorm")
            m = self.make_mamba(n, i)
            a = self.make_attention(n, i, cos, sin)
            h = g.op("Add", [g.op("Add", [h, m], f"{scope}/residual"), a], f"{scope}/residual")
            n2 = self.make_rms_norm(h, f"{p}.pre_ff_layernorm.weight", f"{scope}/pre_ff_layernorm")
            h = g.op("Add", [h, self.make_mlp(n2, i)], f"{scope}/residual_ff")
        scope = "/model/last_token"
        last = g.op("Sub", [g.op("Slice", ["cu_seqlens", g.ints([1]), g.ints([2**62]), g.ints([0])], scope),
                            g.const(torch.tensor(1, dtype=torch.int32), "/model/constants/int32_1")], scope)
        h = g.op("Gather", [h, last], scope, axis=0)
        h = self.make_rms_norm(h, "final_layernorm.weight", "/model/final_layernorm")
        logits = g.op("Gemm", [h, self.weight("lm_head.weight")], "/lm_head", transB=1)
        if self.dtype != torch.float32:
            logits = g.op("Cast", [logits], "/lm_head", to=TensorProto.FLOAT)
        g.node("Identity", [logits], "/lm_head/logits", outputs=["logits"])

    def model(self, opset: int) -> Any:
        inputs, outputs = self.io()
        return self.g.make_model(inputs, outputs, opset, IR_VERSION, {DOMAIN: OP_VERSION},
                            doc=f"Falcon-H1 engine step exported by trtfalcon {__version__} from {self.src.directory}")

    def make_mlp(self, n: str, i: int) -> str:
        g, p, scope = self.g, f"layers.{i}.mlp", f"/model/layers.{i}/mlp"
        gu = self.make_linear(n, f"{p}.gate_up_proj", f"{scope}/gate_up_proj")
        gate, up = self.make_split(gu, [self.cfg.intermediate_size] * 2, f"{scope}/gate_up_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{scope}/act")], f"{scope}/act")  # silu
        return self.make_linear(g.op("Mul", [up, act], scope), f"{p}.down_proj", f"{scope}/down_proj")

    def make_mamba(self, n: str, i: int) -> str:
        cfg, g, p, scope = self.cfg, self.g, f"layers.{i}.mamba", f"/model/layers.{i}/mamba"
        zxbcdt = self.make_linear(n, f"{p}.in_proj", f"{scope}/in_proj")
        z, xbc, dt = self.make_split(zxbcdt, [cfg.mamba_d_ssm, cfg.conv_dim, cfg.mamba_n_heads], f"{scope}/in_proj")
        bias = f"{p}.conv1d.bias"
        conv_bias = (self.weight(bias) if bias in self.src.reader
                     else self.fill(CAUSAL_CONV1D, "bias", cfg.conv_dim))
        conv = self.make_plugin(
            CAUSAL_CONV1D,
            dict(x=xbc, weight=self.weight(f"{p}.conv1d.weight"), bias=conv_bias, conv_state=f"conv_state.{i}",
                 cu_seqlens="cu_seqlens", context_lens="context_lens", state_slots="state_slots"),
            dict(activation=True), f"{scope}/conv1d",
            {"out": (None, self.dtype, ["num_tokens", cfg.conv_dim]),
             "conv_state_out": (cache_output_name(f"conv_state.{i}"), self.pool_dtypes["conv_state"],
                                self.pool_shape("conv_state"))},
        )
        gn = cfg.ssm_group_state_size
        x, b, c = self.make_split(conv["out"], [cfg.mamba_d_ssm, gn, gn], f"{scope}/split_xbc")
        x = self.make_reshape(x, [-1, cfg.mamba_n_heads, cfg.mamba_d_head], f"{scope}/x")
        b = self.make_reshape(b, [-1, cfg.mamba_n_groups, cfg.mamba_d_state], f"{scope}/B")
        c = self.make_reshape(c, [-1, cfg.mamba_n_groups, cfg.mamba_d_state], f"{scope}/C")
        # A = -exp(A_log), computed once in fp32 as the torch model does (FalconH1Model.__init__)
        a_log = self.src.reader.get(f"{p}.A_log").float()
        A = g.const(-torch.exp(a_log), f"{p}.A")
        lo, hi = cfg.time_step_limit
        ssd = self.make_plugin(
            SSD,
            dict(x=x, dt=dt, A=A, B=b, C=c, D=self.weight(f"{p}.D"), dt_bias=self.weight(f"{p}.dt_bias"),
                 ssm_state=f"ssm_state.{i}", cu_seqlens="cu_seqlens", context_lens="context_lens",
                 state_slots="state_slots"),
            dict(chunk_size=cfg.mamba_chunk_size, dt_min=lo, dt_max=hi), f"{scope}/ssd",
            {"y": (None, self.dtype, ["num_tokens", cfg.mamba_n_heads, cfg.mamba_d_head]),
             "ssm_state_out": (cache_output_name(f"ssm_state.{i}"), self.pool_dtypes["ssm_state"],
                               self.pool_shape("ssm_state"))},
        )
        y = self.make_reshape(ssd["y"], [-1, cfg.mamba_d_ssm], f"{scope}/y")
        norm_w = f"{p}.norm.weight"
        has_norm = cfg.mamba_rms_norm
        weight = self.weight(norm_w) if has_norm else self.fill(GATED_RMS_NORM, "weight", cfg.mamba_d_ssm)
        normed = self.make_plugin(
            GATED_RMS_NORM, dict(y=y, z=z, weight=weight),
            dict(n_groups=cfg.mamba_n_groups, eps=cfg.rms_norm_eps, norm_before_gate=cfg.mamba_norm_before_gate,
                 has_norm=has_norm, out_dtype=dtype_name(self.dtype)), f"{scope}/norm",
            {"out": (None, self.dtype, ["num_tokens", cfg.mamba_d_ssm])},
        )
        return self.make_linear(normed["out"], f"{p}.out_proj", f"{scope}/out_proj")

    def make_attention(self, n: str, i: int, cos: str, sin: str) -> str:
        cfg, p, scope = self.cfg, f"layers.{i}.attn", f"/model/layers.{i}/attn"
        qkv = self.make_linear(n, f"{p}.qkv_proj", f"{scope}/qkv_proj")
        q, k, v = self.make_split(qkv, [cfg.q_size, cfg.kv_size, cfg.kv_size], f"{scope}/qkv_proj")
        q = self.make_rope(self.make_reshape(q, [-1, cfg.num_attention_heads, cfg.head_dim], f"{scope}/q"), cos, sin,
                           f"{scope}/q_rope")
        k = self.make_rope(self.make_reshape(k, [-1, cfg.num_key_value_heads, cfg.head_dim], f"{scope}/k"), cos, sin,
                           f"{scope}/k_rope")
        v = self.make_reshape(v, [-1, cfg.num_key_value_heads, cfg.head_dim], f"{scope}/v")
        if self.pool_dtypes["kv_cache"] == torch.float8_e4m3fn:  # as layers.kv_cache_scales: only an FP8 pool
            k_scale, v_scale = (self.weight(f"{p}.{kind}_scale", torch.float32) for kind in ("k", "v"))
        else:
            k_scale, v_scale = (self.fill(PAGED_ATTENTION, name, None) for name in ("k_scale", "v_scale"))
        attn = self.make_plugin(
            PAGED_ATTENTION,
            dict(q=q, k=k, v=v, kv_cache=f"kv_cache.{i}", block_tables="block_tables", cu_seqlens="cu_seqlens",
                 context_lens="context_lens", k_scale=k_scale, v_scale=v_scale),
            dict(scale=cfg.head_dim**-0.5), f"{scope}/paged_attention",
            {"out": (None, self.dtype, ["num_tokens", cfg.num_attention_heads, cfg.head_dim]),
             "kv_cache_out": (cache_output_name(f"kv_cache.{i}"), self.pool_dtypes["kv_cache"],
                              self.pool_shape("kv_cache"))},
        )
        o = self.make_reshape(attn["out"], [-1, cfg.q_size], f"{scope}/o")
        return self.make_linear(o, f"{p}.o_proj", f"{scope}/o_proj")

    # ---- I/O: the engine contract ----
    def pool_shape(self, kind: str) -> list[int | str]:
        cfg = self.cfg
        return {
            "kv_cache": [2, "num_blocks", "block_size", cfg.num_key_value_heads, cfg.head_dim],
            "conv_state": ["num_slots", cfg.conv_dim, cfg.conv_state_len],
            "ssm_state": ["num_slots", cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state],
        }[kind]

    def io_spec(self) -> tuple[dict[str, tuple[torch.dtype, list]], dict[str, tuple[torch.dtype, list]]]:
        """Graph inputs and outputs by name: the contract's step inputs, then the pools; logits, then the aliases."""
        inputs: dict[str, tuple[torch.dtype, list]] = {k: (dt, list(shape)) for k, (dt, shape) in STEP_INPUTS.items()}
        outputs: dict[str, tuple[torch.dtype, list]] = {}
        for k, (dt, shape) in STEP_OUTPUTS.items():
            outputs[k] = (dt, [self.cfg.vocab_size if s == "vocab_size" else s for s in shape])
        for pool in cache_names(self.cfg.num_hidden_layers):
            kind = pool.split(".")[0]
            inputs[pool] = (self.pool_dtypes[kind], self.pool_shape(kind))
            outputs[cache_output_name(pool)] = (self.pool_dtypes[kind], self.pool_shape(kind))
        return inputs, outputs

    def io(self) -> tuple[list[Any], list[Any]]:
        ins, outs = self.io_spec()
        mk = helper.make_tensor_value_info
        return ([mk(n, lookup(dt, "torch").onnx, shape) for n, (dt, shape) in ins.items()],
                [mk(n, lookup(dt, "torch").onnx, shape) for n, (dt, shape) in outs.items()])

    def manifest(self, opset: int) -> dict[str, Any]:
        ins, outs = self.io_spec()

        def table(d: dict[str, tuple[torch.dtype, list]]) -> dict[str, Any]:
            return {n: {"dtype": lookup(dt, "torch").name, "shape": shape} for n, (dt, shape) in d.items()}

        return {
            "format": "trtfalcon-onnx", "version": MANIFEST_VERSION, "trtfalcon": __version__,
            "model": MODEL_FILE, "external_data": DATA_FILE, "opset": opset, "ir_version": IR_VERSION,
            "dtype": lookup(self.dtype, "torch").name, "source": str(self.src.directory),
            "cache_dtypes": {k: lookup(v, "torch").name for k, v in self.pool_dtypes.items()},
            "inputs": table(ins), "outputs": table(outs),
            "aliases": {cache_output_name(p): p for p in cache_names(self.cfg.num_hidden_layers)},
            "plugins": {"domain": DOMAIN, "nodes": dict(sorted(self.plugin_counts.items()))},
            "fp8": {"linears": list(self.src.fp8_linears)} if self.src.is_fp8 else None,
            "model_summary": self.cfg.summary(),
        }


def load_export_config(directory: str | Path) -> FalconH1Config:
    return FalconH1Config.from_json_file(Path(directory) / "config.json")
