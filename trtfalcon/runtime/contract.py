"""The engine I/O contract: one definition of a step's inputs and outputs.

A step runs a ragged batch: the tokens of several sequences concatenated (decode tokens of running sequences
and prefill chunks of new ones, in any mix). Export (graph inputs/outputs), the TensorRT builder (optimization
profiles) and every executor (torch, onnxruntime, tensorrt) derive their names, dtypes and shapes from here.

Symbolic dimensions:
    num_tokens   tokens in this step (1 .. max_num_tokens)
    num_seqs     sequences in this step (1 .. max_batch_size)
    max_blocks   width of the block table (max_seq_len / block_size)
    num_blocks   blocks in the paged KV pool;  num_slots: Mamba state slots in the state pool

Cache pools, one tensor per layer and kind (names `kv_cache.{i}`, `conv_state.{i}`, `ssm_state.{i}`):
    kv_cache.{i}:   (2, num_blocks, block_size, num_kv_heads, head_dim)   [0] keys, [1] values
    conv_state.{i}: (num_slots, conv_dim, d_conv - 1)
    ssm_state.{i}:  (num_slots, mamba_n_heads, mamba_d_head, mamba_d_state)
They are updated in place by the step (aliased inputs/outputs in the graph). The KV pools may be float8_e4m3fn
(an FP8 KV cache: rows hold fp8(k / k_scale), the layer's scales come from the checkpoint, not the contract).

A sequence with context_lens[b] == 0 starts fresh: its conv and SSM states are zeros whatever its slot held
before, so a reused slot never leaks another request's state and needs no separate reset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trtfalcon.config import FalconH1Config

# name -> (dtype, symbolic shape)
STEP_INPUTS: dict[str, tuple[torch.dtype, tuple[str, ...]]] = {
    "input_ids": (torch.int32, ("num_tokens",)),
    "positions": (torch.int32, ("num_tokens",)),  # context_lens[b] + i for token i of sequence b (RoPE)
    "cu_seqlens": (torch.int32, ("num_seqs+1",)),  # token offsets of each sequence; cu_seqlens[0] = 0
    "context_lens": (torch.int32, ("num_seqs",)),  # tokens of each sequence already in the caches
    "state_slots": (torch.int32, ("num_seqs",)),  # Mamba state slot of each sequence
    "block_tables": (torch.int32, ("num_seqs", "max_blocks")),  # physical KV block of each logical block
}
STEP_OUTPUTS: dict[str, tuple[torch.dtype, tuple[str, ...]]] = {
    "logits": (torch.float32, ("num_seqs", "vocab_size")),  # for the last token of each sequence in the step
}


def cache_names(num_layers: int) -> list[str]:
    return [f"{kind}.{i}" for i in range(num_layers) for kind in ("kv_cache", "conv_state", "ssm_state")]


def cache_output_name(pool: str) -> str:
    """The graph output aliasing pool `pool` (kv_cache.3 -> kv_cache_out.3): the same memory after the step, as
    the plugin outputs it aliases are named in each op's declaration (plugins/ops.py OPS: kv_cache_out,
    conv_state_out, ssm_state_out)."""
    kind, layer = pool.split(".")
    return f"{kind}_out.{layer}"


@dataclass
class StepBatch:
    """Host-side inputs of one step (int32 CPU tensors, as the contract names them)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    context_lens: torch.Tensor
    state_slots: torch.Tensor
    block_tables: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    def to(self, device: torch.device | str) -> StepBatch:
        return StepBatch(**{k: getattr(self, k).to(device, non_blocking=True) for k in STEP_INPUTS})

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in STEP_INPUTS}


@dataclass(frozen=True)
class CacheSpec:
    """Sizes and dtypes of the cache pools; the executor allocates them, the managers hand out their indices."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    num_slots: int
    conv_dim: int
    conv_state_len: int
    mamba_n_heads: int
    mamba_d_head: int
    mamba_d_state: int
    kv_dtype: torch.dtype = torch.float32
    conv_dtype: torch.dtype = torch.float32
    ssm_dtype: torch.dtype = torch.float32

    @classmethod
    def for_model(
        cls, cfg: FalconH1Config, *, num_blocks: int, block_size: int, num_slots: int,
        kv_dtype: torch.dtype, conv_dtype: torch.dtype, ssm_dtype: torch.dtype,
    ) -> CacheSpec:
        return cls(
            num_layers=cfg.num_hidden_layers, num_blocks=num_blocks, block_size=block_size,
            num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, num_slots=num_slots,
            conv_dim=cfg.conv_dim, conv_state_len=cfg.conv_state_len, mamba_n_heads=cfg.mamba_n_heads,
            mamba_d_head=cfg.mamba_d_head, mamba_d_state=cfg.mamba_d_state,
            kv_dtype=kv_dtype, conv_dtype=conv_dtype, ssm_dtype=ssm_dtype,
        )

    def kv_shape(self) -> tuple[int, ...]:
        return (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def conv_shape(self) -> tuple[int, ...]:
        return (self.num_slots, self.conv_dim, self.conv_state_len)

    def ssm_shape(self) -> tuple[int, ...]:
        return (self.num_slots, self.mamba_n_heads, self.mamba_d_head, self.mamba_d_state)

    def allocate(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Zeroed pools named as in the contract."""
        pools: dict[str, torch.Tensor] = {}
        for i in range(self.num_layers):
            pools[f"kv_cache.{i}"] = torch.zeros(self.kv_shape(), dtype=self.kv_dtype, device=device)
            pools[f"conv_state.{i}"] = torch.zeros(self.conv_shape(), dtype=self.conv_dtype, device=device)
            pools[f"ssm_state.{i}"] = torch.zeros(self.ssm_shape(), dtype=self.ssm_dtype, device=device)
        return pools

    def bytes_per_block(self) -> int:
        """K and V of one block in every layer."""
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    def bytes(self) -> int:
        def n(shape: tuple[int, ...], dt: torch.dtype) -> int:
            size = 1
            for s in shape:
                size *= s
            return size * torch.empty((), dtype=dt).element_size()

        return self.num_layers * (
            n(self.kv_shape(), self.kv_dtype) + n(self.conv_shape(), self.conv_dtype) + n(self.ssm_shape(), self.ssm_dtype)
        )
