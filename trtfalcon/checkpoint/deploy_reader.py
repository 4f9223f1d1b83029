"""The one reader of a deploy checkpoint (deploy.py's format): validated up front, then read a tensor (or a row chunk)
at a time. The model loader (model/weights.py) and the ONNX exporter (export/onnx.py) both open checkpoints here,
so that nothing loads that would not export, and the other way round.

Everything that can be wrong with the input is found when it is opened, before a tensor is read: not a deploy
checkpoint, wrong format version, a multiplier not folded, a stored dtype outside the vocabulary, a missing /
misshapen / extra tensor, a tensor that is not floating point, A_log / D / dt_bias not fp32, an FP8 linear without
its scales, an FP8 tensor where FP8 is not allowed (conv1d, lm_head, norms, embeddings), FP8 KV-cache scales that
are missing or misshapen.

FP8 follows deploy_fp8.py, the one definition of the format: config.json's "trtfalcon.quantization" says which
linears are FP8 (QUANTIZED_LINEARS of every layer minus exclude_modules), and each FP8 linear X has X.weight
(float8_e4m3fn, rows x cols), X.weight_scale (fp32, (rows,)), X.input_scale (fp32, ()). "kv_cache_quant_algo": "FP8"
adds layers.{i}.attn.k_scale / v_scale (fp32, ()), which an FP8 KV cache reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trtfalcon.checkpoint.deploy import deploy_dtype_of, deploy_tensor_shapes, is_deploy_checkpoint
from trtfalcon.checkpoint.deploy_fp8 import (
    FP8_DTYPE, KV_SCALES, QUANTIZED_LINEARS, fp8_tensor_specs, kv_cache_fp8, quantized_linears,
)
from trtfalcon.checkpoint.safetensors_io import SafetensorsReader, row_chunks
from trtfalcon.config import DEPLOY_FORMAT_VERSION, FalconH1Config
from trtfalcon.dtypes import FLOAT_NAMES, lookup
from trtfalcon.errors import CheckpointError


@dataclass
class DeployCheckpoint:
    """A validated deploy checkpoint: its config (every multiplier 1.0), its "trtfalcon" record and its tensors."""

    directory: Path
    config: FalconH1Config
    raw_config: dict
    stored_dtype: str  # the deploy dtype the checkpoint was written in (bf16, fp16, fp32)
    reader: SafetensorsReader
    fp8_linears: tuple[str, ...]  # e.g. "layers.0.attn.qkv_proj", in checkpoint order
    fp8_specs: dict[str, tuple[tuple[int, ...], torch.dtype]]  # what FP8 adds or retypes (deploy_fp8.fp8_tensor_specs)
    names: tuple[str, ...]  # every tensor, in checkpoint order (deploy_tensor_shapes, then what FP8 adds)

    @property
    def is_fp8(self) -> bool:
        return bool(self.fp8_linears)

    @property
    def has_kv_scales(self) -> bool:
        """Every layer's attn.k_scale / v_scale is present (validated): an FP8 KV cache can be run or exported."""
        return kv_cache_fp8(self.raw_config["trtfalcon"].get("quantization"))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.info(name).dtype

    def dtype_at(self, name: str, compute: torch.dtype) -> torch.dtype:
        """The dtype tensor `name` takes in a model computing in `compute`: FP8 weights and their fp32 scales as
        stored, A_log / D / dt_bias fp32, everything else `compute`."""
        if name in self.fp8_specs:
            return self.fp8_specs[name][1]
        return deploy_dtype_of(name, compute)

    def tensors(self, compute: torch.dtype) -> dict[str, torch.Tensor]:
        """Every tensor in memory, each in its dtype_at(compute)."""
        return {name: self.reader.get(name).to(self.dtype_at(name, compute)) for name in self.names}

    def chunks(self, name: str, dtype: torch.dtype, budget: int = 64 * 2**20) -> Iterator[torch.Tensor]:
        """Tensor `name` cast to `dtype`, in dim-0 row chunks of at most `budget` working bytes (peak memory is
        one chunk, whatever the tensor's size). Scalars and FP8 tensors (already their final bytes) too."""
        info = self.reader.info(name)
        if len(info.shape) == 0:
            yield self.reader.get(name).to(dtype)
            return
        row_bytes = 4 * math.prod(info.shape[1:])
        for start, end in row_chunks(info.shape[0], row_bytes, budget):
            yield self.reader.get_rows(name, start, end).to(dtype)


def read_deploy_config(directory: str | Path) -> dict[str, Any]:
    """config.json of a deploy checkpoint as written (its "trtfalcon" record: format, version, dtype, quantization,
    ...), nothing else validated; a directory that is not a deploy checkpoint is an error saying what to run."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a deploy checkpoint from `trtfalcon convert`)")
    if not is_deploy_checkpoint(directory):
        what = ("has no config.json" if not cfg_path.is_file()
                else 'has no "trtfalcon": {"format": "deploy"} in config.json')
        raise CheckpointError(
            f"{directory}: not a deploy checkpoint ({what}). This reads the output of `trtfalcon convert`: run "
            f"`trtfalcon convert {directory} DEPLOY_DIR` (or `trtfalcon quantize` then convert, for FP8) first"
        )
    return json.loads(cfg_path.read_text())


def open_deploy_checkpoint(directory: str | Path) -> DeployCheckpoint:
    """The deploy checkpoint at `directory`, every tensor's header checked against its config (see the module's
    docstring for what is refused)."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    raw = read_deploy_config(directory)
    meta = raw["trtfalcon"]
    if meta.get("version") != DEPLOY_FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: trtfalcon.version is {meta.get('version')!r}, this trtfalcon reads "
                              f"{DEPLOY_FORMAT_VERSION}; re-run `trtfalcon convert`")
    cfg = FalconH1Config.from_hf_dict(raw, source=str(cfg_path))
    if cfg.has_multipliers:
        raise CheckpointError(f"{cfg_path}: a deploy checkpoint must have every multiplier at 1.0 (they are folded)")
    stored = str(meta.get("dtype", "bf16"))
    lookup(stored, among=FLOAT_NAMES, what=f"{cfg_path}: trtfalcon.dtype", error=CheckpointError)
    quant = meta.get("quantization") or {}
    reader = SafetensorsReader(directory)
    reader.check_index()
    expected = deploy_tensor_shapes(cfg)
    for name, shape in expected.items():
        info = reader.info(name)  # names the missing tensor
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}, expected {list(shape)}")

    # FP8: which tensors the config's quantization record adds or retypes (one list, deploy_fp8.py)
    quant_specs = fp8_tensor_specs(expected, cfg.num_hidden_layers, quant or None, str(cfg_path))
    for name, (shape, dtype) in quant_specs.items():
        if name not in reader and name.endswith(KV_SCALES):
            raise CheckpointError(
                f"{directory}: no tensor '{name}' (expected {dtype} of shape {list(shape)}; config.json declares an "
                "FP8 KV cache, kv_cache_quant_algo 'FP8', which needs every layer's k_scale and v_scale); the "
                "checkpoint is incomplete: re-run `trtfalcon quantize --kv-cache-dtype fp8` / `trtfalcon convert`"
            )
        if name not in reader:
            linear = name.rsplit(".", 1)[0]
            raise CheckpointError(
                f"{directory}: FP8 linear '{linear}' has no '{name}' (expected {dtype} of shape {list(shape)}; "
                f"config.json declares FP8 quantization); the checkpoint is incomplete: re-run `trtfalcon quantize` "
                "/ `trtfalcon convert`"
            )
        info = reader.info(name)
        if info.shape != shape or info.dtype != dtype:
            raise CheckpointError(f"{info.file}: tensor '{name}' is {info.dtype} of shape {list(info.shape)}, "
                                  f"expected {dtype} of shape {list(shape)} (an FP8 deploy tensor)")
    for name in expected:
        info = reader.info(name)
        if name in quant_specs:
            continue
        if info.dtype == FP8_DTYPE:
            raise CheckpointError(
                f"{info.file}: tensor '{name}' is float8_e4m3fn, but config.json's trtfalcon.quantization does not "
                f"make it an FP8 linear (only {', '.join(QUANTIZED_LINEARS)} of each layer may be FP8; conv1d, "
                "norms, embeddings and lm_head stay in the deploy dtype: checkpoint/deploy_fp8.py)"
            )
        want = deploy_dtype_of(name, info.dtype)
        if lookup(info.dtype, "torch").name not in FLOAT_NAMES or (
                want == torch.float32 and info.dtype != torch.float32):
            raise CheckpointError(f"{info.file}: tensor '{name}' has dtype {info.dtype}, expected "
                                  f"{'float32' if want == torch.float32 else 'bf16, fp16 or fp32'}")
    extra = sorted(set(reader.tensors) - set(expected) - set(quant_specs))
    if extra:
        raise CheckpointError(f"{directory}: unexpected tensors {extra[:5]} for a deploy checkpoint of this config "
                              "(FP8 scales without FP8 in config.json, or a checkpoint of another shape)")
    fp8 = quantized_linears(cfg.num_hidden_layers, quant, str(cfg_path)) if quant else []
    names = (*expected, *(name for name in quant_specs if name not in expected))
    return DeployCheckpoint(directory, cfg, raw, stored, reader, tuple(fp8), quant_specs, names)
