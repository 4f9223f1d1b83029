"""The Executor protocol: what the scheduler needs from a backend (torch, onnxruntime, TensorRT, or none).

An executor owns the cache pools (contract.CacheSpec.allocate on its device) and runs one step of the contract.
The scheduler owns only indices into those pools, so any backend plugs in without changing it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from trtfalcon.runtime.contract import CacheSpec, StepBatch


@runtime_checkable
class Executor(Protocol):
    cache_spec: CacheSpec
    vocab_size: int

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Run one step; return fp32 logits (num_seqs, vocab_size) for the last token of each sequence.

        The batch's tensors are views of the scheduler's reusable host buffers: valid until the next call, so
        copy them (e.g. `batch.to(device)`) rather than keeping them. Logits may stay on the executor's device;
        the sampler works where they are and copies out only token ids and the requested top-k log-probs. They
        may be a view of the executor's own buffer (a CUDA graph's output), valid until the next call.
        """
        ...

    def copy_slot(self, src: int, dst: int) -> None:
        """Copy Mamba state slot `src` into `dst` in every layer's conv_state and ssm_state (a fork)."""
        ...

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy KV block src into dst for every (src, dst) pair, in every layer's kv_cache (a fork's last block)."""
        ...


class TorchPools:
    """copy_slot / copy_blocks for executors whose cache pools are torch tensors named as in the contract
    (`CacheSpec.allocate`): the torch, onnxruntime and TensorRT executors all keep them that way."""

    cache_spec: CacheSpec
    pools: dict[str, torch.Tensor]

    def copy_slot(self, src: int, dst: int) -> None:
        for i in range(self.cache_spec.num_layers):
            for kind in ("conv_state", "ssm_state"):
                pool = self.pools[f"{kind}.{i}"]
                pool[dst].copy_(pool[src])

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        device = self.pools["kv_cache.0"].device
        src = torch.tensor([s for s, _ in pairs], device=device)
        dst = torch.tensor([d for _, d in pairs], device=device)
        for i in range(self.cache_spec.num_layers):
            pool = self.pools[f"kv_cache.{i}"]
            pool[:, dst] = pool[:, src]
