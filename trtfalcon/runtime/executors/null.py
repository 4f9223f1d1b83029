"""An executor that does no model work: for scheduler tests and the host-overhead benchmark.

Its "model" predicts token (last_token + 1) % vocab_size for each sequence, so tests can know every greedy token
in advance, and a step costs O(num_seqs) on the host whatever the vocabulary size (a persistent logits buffer in
which only the previous step's hot entries are cleared).
"""

from __future__ import annotations

import torch

from trtfalcon.runtime.contract import CacheSpec, StepBatch


def null_cache_spec(num_blocks: int, block_size: int, num_slots: int) -> CacheSpec:
    """A CacheSpec for index bookkeeping only; the null executor allocates no pools."""
    return CacheSpec(num_layers=0, num_blocks=num_blocks, block_size=block_size, num_kv_heads=1, head_dim=1,
                     num_slots=num_slots, conv_dim=1, conv_state_len=1, mamba_n_heads=1, mamba_d_head=1,
                     mamba_d_state=1)


class NullExecutor:
    def __init__(self, vocab_size: int, max_batch_size: int, cache_spec: CacheSpec) -> None:
        self.vocab_size = vocab_size
        self.cache_spec = cache_spec
        self._logits = torch.zeros(max_batch_size, vocab_size, dtype=torch.float32)
        self._hot = torch.zeros(max_batch_size, dtype=torch.int64)
        self._rows = torch.arange(max_batch_size)
        self._n = 0
        self.num_steps = 0

    def execute(self, batch: StepBatch) -> torch.Tensor:
        b = batch.num_seqs
        rows = self._rows[:b]
        self._logits[self._rows[: self._n], self._hot[: self._n]] = 0.0
        last = batch.input_ids[batch.cu_seqlens[1:].long() - 1].long()
        torch.remainder(last + 1, self.vocab_size, out=self._hot[:b])
        self._logits[rows, self._hot[:b]] = 1.0
        self._n = b
        self.num_steps += 1
        return self._logits[:b]

    def copy_slot(self, src: int, dst: int) -> None:
        pass

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        pass
