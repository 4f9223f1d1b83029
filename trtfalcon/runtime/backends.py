"""Pick and build an executor for the runtime from a checkpoint/engine directory and a few options.

The CLI (generate, bench, demo) and the server all come through here, so a backend is added in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trtfalcon.config import FalconH1Config
from trtfalcon.errors import ConfigError
from trtfalcon.runtime.executors.base import Executor

BACKENDS = ("torch", "onnxruntime", "tensorrt")
KERNELS = ("auto", "torch", "reference", "triton")


@dataclass(frozen=True)
class RuntimeOptions:
    """What sizes the caches and the batches. Defaults suit the tiny model on a CPU."""

    max_batch_size: int = 64
    max_num_tokens: int = 512
    max_seq_len: int | None = None  # default: the model's max_position_embeddings, capped at 4096 on CPU
    block_size: int = 16
    num_blocks: int | None = None  # default: every sequence at full length (no preemption)
    kv_dtype: str | None = None  # None / "auto": the weights' dtype (torch) or the export's; "fp8": FP8 KV cache
    ssm_dtype: str = "fp32"
    device: str = "cpu"
    kernels: str = "auto"
    dtype: str | None = None  # weights' compute dtype; default: the checkpoint's (fp32 for an HF checkpoint)
    num_threads: int | None = None  # CPU threads; default: 1 for tiny models (parallel overhead dominates)

    def resolved_max_seq_len(self, cfg: FalconH1Config) -> int:
        cap = cfg.max_position_embeddings if self.device != "cpu" else min(cfg.max_position_embeddings, 4096)
        return self.max_seq_len or cap


def _check_fixed_kv_dtype(opts: RuntimeOptions, graph_kv: str, what: str, how: str) -> None:
    """An ONNX export or an engine fixes its KV pools' dtype: --kv-cache-dtype may only confirm it."""
    if opts.kv_dtype not in (None, "auto") and opts.kv_dtype != graph_kv:
        raise ConfigError(f"--kv-cache-dtype {opts.kv_dtype}: {what} takes {graph_kv} KV cache pools, fixed when it "
                          f"was made; pass --kv-cache-dtype auto, or {how}")


def create_executor(backend: str, checkpoint: str | Path, opts: RuntimeOptions) -> tuple[Executor, FalconH1Config]:
    if backend == "torch":
        from trtfalcon.model.weights import load_weights
        from trtfalcon.runtime.executors.torch import TorchExecutor

        weights = load_weights(checkpoint, opts.dtype)
        cfg = weights.config
        if opts.device == "cpu":
            threads = opts.num_threads or (1 if cfg.num_parameters() < 50_000_000 else None)
            if threads:
                torch.set_num_threads(threads)
        max_seq_len = opts.resolved_max_seq_len(cfg)
        num_blocks = opts.num_blocks or opts.max_batch_size * math.ceil(max_seq_len / opts.block_size)
        executor = TorchExecutor(
            weights, num_blocks=num_blocks, block_size=opts.block_size, num_slots=opts.max_batch_size,
            device=opts.device, kernels=opts.kernels, kv_dtype=opts.kv_dtype, ssm_dtype=opts.ssm_dtype,
        )
        return executor, cfg
    if backend == "onnxruntime":
        # `checkpoint` is an export directory (trtfalcon export ... --dtype fp32): the graph, not the weights, runs
        from trtfalcon.export.onnx import load_export_config, read_manifest
        from trtfalcon.runtime.executors.onnxruntime import OnnxRuntimeExecutor

        manifest = read_manifest(checkpoint)  # a clear error when CHECKPOINT is not an export directory
        _check_fixed_kv_dtype(opts, manifest["cache_dtypes"]["kv_cache"], f"{checkpoint} (an ONNX export)",
                              "export the deploy checkpoint with `trtfalcon export ... --kv-cache-dtype fp8`")
        cfg = load_export_config(checkpoint)
        max_seq_len = opts.resolved_max_seq_len(cfg)
        num_blocks = opts.num_blocks or opts.max_batch_size * math.ceil(max_seq_len / opts.block_size)
        executor = OnnxRuntimeExecutor(checkpoint, num_blocks=num_blocks, block_size=opts.block_size,
                                       num_slots=opts.max_batch_size, num_threads=opts.num_threads,
                                       kernels=opts.kernels)
        return executor, cfg
    if backend == "tensorrt":
        # `checkpoint` is a `trtfalcon build` directory (or its engine/): sizes come from the engine's profile
        from trtfalcon.runtime.executors.tensorrt import TensorRTExecutor, default_num_blocks, read_engine_manifest

        _, manifest, cfg = read_engine_manifest(checkpoint)
        _check_fixed_kv_dtype(opts, manifest["cache_dtypes"]["kv_cache"], f"{checkpoint} (an engine)",
                              "build with a config whose precision.kv_cache is fp8")
        rt = manifest["runtime"]
        max_seq_len = min(opts.max_seq_len or rt["max_seq_len"], rt["max_seq_len"])
        batch = min(opts.max_batch_size, rt["max_batch_size"])
        executor = TensorRTExecutor(
            checkpoint, num_blocks=opts.num_blocks or default_num_blocks(manifest, max_seq_len, batch),
            num_slots=batch, device=opts.device if opts.device != "cpu" else "cuda",
        )
        return executor, cfg
    raise ValueError(f"backend: expected one of {BACKENDS}, found {backend!r}")
