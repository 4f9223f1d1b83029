"""Pick and build an executor for the runtime from a checkpoint/engine directory and a few options.

The engine factory (LLMEngine.from_options: generate, bench, the demo, the server) comes through here, so a
backend is added in one place. RuntimeOptions lives in options.py (no torch there: the CLI reads it at import).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trtfalcon.config import FalconH1Config
from trtfalcon.errors import ConfigError
from trtfalcon.runtime.executors.base import Executor
from trtfalcon.runtime.options import RuntimeOptions

BACKENDS = ("torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class RuntimeLimits:
    """What the engine's scheduler may ask of an executor: the options, capped by what the executor can run (a
    TensorRT engine's optimization profile, its pools). generate, bench and serve all take their limits here."""

    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int


def runtime_limits(executor: Executor, opts: RuntimeOptions, cfg: FalconH1Config) -> RuntimeLimits:
    inf = float("inf")
    batch = int(min(opts.max_batch_size, executor.cache_spec.num_slots, getattr(executor, "max_batch_size", inf)))
    tokens = int(min(opts.max_num_tokens, getattr(executor, "max_num_tokens", inf)))
    batch = min(batch, tokens)  # every live sequence needs at least its decode token in a step
    engine_seq = getattr(executor, "max_seq_len", None)
    seq_len = min(opts.max_seq_len or engine_seq, engine_seq) if engine_seq else opts.resolved_max_seq_len(cfg)
    return RuntimeLimits(batch, max(tokens, batch), int(seq_len))


def _reject_ignored(backend: str, opts: RuntimeOptions, *names: str) -> None:
    """An option this backend cannot honour is an error, not silently dropped (its value is fixed elsewhere)."""
    defaults, flags = RuntimeOptions(), RuntimeOptions.flags()
    changed = [flags[n].name for n in names if getattr(opts, n) != getattr(defaults, n)]
    if changed:
        why = {"onnxruntime": "an ONNX export runs on the CPU with the dtypes it was exported with",
               "tensorrt": "an engine fixes its dtypes, KV block size and kernels when it is built"}[backend]
        raise ConfigError(f"{', '.join(changed)}: not used by the {backend} backend ({why}); leave "
                          f"{'it' if len(changed) == 1 else 'them'} at the default")


def default_kv_blocks(opts: RuntimeOptions, max_seq_len: int, block_bytes: int, state_bytes: int,
                        available: int | None, where: str) -> int:
    """Blocks for every sequence at full length (no preemption), but no more than fits in 90% of `available`
    memory after the Mamba state pools; at least one full-length sequence must fit, or the error says what does."""
    full = opts.max_batch_size * math.ceil(max_seq_len / opts.block_size)
    if available is None:
        return full
    budget = int(0.9 * available) - state_bytes
    fit = budget // block_bytes
    one_seq = math.ceil(max_seq_len / opts.block_size)
    if fit < one_seq:
        raise ConfigError(
            f"--max-seq-len {max_seq_len}: one sequence needs {one_seq} KV blocks ({one_seq * block_bytes / 2**30:.2f} "
            f"GiB) but {where} has {max(0, budget) / 2**30:.2f} GiB left after the weights and the Mamba state of "
            f"{opts.max_batch_size} slots; lower --max-seq-len / --max-batch-size or use an FP8 KV cache"
        )
    return min(full, fit)


def _available_memory(device: str) -> int | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    try:  # Linux: physical pages the kernel can hand out now
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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
        num_blocks = opts.num_blocks
        if num_blocks is None:  # size the pool from what the device has left once the weights are on it
            probe = TorchExecutor.cache_spec_for(weights, num_blocks=1, block_size=opts.block_size,
                                                 num_slots=opts.max_batch_size, kv_dtype=opts.kv_dtype,
                                                 ssm_dtype=opts.ssm_dtype)
            kv_bytes, state_bytes = probe.bytes_per_block(), probe.bytes() - probe.bytes_per_block()
            weight_bytes = 0 if opts.device == "cpu" else sum(t.numel() * t.element_size()
                                                               for t in weights.tensors.values())
            available = _available_memory(opts.device)
            num_blocks = default_kv_blocks(opts, max_seq_len, kv_bytes, state_bytes,
                                             None if available is None else available - weight_bytes, opts.device)
        executor = TorchExecutor(
            weights, num_blocks=num_blocks, block_size=opts.block_size, num_slots=opts.max_batch_size,
            device=opts.device, kernels=opts.kernels, kv_dtype=opts.kv_dtype, ssm_dtype=opts.ssm_dtype,
        )
        return executor, cfg
    if backend == "onnxruntime":
        # `checkpoint` is an export directory (trtfalcon export ... --dtype fp32): the graph, not the weights, runs
        from trtfalcon.export.onnx import load_export_config, read_manifest
        from trtfalcon.runtime.executors.onnxruntime import OnnxRuntimeExecutor

        _reject_ignored("onnxruntime", opts, "device", "dtype", "ssm_dtype")
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

        _reject_ignored("tensorrt", opts, "dtype", "ssm_dtype", "block_size", "kernels")
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
