"""Deploy weights in memory: loaded from a deploy checkpoint, or folded on the fly from an HF checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from trtfalcon.checkpoint.convert import plan_deploy
from trtfalcon.checkpoint.deploy import is_deploy_checkpoint
from trtfalcon.checkpoint.deploy_fp8 import FP8_DTYPE, dequantize_weight
from trtfalcon.checkpoint.deploy_reader import open_deploy_checkpoint
from trtfalcon.checkpoint.safetensors_io import torch_dtype
from trtfalcon.config import FalconH1Config


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
    """A deploy checkpoint as written (dtype default: the one it was written in; FP8 weights stay float8), or an HF
    checkpoint folded and fused in memory (dtype default: fp32)."""
    if is_deploy_checkpoint(directory):
        ckpt = open_deploy_checkpoint(directory)  # the exporter's reader: what loads here also exports
        compute = torch_dtype(dtype or ckpt.stored_dtype)
        return DeployWeights(ckpt.config, ckpt.tensors(compute), compute)
    return fold_hf(directory, dtype or "fp32")


def fold_hf(directory: str | Path, dtype: str = "fp32") -> DeployWeights:
    """An HF checkpoint of any source format convert reads, folded in memory into exactly the tensors convert
    would write (the same plan; ModelOpt FP8 weights stay FP8)."""
    plan = plan_deploy(directory, dtype)
    return DeployWeights(plan.config.without_multipliers(), plan.tensors(), torch_dtype(dtype))
