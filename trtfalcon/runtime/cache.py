"""Cache managers: who owns which KV block and which Mamba state slot.

They hand out indices only; the pools themselves (contract.CacheSpec.allocate) belong to the executor. Copies that
sharing implies (a forked state slot, a shared partly-filled KV block) are returned as (src, dst) pairs for the
executor to perform, so the managers stay pure host bookkeeping and run the same for every backend.

`BlockManager.fork` / `StateSlotPool.fork` (with the executors' copy_blocks / copy_slot) let the n samples of one
prompt (SamplingParams.n, DeepConf's parallel traces) share its prefill: Scheduler.fork_samples uses them.

Block tables live in one int32 matrix (one row per sequence id) so that building a step's `block_tables` is a
single gather of rows, not a Python loop over sequences. The scheduler uses a sequence's state slot as its row:
both are owned by exactly one live sequence, so there are never more rows than slots.
"""

from __future__ import annotations

import numpy as np

from trtfalcon.errors import TrtFalconError


class CacheError(TrtFalconError, RuntimeError):
    """A cache manager misused: double free, an unknown sequence, or out of blocks/slots where the caller promised."""


class BlockManager:
    """Paged KV blocks: fixed pool of `num_blocks` blocks of `block_size` tokens, reference-counted.

    A block's reference count is the number of block tables that hold it; it returns to the free list when that
    reaches zero. Forked sequences (n samples of one prompt) share the prompt's full blocks; the partly-filled last
    block is copied at fork time (each sample writes different tokens into it).

    `watermark_blocks` are kept back from admissions (`can_allocate(..., admission=True)`) so running sequences can
    still grow by a block without immediately preempting someone.
    """

    def __init__(self, num_blocks: int, block_size: int, max_seqs: int, max_blocks_per_seq: int,
                 watermark_blocks: int = 0) -> None:
        if num_blocks < 1 or block_size < 1 or max_seqs < 1 or max_blocks_per_seq < 1:
            raise ValueError(
                f"BlockManager: expected num_blocks, block_size, max_seqs, max_blocks_per_seq >= 1, found "
                f"{num_blocks}, {block_size}, {max_seqs}, {max_blocks_per_seq}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_seqs = max_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.watermark_blocks = watermark_blocks
        # Free list as a stack: the most recently freed block is reused first (keeps the pool's hot end warm, and
        # makes tests exercise reuse).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)
        # block_tables[seq_id, i] = physical block of logical block i; entries past num_seq_blocks are stale
        # padding, never read by a correct kernel because they lie beyond the sequence's context.
        self.block_tables = np.zeros((max_seqs, max_blocks_per_seq), dtype=np.int32)
        self.num_seq_blocks = np.zeros(max_seqs, dtype=np.int32)
        self._live = np.zeros(max_seqs, dtype=bool)

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: int) -> list[int]:
        return self.block_tables[seq_id, : self.num_seq_blocks[seq_id]].tolist()

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """New blocks `seq_id` needs so that its table covers `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - int(self.num_seq_blocks[seq_id]))

    def can_allocate(self, num_blocks: int, admission: bool = False) -> bool:
        return len(self._free) - (self.watermark_blocks if admission else 0) >= num_blocks

    # ---- changes -------------------------------------------------------------------------------------------
    def open(self, seq_id: int) -> None:
        """Start an empty table for `seq_id`."""
        if self._live[seq_id]:
            raise CacheError(f"BlockManager.open: seq_id {seq_id} already has a block table")
        self._live[seq_id] = True
        self.num_seq_blocks[seq_id] = 0

    def grow(self, seq_id: int, num_tokens: int) -> bool:
        """Extend `seq_id`'s table to cover `num_tokens` tokens; False (and nothing taken) if blocks are short."""
        have = int(self.num_seq_blocks[seq_id])
        need = -(-num_tokens // self.block_size) - have
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        if have + need > self.max_blocks_per_seq:
            raise CacheError(
                f"BlockManager.grow: seq_id {seq_id} needs {have + need} blocks for {num_tokens} tokens, the "
                f"block table holds at most {self.max_blocks_per_seq}")
        if need == 1:  # the decode case: one block at a block boundary
            block = self._free.pop()
            self.block_tables[seq_id, have] = block
            self.ref_counts[block] = 1
        else:
            taken = self._free[-need:]
            del self._free[-need:]
            self.block_tables[seq_id, have: have + need] = taken
            self.ref_counts[taken] = 1
        self.num_seq_blocks[seq_id] = have + need
        return True

    def free(self, seq_id: int) -> None:
        """Drop `seq_id`'s table; blocks nobody else holds go back to the pool."""
        if not self._live[seq_id]:
            raise CacheError(f"BlockManager.free: seq_id {seq_id} has no block table (double free?)")
        n = int(self.num_seq_blocks[seq_id])
        if n:
            blocks = self.block_tables[seq_id, :n]
            self.ref_counts[blocks] -= 1  # a table never holds a block twice, so no duplicate indices here
            released = blocks[self.ref_counts[blocks] == 0]
            self._free.extend(released.tolist())
        self.num_seq_blocks[seq_id] = 0
        self._live[seq_id] = False

    def fork(self, src_seq_id: int, dst_seq_id: int, num_tokens: int) -> list[tuple[int, int]] | None:
        """Give `dst_seq_id` the KV of `src_seq_id`'s first `num_tokens` tokens.

        Full blocks are shared (reference count + 1). A partly-filled last block is copied into a fresh block,
        returned as [(src_block, dst_block)] for the executor to copy, because both sequences will write their
        own next tokens into it. Returns None (and changes nothing) when no block is free for that copy.
        """
        full, partial = divmod(num_tokens, self.block_size)
        if full + (partial > 0) > int(self.num_seq_blocks[src_seq_id]):
            raise CacheError(f"BlockManager.fork: seq_id {src_seq_id} holds fewer than {num_tokens} tokens")
        if partial and not self._free:
            return None
        self.open(dst_seq_id)
        shared = self.block_tables[src_seq_id, :full]
        self.block_tables[dst_seq_id, :full] = shared
        self.ref_counts[shared] += 1
        copies: list[tuple[int, int]] = []
        if partial:
            block = self._free.pop()
            self.ref_counts[block] = 1
            self.block_tables[dst_seq_id, full] = block
            copies.append((int(self.block_tables[src_seq_id, full]), block))
        self.num_seq_blocks[dst_seq_id] = full + (partial > 0)
        return copies

    def check_invariants(self) -> None:
        """Every block is either free (once) or held by exactly ref_count tables. O(pool); for tests."""
        held = np.zeros(self.num_blocks, dtype=np.int64)
        for s in np.flatnonzero(self._live):
            row = self.block_tables[s, : self.num_seq_blocks[s]]
            if len(set(row.tolist())) != len(row):
                raise CacheError(f"seq_id {s} holds a block twice: {row.tolist()}")
            np.add.at(held, row, 1)
        if not np.array_equal(held, self.ref_counts):
            bad = np.flatnonzero(held != self.ref_counts)[:5].tolist()
            raise CacheError(f"reference counts disagree with block tables at blocks {bad}")
        _check_free_list(self._free, self.ref_counts == 0, "a block", "the blocks with reference count 0")


class StateSlotPool:
    """Mamba conv/SSM state slots: each live sequence owns one.

    No reset on reuse is needed: the contract says a sequence whose context_len is 0 starts from zero state, and
    the scheduler always runs a sequence's first chunk with context_len 0. A fork (n samples of one prompt) does
    need the parent's state: `fork` returns (src, dst) for the executor to copy.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"StateSlotPool: expected num_slots >= 1, found {num_slots}")
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # stack: freed slots are reused first
        self.in_use = np.zeros(num_slots, dtype=bool)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheError(f"StateSlotPool: all {self.num_slots} slots are in use")
        slot = self._free.pop()
        self.in_use[slot] = True
        return slot

    def free(self, slot: int) -> None:
        if not self.in_use[slot]:
            raise CacheError(f"StateSlotPool.free: slot {slot} is not in use (double free?)")
        self.in_use[slot] = False
        self._free.append(slot)

    def fork(self, src_slot: int) -> tuple[int, int]:
        """A new slot for a copy of `src_slot`'s state; returns (src, dst) for the executor's copy_slot."""
        if not self.in_use[src_slot]:
            raise CacheError(f"StateSlotPool.fork: slot {src_slot} is not in use")
        return src_slot, self.allocate()

    def check_invariants(self) -> None:
        _check_free_list(self._free, ~self.in_use, "a state slot", "the slots not in use")


def _check_free_list(free: list[int], unused: np.ndarray, one: str, all_unused: str) -> None:
    """A pool's free list holds each of its unused indices (`unused`, a mask) once, and nothing else."""
    if len(set(free)) != len(free):
        raise CacheError(f"{one} is on the free list twice")
    if set(free) != set(np.flatnonzero(unused).tolist()):
        raise CacheError(f"free list is not exactly {all_unused}")
