"""The deploy checkpoint format: what `trtfalcon convert` writes and every later stage reads.

A deploy checkpoint is a directory of
    config.json     the Falcon-H1 config with every muP multiplier at 1.0 (folded into the weights) and untied
                    embeddings, plus the "trtfalcon" record (deploy_config_dict): format "deploy", version, dtype,
                    folded_multipliers, fused, source, and the records its source format adds (FP8: "quantization")
    *.safetensors   the deploy tensors (deploy_tensor_shapes): A_log, D, dt_bias fp32, the rest in the deploy
                    dtype; FP8 adds and retypes tensors (deploy_fp8.py); sharded with an index when large
    SIDE_FILES      the source's tokenizer and generation files, so that it tokenizes and serves on its own

Folding (exact for linears; ../shared/reference/falcon-h1.md, checked against transformers' modeling code):
    q_proj(n * attn_in)                    -> W_q * attn_in,                bias unchanged
    k_proj(n * attn_in) * key_mult         -> W_k * attn_in * key_mult,     bias * key_mult
    v_proj(n * attn_in)                    -> W_v * attn_in,                bias unchanged
    o_proj(.) * attn_out                   -> W_o * attn_out,               bias * attn_out
    in_proj(n * ssm_in) * mup_vector       -> W_in * ssm_in * mup[row],     bias * mup[row]
        mup_vector (not in the checkpoint) = [z | x | B | C | dt] blocks x ssm_multipliers[0..4]
    out_proj(.) * ssm_out                  -> W_out * ssm_out,              bias * ssm_out
    gate_proj(x) * mlp[0]                  -> W_gate * mlp[0],              bias * mlp[0]
    down_proj(.) * mlp[1]                  -> W_down * mlp[1],              bias * mlp[1]
    embed(ids) * emb_mult ; lm_head(h) * lm_mult  (tied embeddings: folded separately, untied)
deploy_sources is this table; every fold runs in fp32 on row chunks (fold_rows), then casts once.

A DeployPlan is a deploy checkpoint before any tensor is computed: what each source format's planner returns
(dense.py for bf16/fp16/fp32 HF checkpoints, fp8.py for ModelOpt FP8 ones; convert.py chooses), and what the one
writer (convert.convert_checkpoint) and the one in-memory loader (DeployPlan.tensors) take. A deploy checkpoint on
disk is read back, validated, by the one reader (deploy_reader.py).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trtfalcon.checkpoint.hf import hf_tensor_shapes
from trtfalcon.checkpoint.safetensors_io import SafetensorsReader, TensorSpec, row_chunks
from trtfalcon.config import DEPLOY_FORMAT_VERSION, FalconH1Config
from trtfalcon.dtypes import FLOAT_NAMES, lookup

FP32_TENSORS = ("A_log", "D", "dt_bias")
# Files copied from the HF checkpoint so that a deploy checkpoint can tokenize and serve on its own.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "tokenizer.model", "chat_template.jinja",
)


@dataclass(frozen=True)
class Source:
    """Rows of one HF tensor, scaled (in fp32) by a scalar and optionally a per-row vector."""

    name: str
    scale: float = 1.0
    row_scale: torch.Tensor | None = None  # (rows,) fp32, e.g. the mup_vector for in_proj


def deploy_sources(cfg: FalconH1Config) -> dict[str, list[Source]]:
    """Deploy tensor name -> the HF row blocks it is made of, in order (fused tensors have several)."""
    out: dict[str, list[Source]] = {"embed_tokens.weight": [Source("model.embed_tokens.weight", cfg.embedding_multiplier)]}
    mup = mup_vector(cfg)
    for i in range(cfg.num_hidden_layers):
        p, d = f"model.layers.{i}", f"layers.{i}"
        attn_in, key = cfg.attention_in_multiplier, cfg.key_multiplier
        g0, g1 = cfg.mlp_multipliers
        out[f"{d}.input_layernorm.weight"] = [Source(f"{p}.input_layernorm.weight")]
        out[f"{d}.attn.qkv_proj.weight"] = [
            Source(f"{p}.self_attn.q_proj.weight", attn_in),
            Source(f"{p}.self_attn.k_proj.weight", attn_in * key),
            Source(f"{p}.self_attn.v_proj.weight", attn_in),
        ]
        out[f"{d}.attn.o_proj.weight"] = [Source(f"{p}.self_attn.o_proj.weight", cfg.attention_out_multiplier)]
        if cfg.attention_bias:
            out[f"{d}.attn.qkv_proj.bias"] = [
                Source(f"{p}.self_attn.q_proj.bias"), Source(f"{p}.self_attn.k_proj.bias", key),
                Source(f"{p}.self_attn.v_proj.bias"),
            ]
            out[f"{d}.attn.o_proj.bias"] = [Source(f"{p}.self_attn.o_proj.bias", cfg.attention_out_multiplier)]
        out[f"{d}.mamba.in_proj.weight"] = [Source(f"{p}.mamba.in_proj.weight", cfg.ssm_in_multiplier, mup)]
        if cfg.mamba_proj_bias:  # the bias is added after the input multiplier, before the mup_vector
            out[f"{d}.mamba.in_proj.bias"] = [Source(f"{p}.mamba.in_proj.bias", 1.0, mup)]
        out[f"{d}.mamba.conv1d.weight"] = [Source(f"{p}.mamba.conv1d.weight")]  # (C, 1, K) -> (C, K) below
        if cfg.mamba_conv_bias:
            out[f"{d}.mamba.conv1d.bias"] = [Source(f"{p}.mamba.conv1d.bias")]
        for leaf in FP32_TENSORS:
            out[f"{d}.mamba.{leaf}"] = [Source(f"{p}.mamba.{leaf}")]
        if cfg.mamba_rms_norm:
            out[f"{d}.mamba.norm.weight"] = [Source(f"{p}.mamba.norm.weight")]
        out[f"{d}.mamba.out_proj.weight"] = [Source(f"{p}.mamba.out_proj.weight", cfg.ssm_out_multiplier)]
        if cfg.projectors_bias:
            out[f"{d}.mamba.out_proj.bias"] = [Source(f"{p}.mamba.out_proj.bias", cfg.ssm_out_multiplier)]
        out[f"{d}.pre_ff_layernorm.weight"] = [Source(f"{p}.pre_ff_layernorm.weight")]
        ff = f"{p}.feed_forward"
        out[f"{d}.mlp.gate_up_proj.weight"] = [Source(f"{ff}.gate_proj.weight", g0), Source(f"{ff}.up_proj.weight")]
        out[f"{d}.mlp.down_proj.weight"] = [Source(f"{ff}.down_proj.weight", g1)]
        if cfg.mlp_bias:
            out[f"{d}.mlp.gate_up_proj.bias"] = [Source(f"{ff}.gate_proj.bias", g0), Source(f"{ff}.up_proj.bias")]
            out[f"{d}.mlp.down_proj.bias"] = [Source(f"{ff}.down_proj.bias", g1)]
    out["final_layernorm.weight"] = [Source("model.final_layernorm.weight")]
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    out["lm_head.weight"] = [Source(head, cfg.lm_head_multiplier)]
    return out


def mup_vector(cfg: FalconH1Config) -> torch.Tensor:
    """transformers' compute_mup_vector: a non-persistent buffer, rebuilt from the config."""
    return torch.cat([
        torch.full((n,), m, dtype=torch.float32) for n, m in zip(cfg.in_proj_splits, cfg.ssm_multipliers)
    ])


def deploy_tensor_shapes(cfg: FalconH1Config) -> dict[str, tuple[int, ...]]:
    """Shapes of every deploy tensor (the model loader validates against this)."""
    hf = hf_tensor_shapes(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, sources in deploy_sources(cfg).items():
        first = hf[sources[0].name]
        rows = sum(hf[s.name][0] for s in sources)
        if name.endswith("conv1d.weight"):
            shapes[name] = (cfg.conv_dim, cfg.mamba_d_conv)  # HF (C, 1, K), squeezed
        else:
            shapes[name] = (rows, *first[1:])
    return shapes


def deploy_dtype_of(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name.rsplit(".", 1)[-1] in FP32_TENSORS else dtype


def fold_rows(reader: SafetensorsReader, sources: list[Source], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Fold each source's rows in fp32 and cast, a chunk at a time."""
    for src in sources:
        shape = reader.info(src.name).shape
        row_bytes = 4 * math.prod(shape[1:])
        for start, end in row_chunks(shape[0], row_bytes):
            t = reader.get_rows(src.name, start, end).float()
            if src.scale != 1.0:
                t.mul_(src.scale)
            if src.row_scale is not None:
                rs = src.row_scale[start:end]
                t.mul_(rs.view(-1, *([1] * (t.dim() - 1))))
            if t.dim() == 3:  # conv1d.weight (C, 1, K) -> (C, K)
                t = t.squeeze(1)
            yield t.to(dtype)


def deploy_config_dict(cfg: FalconH1Config, dtype: str, source: Path, records: dict[str, Any] | None = None) -> dict:
    """config.json of a deploy checkpoint: the folded config plus trtfalcon's format record (and the records the
    source format adds, e.g. FP8's "quantization")."""
    deploy_cfg = cfg.without_multipliers().to_hf_dict()
    deploy_cfg["torch_dtype"] = lookup(dtype, among=FLOAT_NAMES).long
    deploy_cfg["trtfalcon"] = {
        "format": "deploy", "version": DEPLOY_FORMAT_VERSION, "dtype": dtype, "folded_multipliers": True,
        "fused": {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]},
        "source": str(source), **(records or {}),
    }
    return deploy_cfg


def is_deploy_checkpoint(directory: str | Path) -> bool:
    try:
        raw = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("trtfalcon"), dict) and raw["trtfalcon"].get("format") == "deploy"


def copy_side_files(source: Path, out: Path) -> None:
    """Copy the SIDE_FILES `source` has into `out`, keeping any `out` already has (ModelOpt's exporter writes its
    own generation_config.json)."""
    for name in SIDE_FILES:
        if (source / name).is_file() and not (out / name).exists():
            shutil.copy2(source / name, out / name)


# A tensor's producer: its dim-0 pieces in order, one row chunk at a time (a scalar is one piece).
Producer = Callable[[], Iterable[torch.Tensor]]


@dataclass
class DeployPlan:
    """A deploy checkpoint before any tensor is computed: every tensor's spec, in checkpoint order, and its
    producer, plus what config.json's "trtfalcon" record and the safetensors headers add for this source format."""

    config: FalconH1Config  # the source's config, multipliers not folded yet
    specs: list[TensorSpec]
    producers: dict[str, Producer]
    records: dict[str, Any] = field(default_factory=dict)  # e.g. {"quantization": {...}} (deploy_fp8.py)
    metadata: dict[str, str] = field(default_factory=dict)  # extra safetensors __metadata__, e.g. quantization

    def produce(self, spec: TensorSpec) -> Iterable[torch.Tensor]:
        return self.producers[spec.name]()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every deploy tensor in memory: how model.weights folds an HF checkpoint on the fly."""
        out = {}
        for spec in self.specs:
            pieces = list(self.produce(spec))
            out[spec.name] = pieces[0] if spec.shape == () else torch.cat(pieces)
        return out
