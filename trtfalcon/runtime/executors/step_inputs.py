"""A step's six int32 inputs on the executor's device in ONE host-to-device copy, optionally padded to a batch size.

The scheduler fills host tensors (contract.StepBatch). Copying them one by one from pageable memory costs six
synchronous copies per step on a GPU; here they are written back to back into one pinned host buffer and copied
with one asynchronous copy into one device buffer, whose views are the step's inputs.

Padding (the CUDA graph of a decode bucket runs a fixed number of sequences): rows past the batch's own are
sequences of one token with context_lens 0 (start fresh: no state is read), token 0 at position 0, in the scratch
state slot, every block-table entry the scratch block. Their writes land only in that slot and block, which the
scheduler never hands out (the executor allocates one more of each than its cache spec says), and every op is
row-independent, so the real rows compute exactly what they would alone; their logits are dropped.
"""

from __future__ import annotations

import numpy as np
import torch

from trtfalcon.runtime.contract import STEP_INPUTS, StepBatch


def layout(num_tokens: int, num_seqs: int, width: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    """input name -> (offset, shape) in the packed int32 buffer, in the contract's order."""
    sizes = {"input_ids": (num_tokens,), "positions": (num_tokens,), "cu_seqlens": (num_seqs + 1,),
             "context_lens": (num_seqs,), "state_slots": (num_seqs,), "block_tables": (num_seqs, width)}
    out, offset = {}, 0
    for name in STEP_INPUTS:
        out[name] = (offset, sizes[name])
        offset += int(np.prod(sizes[name]))
    return out


def packed_size(num_tokens: int, num_seqs: int, width: int) -> int:
    return 2 * num_tokens + 3 * num_seqs + 1 + num_seqs * width


class StepInputBuffer:
    """Host staging (pinned on CUDA) + device buffer for the packed inputs; grows when a step needs more room.

    `views(...)` are device tensors at a fixed layout: a CUDA graph captured on them reads whatever the next
    `load` with the same sizes writes (`load` never reallocates once `reserve` has made room for those sizes).
    """

    def __init__(self, device: torch.device | str, scratch_slot: int = 0, scratch_block: int = 0):
        self.device = torch.device(device)
        self.scratch_slot, self.scratch_block = scratch_slot, scratch_block
        self._dev = torch.empty(0, dtype=torch.int32, device=self.device)
        self._host = self._dev if self.device.type == "cpu" else torch.empty(0, dtype=torch.int32)
        self._copied: torch.cuda.Event | None = None  # the last copy out of _host, if still in flight

    def reserve(self, size: int) -> None:
        if self._dev.numel() >= size:
            return
        self._dev = torch.empty(size, dtype=torch.int32, device=self.device)
        if self.device.type == "cpu":
            self._host = self._dev
        else:
            self._host = torch.empty(size, dtype=torch.int32, pin_memory=True)
            self._copied = None

    def views(self, num_tokens: int, num_seqs: int, width: int) -> StepBatch:
        self.reserve(packed_size(num_tokens, num_seqs, width))
        return StepBatch(**{name: self._dev[off: off + int(np.prod(shape))].view(shape)
                            for name, (off, shape) in layout(num_tokens, num_seqs, width).items()})

    def load(self, batch: StepBatch | None, num_seqs: int | None = None, width: int | None = None) -> StepBatch:
        """Copy `batch` (host int32 tensors; None = no sequences) to the device, padded to `num_seqs` sequences
        (default: the batch's own) and `width` block-table columns (default: the batch's); -> the device views."""
        n_tok = batch.num_tokens if batch is not None else 0
        n_seq = batch.num_seqs if batch is not None else 0
        seqs = n_seq if num_seqs is None else num_seqs
        pad = seqs - n_seq
        if pad < 0:
            raise ValueError(f"step inputs: batch of {n_seq} sequences does not fit in {seqs}")
        w = width if width is not None else (batch.block_tables.shape[1] if batch is not None else 1)
        if batch is not None and batch.block_tables.shape[1] > w:
            raise ValueError(f"step inputs: block_tables has {batch.block_tables.shape[1]} columns, room for {w}")
        tokens = n_tok + pad  # one token per padding sequence
        out = self.views(tokens, seqs, w)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy still reads the staging buffer
        host = self._host.numpy()
        lay = layout(tokens, seqs, w)

        def field(name: str) -> np.ndarray:
            off, shape = lay[name]
            return host[off: off + int(np.prod(shape))].reshape(shape)

        ids, pos, cu, ctx = field("input_ids"), field("positions"), field("cu_seqlens"), field("context_lens")
        slots, tables = field("state_slots"), field("block_tables")
        if batch is not None:
            ids[:n_tok] = batch.input_ids.numpy()
            pos[:n_tok] = batch.positions.numpy()
            cu[: n_seq + 1] = batch.cu_seqlens.numpy()
            ctx[:n_seq] = batch.context_lens.numpy()
            slots[:n_seq] = batch.state_slots.numpy()
            bw = batch.block_tables.shape[1]
            tables[:n_seq, :bw] = batch.block_tables.numpy()
            tables[:n_seq, bw:] = self.scratch_block  # never read: past every sequence's blocks
        else:
            cu[0] = 0
        ids[n_tok:] = 0
        pos[n_tok:] = 0
        cu[n_seq + 1:] = cu[n_seq] + np.arange(1, pad + 1, dtype=np.int32)
        ctx[n_seq:] = 0
        slots[n_seq:] = self.scratch_slot
        tables[n_seq:] = self.scratch_block
        if self.device.type != "cpu":
            size = packed_size(tokens, seqs, w)
            self._dev[:size].copy_(self._host[:size], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device))
        return out
