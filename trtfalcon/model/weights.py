"""Deploy weights in memory: loaded from a deploy checkpoint, or folded on the fly from an HF checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trtfalcon.checkpoint.convert import plan_deploy
from trtfalcon.checkpoint.deploy import deploy_dtype_of, deploy_tensor_shapes, is_deploy_checkpoint
from trtfalcon.checkpoint.deploy_fp8 import FP8_DTYPE, dequantize_weight, fp8_tensor_specs
from trtfalcon.checkpoint.safetensors_io import SafetensorsReader, torch_dtype
from trtfalcon.config import DEPLOY_FORMAT_VERSION, FalconH1Config
from trtfalcon.errors import CheckpointError


@dataclass
class DeployWeights:
    """The tensors of a deploy checkpoint by name (layers.{i}.attn.qkv_proj.weight, ...) and their config.

    `config` has every multiplier at 1.0: they are folded into the tensors."""

    config: FalconH1Config
    tensors: dict[str, torch.Tensor]
    dtype: torch.dtype
    _dense: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def dense(self, name: str) -> torch.Tensor:
        """A weight in the compute dtype: FP8 weights are dequantized (weight * weight_scale per row) once and
        cached, which is what TensorRT's DequantizeLinear computes (trtfalcon.checkpoint.deploy_fp8)."""
        t = self.tensors[name]
        if t.dtype != FP8_DTYPE:
            return t
        if name not in self._dense:
            scale = self.tensors[name.removesuffix(".weight") + ".weight_scale"]
            self._dense[name] = dequantize_weight(t, scale, self.dtype)
        return self._dense[name]

    def to(self, device: torch.device | str) -> DeployWeights:
        return DeployWeights(self.config, {k: v.to(device) for k, v in self.tensors.items()}, self.dtype)


def load_weights(directory: str | Path, dtype: str | None = None) -> DeployWeights:
    """A deploy checkpoint as written, or an HF checkpoint folded and fused in memory (dtype default: fp32)."""
    directory = Path(directory)
    if is_deploy_checkpoint(directory):
        return _load_deploy(directory, dtype)
    return fold_hf(directory, dtype or "fp32")


def fold_hf(directory: str | Path, dtype: str = "fp32") -> DeployWeights:
    """An HF checkpoint of any source format convert reads, folded in memory into exactly the tensors convert
    would write (the same plan; ModelOpt FP8 weights stay FP8)."""
    plan = plan_deploy(directory, dtype)
    return DeployWeights(plan.config.without_multipliers(), plan.tensors(), torch_dtype(dtype))


def _load_deploy(directory: Path, dtype: str | None) -> DeployWeights:
    raw = json.loads((directory / "config.json").read_text())
    meta = raw["trtfalcon"]
    if meta.get("version") != DEPLOY_FORMAT_VERSION:
        raise CheckpointError(
            f"{directory / 'config.json'}: trtfalcon.version is {meta.get('version')!r}, this trtfalcon reads "
            f"{DEPLOY_FORMAT_VERSION}; re-run `trtfalcon convert`"
        )
    cfg = FalconH1Config.from_hf_dict(raw, source=str(directory / "config.json"))
    if cfg.has_multipliers:
        raise CheckpointError(f"{directory / 'config.json'}: a deploy checkpoint must have every multiplier at 1.0")
    stored = str(meta.get("dtype", "bf16"))
    tdtype = torch_dtype(dtype or stored)
    reader = SafetensorsReader(directory)
    reader.check_index()
    expected = deploy_tensor_shapes(cfg)
    # FP8 weights stay float8 and their scales fp32 (never cast to the compute dtype); checkpoint/deploy_fp8.py
    fp8 = fp8_tensor_specs(expected, cfg.num_hidden_layers, meta.get("quantization"), str(directory / "config.json"))
    tensors = {}
    for name in {**expected, **fp8}:
        shape, want = fp8.get(name) or (expected[name], deploy_dtype_of(name, tdtype))
        if name in fp8 and name not in reader:
            raise CheckpointError(f"{directory}: tensor '{name}' is missing (config.json declares FP8 "
                                  f"quantization, which needs it: checkpoint/deploy_fp8.py)")
        info = reader.info(name)
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}, expected {list(shape)}")
        if name in fp8 and info.dtype != want:
            raise CheckpointError(f"{info.file}: tensor '{name}' has dtype {info.dtype}, expected {want}")
        tensors[name] = reader.get(name).to(want)
    extra = sorted(set(reader.tensors) - set(expected) - set(fp8))
    if extra:
        raise CheckpointError(f"{directory}: unexpected tensors {extra[:5]} for a deploy checkpoint of this config")
    return DeployWeights(cfg, tensors, tdtype)
