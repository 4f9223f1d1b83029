"""Random Falcon-H1 checkpoints in Hugging Face format, written one tensor (chunk) at a time.

Weights cannot be downloaded here, so tests, benchmarks and the demo make their own. Each tensor's values depend
only on (seed, tensor name), not on write order or shard layout. Scales are chosen so that a random model's
activations stay O(1) through many layers (fan-in scaled linears) and so that every weight kind matters
(norm weights around 1, not exactly 1; Mamba's A_log / dt_bias / D initialised as in Mamba2).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from trtfalcon.checkpoint.hf import hf_tensor_shapes
from trtfalcon.checkpoint.safetensors_io import (
    TensorSpec, atomic_output_dir, row_chunks, torch_dtype, write_sharded,
)
from trtfalcon.config import FalconH1Config
from trtfalcon.dtypes import FLOAT_NAMES, lookup


def tensor_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def init_rows(name: str, shape: tuple[int, ...], gen: torch.Generator, rows: tuple[int, int]) -> torch.Tensor:
    """Rows [start, end) of tensor `name` (an HF name) in fp32, on the generator's device."""
    n = rows[1] - rows[0]
    sub = (n, *shape[1:])
    dev = gen.device
    leaf = name.rsplit(".", 1)[-1]
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
    if name.endswith("embed_tokens.weight"):
        return torch.randn(sub, generator=gen, device=dev)
    if "norm" in module or "layernorm" in module:
        return 1.0 + 0.1 * torch.randn(sub, generator=gen, device=dev)
    if leaf == "A_log":  # A = -exp(A_log) in [-16, -1]
        return torch.log(torch.empty(sub, device=dev).uniform_(1.0, 16.0, generator=gen))
    if leaf == "D":
        return 1.0 + 0.1 * torch.randn(sub, generator=gen, device=dev)
    if leaf == "dt_bias":  # softplus^-1 of dt ~ log-uniform(1e-3, 1e-1), Mamba2's init
        dt = torch.exp(torch.empty(sub, device=dev).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
        return dt + torch.log(-torch.expm1(-dt))
    if leaf == "bias":
        return 0.1 * torch.randn(sub, generator=gen, device=dev)
    if module == "conv1d":
        return torch.randn(sub, generator=gen, device=dev) / math.sqrt(shape[-1])
    fan_in = shape[-1]
    return torch.randn(sub, generator=gen, device=dev) / math.sqrt(fan_in)


def synth_checkpoint(
    config_dict: dict[str, Any],
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: str = "bf16",
    max_shard_bytes: int = 2 * 2**30,
    overwrite: bool = False,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> Path:
    """Write config.json + (sharded) safetensors for the given HF config dict. Returns out_dir."""
    cfg = FalconH1Config.from_hf_dict(config_dict, source="synth config")
    tdtype = torch_dtype(dtype)
    # A_log / D / dt_bias are fp32 in real checkpoints too; everything else in the requested dtype.
    specs = [
        TensorSpec(name, shape, torch.float32 if name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias") else tdtype)
        for name, shape in hf_tensor_shapes(cfg).items()
    ]

    def produce(spec: TensorSpec) -> Iterator[torch.Tensor]:
        gen = tensor_generator(seed, spec.name)
        row_bytes = 4 * math.prod(spec.shape[1:])
        for start, end in row_chunks(spec.shape[0], row_bytes):
            yield init_rows(spec.name, spec.shape, gen, (start, end)).to(spec.dtype)

    out = Path(out_dir)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        hf = dict(config_dict)
        hf["torch_dtype"] = lookup(dtype, among=FLOAT_NAMES).long
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        write_sharded(tmp, specs, produce, max_shard_bytes, on_tensor, metadata={"producer": "trtfalcon synth"})
    return out
