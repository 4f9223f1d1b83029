"""bf16 / fp16 / fp32 Hugging Face Falcon-H1 checkpoints -> a DeployPlan (deploy.py): every deploy tensor folded
from its HF row blocks (deploy_sources) in fp32, one row chunk at a time, and cast once to the deploy dtype."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from trtfalcon.checkpoint.deploy import DeployPlan, deploy_dtype_of, deploy_sources, deploy_tensor_shapes, fold_rows
from trtfalcon.checkpoint.hf import HFCheckpoint
from trtfalcon.checkpoint.safetensors_io import TensorSpec, torch_dtype


def plan_dense_deploy(hf_dir: Path, dtype: str) -> DeployPlan:
    """The deploy checkpoint of a dense HF checkpoint, validated before anything is planned."""
    ckpt = HFCheckpoint(hf_dir)
    ckpt.validate()
    cfg = ckpt.config
    tdtype = torch_dtype(dtype)
    shapes = deploy_tensor_shapes(cfg)
    specs, producers = [], {}
    for name, sources in deploy_sources(cfg).items():
        spec = TensorSpec(name, shapes[name], deploy_dtype_of(name, tdtype))
        specs.append(spec)
        producers[name] = partial(fold_rows, ckpt.reader, sources, spec.dtype)
    return DeployPlan(cfg, specs, producers)
