"""The deploy checkpoint as the exporter reads it: validated up front, then streamed one tensor (chunk) at a time.

Everything that can be wrong with the input is found here, before a byte is written: not a deploy checkpoint,
wrong format version, a missing / misshapen / extra tensor, an FP8 linear without its scales, an FP8 tensor
where FP8 is not allowed (conv1d, lm_head, norms, embeddings), FP8 KV-cache scales that are missing or misshapen.

FP8 follows trtfalcon/checkpoint/deploy_fp8.py, the one definition of the format: config.json's
"trtfalcon.quantization" says which linears are FP8 (QUANTIZED_LINEARS of every layer minus exclude_modules), and
each FP8 linear X has X.weight (float8_e4m3fn, rows x cols), X.weight_scale (fp32, (rows,)), X.input_scale (fp32, ()).
"kv_cache_quant_algo": "FP8" adds layers.{i}.attn.k_scale / v_scale (fp32, ()), which an FP8 KV export feeds to the
paged-attention nodes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from trtfalcon.checkpoint.deploy import deploy_dtype_of, deploy_tensor_shapes, is_deploy_checkpoint
from trtfalcon.checkpoint.safetensors_io import SafetensorsReader, row_chunks, torch_dtype
from trtfalcon.config import DEPLOY_FORMAT_VERSION, FalconH1Config
from trtfalcon.dtypes import FLOAT_NAMES, lookup
from trtfalcon.errors import CheckpointError
from trtfalcon.checkpoint.deploy_fp8 import FP8_DTYPE, QUANTIZED_LINEARS, fp8_tensor_specs, quantized_linears


@dataclass
class DeploySource:
    directory: Path
    config: FalconH1Config
    raw_config: dict
    stored_dtype: str  # the deploy dtype the checkpoint was written in (bf16, fp16, fp32)
    reader: SafetensorsReader
    fp8_linears: tuple[str, ...]  # e.g. "layers.0.attn.qkv_proj", in checkpoint order

    @property
    def is_fp8(self) -> bool:
        return bool(self.fp8_linears)

    @property
    def has_kv_scales(self) -> bool:
        """Every layer's attn.k_scale / v_scale is present (validated): an FP8 KV cache can be exported."""
        return (self.raw_config["trtfalcon"].get("quantization") or {}).get("kv_cache_quant_algo") == "FP8"

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.info(name).dtype

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


def open_deploy_checkpoint(directory: str | Path) -> DeploySource:
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a deploy checkpoint from `trtfalcon convert`)")
    if not is_deploy_checkpoint(directory):
        what = ("has no config.json" if not cfg_path.is_file()
                else 'has no "trtfalcon": {"format": "deploy"} in config.json')
        raise CheckpointError(
            f"{directory}: not a deploy checkpoint ({what}). export reads the output of `trtfalcon convert`: run "
            f"`trtfalcon convert {directory} DEPLOY_DIR` (or `trtfalcon quantize` then convert, for FP8) first"
        )
    raw = json.loads(cfg_path.read_text())
    meta = raw["trtfalcon"]
    if meta.get("version") != DEPLOY_FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: trtfalcon.version is {meta.get('version')!r}, this trtfalcon reads "
                              f"{DEPLOY_FORMAT_VERSION}; re-run `trtfalcon convert`")
    cfg = FalconH1Config.from_hf_dict(raw, source=str(cfg_path))
    if cfg.has_multipliers:
        raise CheckpointError(f"{cfg_path}: a deploy checkpoint must have every multiplier at 1.0 (they are folded)")
    stored = str(meta.get("dtype", "bf16"))
    torch_dtype(stored)  # validates the name
    quant = meta.get("quantization") or {}
    reader = SafetensorsReader(directory)
    reader.check_index()
    expected = deploy_tensor_shapes(cfg)
    for name, shape in expected.items():
        info = reader.info(name)  # names the missing tensor
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}, expected {list(shape)}")

    # FP8: which tensors the config's quantization record adds or retypes (one list, checkpoint/deploy_fp8.py)
    quant_specs = fp8_tensor_specs(expected, cfg.num_hidden_layers, quant or None, str(cfg_path))
    for name, (shape, dtype) in quant_specs.items():
        if name not in reader and name.endswith(("attn.k_scale", "attn.v_scale")):
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
    return DeploySource(directory, cfg, raw, stored, reader, tuple(fp8))
