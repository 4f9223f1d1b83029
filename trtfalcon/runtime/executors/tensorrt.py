"""The TensorRT executor: runs a `trtfalcon build` engine on the engine I/O contract, on CUDA.

The engine's inputs are the contract's step inputs plus one pool per layer and kind (kv_cache.{i},
conv_state.{i}, ssm_state.{i}); each pool has an aliased output (kv_cache_out.{i}, ...) that the plugins update in
place. Both names are bound to the SAME device buffer, allocated once here by contract.CacheSpec exactly as the
torch executor allocates its pools, so the scheduler's block and slot indices mean the same thing with either
backend, and copy_slot / copy_blocks are the same tensor copies. A step binds the batch's tensors (copied to the
GPU), sets the dynamic shapes, and enqueues the engine on torch's current CUDA stream, so the sampler that reads
the logits is ordered after it without an extra synchronization.

A TensorRT 11 engine embeds its plugin kernels (ahead-of-time quickly deployable plugins), so running it needs
TensorRT's runtime and a GPU, not Triton or the plugin registration. A TensorRT for RTX engine (manifest "builder")
carries its kernels' PTX in Python IPluginV3 plugins, whose creators are registered here before it is deserialized
(plugins/tensorrt_rtx.py; they launch the PTX through the CUDA driver, no Triton or torch needed for that). TensorRT
is imported through trtfalcon/tensorrt_import.py, the one place that knows how to say what is missing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from trtfalcon.config import FalconH1Config
from trtfalcon.dtypes import KV_CACHE_NAMES, lookup
from trtfalcon.errors import CheckpointError, ConfigError, MissingDependencyError
from trtfalcon.runtime.contract import STEP_INPUTS, STEP_OUTPUTS, CacheSpec, StepBatch, cache_names, cache_output_name
from trtfalcon.runtime.executors.base import TorchPools


def engine_dir_of(path: str | Path) -> Path:
    """A build directory (OUT of `trtfalcon build`) or its engine/ subdirectory -> the engine directory."""
    from trtfalcon.engine.build import ENGINE_FILE, ENGINE_MANIFEST

    p = Path(path)
    for d in (p, p / "engine"):
        if (d / ENGINE_FILE).is_file() and (d / ENGINE_MANIFEST).is_file():
            return d
    record = p / "build.json"
    if record.is_file():
        stage = json.loads(record.read_text()).get("stages", {}).get("engine", {})
        if stage.get("status") == "missing":
            raise CheckpointError(f"{p}: the build stopped before the engine ({stage.get('reason')})")
    raise CheckpointError(f"{p}: no {ENGINE_FILE} + {ENGINE_MANIFEST} here or in {p / 'engine'}; build one with "
                          "`trtfalcon build --config ... --checkpoint ... --out DIR`")


def read_engine_manifest(path: str | Path) -> tuple[Path, dict[str, Any], FalconH1Config]:
    from trtfalcon.engine.build import ENGINE_FORMAT_VERSION, ENGINE_MANIFEST

    d = engine_dir_of(path)
    manifest = json.loads((d / ENGINE_MANIFEST).read_text())
    if manifest.get("version") != ENGINE_FORMAT_VERSION:
        raise CheckpointError(f"{d / ENGINE_MANIFEST}: version {manifest.get('version')!r}, this trtfalcon reads "
                              f"{ENGINE_FORMAT_VERSION}; rebuild the engine")
    return d, manifest, FalconH1Config.from_json_file(d / "config.json")


class TensorRTExecutor(TorchPools):
    """Executor protocol (executors/base.py) over a deserialized TensorRT engine."""

    def __init__(self, engine_path: str | Path, *, num_blocks: int | None = None, num_slots: int | None = None,
                 device: str | torch.device = "cuda"):
        self.engine_dir, self.manifest, cfg = read_engine_manifest(engine_path)
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise MissingDependencyError(f"the tensorrt backend runs on a CUDA GPU; none is available to torch "
                                         f"(device {device!r}, torch {torch.__version__})")
        from trtfalcon.engine.build import ENGINE_FILE
        from trtfalcon.tensorrt_import import TENSORRT, TENSORRT_RTX, import_tensorrt

        builder = (self.manifest.get("builder") or {}).get("name", TENSORRT.name)  # engines before RTX: TensorRT 11
        trt = import_tensorrt(builder)
        if builder == TENSORRT_RTX.name:
            from trtfalcon.plugins.tensorrt_rtx import register_rtx_plugins

            register_rtx_plugins(trt)  # the engine's plugin layers are re-created from these creators
        rt = self.manifest["runtime"]
        prof = self.manifest["profile"]
        max_blocks = prof["kv_cache.0"]["max"][1]
        max_slots = prof["ssm_state.0"]["max"][0]
        num_blocks = num_blocks or max_blocks
        num_slots = num_slots or max_slots
        if not 1 <= num_blocks <= max_blocks:
            raise ConfigError(f"num_blocks: the engine's profile allows 1..{max_blocks}, asked {num_blocks}")
        if not 1 <= num_slots <= max_slots:
            raise ConfigError(f"num_slots (max batch size): the engine allows 1..{max_slots}, asked {num_slots}")
        dt, what = self.manifest["cache_dtypes"], f"{self.engine_dir}: manifest cache_dtypes"
        self.cache_spec = CacheSpec.for_model(
            cfg, num_blocks=num_blocks, block_size=rt["kv_block_size"], num_slots=num_slots,
            kv_dtype=lookup(dt["kv_cache"], among=KV_CACHE_NAMES, what=what, error=CheckpointError).torch,
            conv_dtype=lookup(dt["conv_state"], among=KV_CACHE_NAMES, what=what, error=CheckpointError).torch,
            ssm_dtype=lookup(dt["ssm_state"], among=KV_CACHE_NAMES, what=what, error=CheckpointError).torch,
        )
        self.vocab_size = cfg.vocab_size
        # The engine's limits, which runtime.backends.runtime_limits hands to the scheduler.
        self.max_num_tokens = rt["max_num_tokens"]
        self.max_batch_size = min(rt["max_batch_size"], num_slots)
        self.max_seq_len = rt["max_seq_len"]
        self.max_blocks_per_seq = prof["block_tables"]["max"][1]
        self._num_layers = cfg.num_hidden_layers
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine((self.engine_dir / ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise CheckpointError(f"{self.engine_dir / ENGINE_FILE}: TensorRT {trt.__version__} cannot deserialize it "
                                  f"(built with TensorRT {self.manifest['versions'].get('tensorrt')} on "
                                  f"{(self.manifest.get('gpu') or {}).get('name')}; engines are GPU and version specific)")
        self.context = self.engine.create_execution_context()
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        expected = set(STEP_INPUTS) | set(STEP_OUTPUTS) | {
            n for p in cache_names(self._num_layers) for n in (p, cache_output_name(p))}
        if names != expected:
            raise CheckpointError(f"{self.engine_dir}: engine I/O {sorted(names ^ expected)[:4]} differs from the "
                                  "contract (runtime/contract.py); rebuild the engine")
        self.pools = self.cache_spec.allocate(self.device)
        for name, pool in self.pools.items():  # in-place updates: input and aliased output share one buffer
            self._set_shape(name, tuple(pool.shape))
            self.context.set_tensor_address(name, pool.data_ptr())
            self.context.set_tensor_address(cache_output_name(name), pool.data_ptr())

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):  # False: outside the optimization profile
            prof = self.manifest["profile"].get(name, {})
            raise ConfigError(f"{self.engine_dir}: input '{name}' of shape {list(shape)} is outside the engine's "
                              f"optimization profile (min {prof.get('min')}, max {prof.get('max')})")

    def execute(self, batch: StepBatch) -> torch.Tensor:
        if batch.num_tokens > self.max_num_tokens or batch.num_seqs > self.max_batch_size:
            raise ConfigError(f"step of {batch.num_tokens} tokens / {batch.num_seqs} sequences exceeds the engine's "
                              f"profile ({self.max_num_tokens} / {self.max_batch_size})")
        b = batch.to(self.device)
        if b.block_tables.shape[1] > self.max_blocks_per_seq:
            # Columns past a sequence's own blocks are padding no kernel reads; max_seq_len <= the engine's keeps
            # every sequence within the profile's width.
            b.block_tables = b.block_tables[:, : self.max_blocks_per_seq]
        keep = []
        for name in STEP_INPUTS:
            t = getattr(b, name).contiguous()
            keep.append(t)
            self._set_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        logits = torch.empty(batch.num_seqs, self.vocab_size, dtype=torch.float32, device=self.device)
        self.context.set_tensor_address("logits", logits.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.engine_dir}: TensorRT failed to enqueue the step")
        # `keep` holds the step inputs alive until the enqueue returned; the stream orders their reuse.
        return logits



def default_num_blocks(manifest: dict[str, Any], max_seq_len: int, max_batch_size: int) -> int:
    """Blocks for every sequence at full length, within what the engine's profile allows."""
    block = manifest["runtime"]["kv_block_size"]
    return min(manifest["profile"]["kv_cache.0"]["max"][1], max_batch_size * math.ceil(max_seq_len / block))
