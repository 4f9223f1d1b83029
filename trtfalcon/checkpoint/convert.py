"""HF Falcon-H1 checkpoint -> deploy checkpoint: muP multipliers folded, q/k/v and gate/up fused, streamed.

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
Every fold runs in fp32 on row chunks, then casts once. A_log, D and dt_bias stay fp32.

Peak memory is one fp32 row chunk (64 MiB) plus its cast, whatever the model's size: tensors are read a row
range at a time and written straight into a pre-planned safetensors layout.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from trtfalcon.checkpoint.hf import HFCheckpoint, hf_tensor_shapes
from trtfalcon.checkpoint.safetensors_io import (
    SafetensorsReader, TensorSpec, atomic_output_dir, row_chunks, torch_dtype, write_sharded,
)
from trtfalcon.config import DEPLOY_FORMAT_VERSION, FalconH1Config
from trtfalcon.dtypes import FLOAT_NAMES, lookup
from trtfalcon.errors import CheckpointError

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
    mup = _mup_vector(cfg)
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


def _mup_vector(cfg: FalconH1Config) -> torch.Tensor:
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


def convert_checkpoint(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bf16",
    max_shard_bytes: int = 2 * 2**30,
    overwrite: bool = False,
    on_tensor: Callable[[TensorSpec], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Path:
    """Write the deploy checkpoint of hf_dir into out_dir (atomically). Returns out_dir."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if hf_dir.resolve() == out_dir.resolve():
        raise CheckpointError(f"{out_dir}: the output directory must differ from the input checkpoint")
    from trtfalcon.checkpoint import fp8  # a ModelOpt FP8 checkpoint: same fold, FP8 weights kept (fp8.py)

    if fp8.is_quantized_hf_checkpoint(hf_dir):
        return fp8.convert_fp8_checkpoint(hf_dir, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                                          overwrite=overwrite, on_tensor=on_tensor, on_start=on_start)
    ckpt = HFCheckpoint(hf_dir)
    ckpt.validate()
    cfg = ckpt.config
    tdtype = torch_dtype(dtype)
    sources = deploy_sources(cfg)
    shapes = deploy_tensor_shapes(cfg)
    specs = [TensorSpec(name, shapes[name], deploy_dtype_of(name, tdtype)) for name in sources]
    if on_start is not None:
        on_start(sum(s.nbytes for s in specs))

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_sharded(
            tmp, specs, lambda s: fold_rows(ckpt.reader, sources[s.name], s.dtype), max_shard_bytes, on_tensor,
            metadata={"producer": "trtfalcon convert", "format": "trtfalcon-deploy"},
        )
        deploy_cfg = deploy_config_dict(cfg, dtype, hf_dir)
        (tmp / "config.json").write_text(json.dumps(deploy_cfg, indent=2) + "\n")
        for side in SIDE_FILES:
            if (hf_dir / side).is_file():
                shutil.copy2(hf_dir / side, tmp / side)
    return out_dir


def deploy_config_dict(cfg: FalconH1Config, dtype: str, source: Path) -> dict:
    """config.json of a deploy checkpoint: the folded config plus trtfalcon's format record."""
    deploy_cfg = cfg.without_multipliers().to_hf_dict()
    deploy_cfg["torch_dtype"] = lookup(dtype, among=FLOAT_NAMES).long
    deploy_cfg["trtfalcon"] = {
        "format": "deploy", "version": DEPLOY_FORMAT_VERSION, "dtype": dtype, "folded_multipliers": True,
        "fused": {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]},
        "source": str(source),
    }
    return deploy_cfg


def is_deploy_checkpoint(directory: str | Path) -> bool:
    try:
        raw = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("trtfalcon"), dict) and raw["trtfalcon"].get("format") == "deploy"
