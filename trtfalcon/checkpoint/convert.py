"""HF Falcon-H1 checkpoint -> deploy checkpoint (deploy.py): the planner of its source format, then one writer.

plan_deploy chooses the planner by what the checkpoint declares: none (bf16/fp16/fp32 weights, dense.py) or
ModelOpt's quant_algo (QUANTIZED_PLANNERS; "FP8": fp8.py). A new source format (NVFP4) is one planner module and
one line there. The plan is then written by convert_checkpoint, or held in memory by DeployPlan.tensors (what
model.weights does with an HF checkpoint): the same tensors, byte for byte, either way.

Peak memory is one fp32 row chunk (64 MiB) plus its cast, whatever the model's size: tensors are read a row
range at a time and written straight into a pre-planned safetensors layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from trtfalcon.checkpoint.deploy import DeployPlan, copy_side_files, deploy_config_dict
from trtfalcon.checkpoint.dense import plan_dense_deploy
from trtfalcon.checkpoint.fp8 import plan_fp8_deploy
from trtfalcon.checkpoint.hf import is_quantized_hf_checkpoint, read_quant_config
from trtfalcon.checkpoint.safetensors_io import TensorSpec, atomic_output_dir, check_output_differs, write_sharded
from trtfalcon.errors import CheckpointError

Planner = Callable[[Path, str], DeployPlan]  # (HF checkpoint dir, deploy dtype name) -> its validated plan

# The planner of each quant_algo a quantized HF checkpoint may declare (hf.read_quant_config), as vLLM keys its
# quantized weight loaders by quant_method and TensorRT-LLM by QuantAlgo.
QUANTIZED_PLANNERS: dict[str, Planner] = {"FP8": plan_fp8_deploy}


def planner_for(hf_dir: Path) -> Planner:
    """The planner of the checkpoint's source format; a quantization with no planner is an error naming it."""
    if not is_quantized_hf_checkpoint(hf_dir):
        return plan_dense_deploy
    quant = read_quant_config(hf_dir)
    if quant.quant_algo not in QUANTIZED_PLANNERS:
        raise CheckpointError(f"{quant.source}: quant_algo is {quant.quant_algo!r}; trtfalcon reads "
                              f"{' or '.join(QUANTIZED_PLANNERS)} only (or an unquantized bf16/fp16/fp32 checkpoint)")
    return QUANTIZED_PLANNERS[quant.quant_algo]


def plan_deploy(hf_dir: str | Path, dtype: str) -> DeployPlan:
    """The deploy checkpoint of hf_dir in `dtype` (bf16, fp16, fp32), validated and planned, nothing computed."""
    hf_dir = Path(hf_dir)
    return planner_for(hf_dir)(hf_dir, dtype)


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
    check_output_differs(hf_dir, out_dir)
    plan = plan_deploy(hf_dir, dtype)
    if on_start is not None:
        on_start(sum(s.nbytes for s in plan.specs))
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_sharded(tmp, plan.specs, plan.produce, max_shard_bytes, on_tensor,
                      metadata={"producer": "trtfalcon convert", "format": "trtfalcon-deploy", **plan.metadata})
        deploy_cfg = deploy_config_dict(plan.config, dtype, hf_dir, plan.records)
        (tmp / "config.json").write_text(json.dumps(deploy_cfg, indent=2) + "\n")
        copy_side_files(hf_dir, tmp)
    return out_dir
