"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with the step's inputs as its inputs.

A decode step (every sequence has one token) launches ~20 kernels per layer, ~900 for the 7B: launched one by
one from Python that costs more than the kernels themselves at batch 64. A CUDA graph replays them with one call.
Each bucket B (decode_buckets) has its own static inputs (a StepInputBuffer's device views: token ids, positions,
cu_seqlens, context lens, state slots, block tables of B sequences) captured into its graph; a step of n <= B
sequences is copied into them padded to B (step_inputs.py says why padding rows change nothing) and the graph
replayed; the logits of its n rows are returned. The kernels find their work from those tensors and their grids
from shapes (README: "grids come from shapes"), so one capture serves every context length and slot assignment.

Prefill and mixed steps run eagerly (their token counts vary too much to bucket). Graphs are captured for a
block-table width the first time a decode step of that width arrives, every bucket at once, largest first, all
sharing one memory pool. A capture runs only padding rows, so it touches only the scratch slot and block: it may
happen with sequences live in the pools.

`EagerReplay` stands in for torch.cuda.CUDAGraph where there is no GPU: it "replays" by running the function again
into the captured output buffer, so the bucketing, padding and static-buffer logic run, and are tested, on a CPU.
What only a GPU shows (the capture itself: no host sync or allocation outside the pool inside the forward) is
checked by tests/gpu/ and bench/gpu/check.sh.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trtfalcon.runtime.contract import StepBatch
from trtfalcon.runtime.executors.step_inputs import StepInputBuffer

Replay = Callable[[], None]
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Replay, torch.Tensor]]


def decode_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, then multiples of 8, and max_batch_size itself: a step pads at most 7 rows beyond 8."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, found {max_batch_size}")
    small = [b for b in (1, 2, 4) if b < max_batch_size]
    return tuple(sorted({*small, *range(8, max_batch_size, 8), max_batch_size}))


class EagerReplay:
    """A CUDA graph's semantics without a GPU: the output lives in one buffer that every replay overwrites."""

    def __call__(self, fn: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        out = fn()

        def replay() -> None:
            with torch.inference_mode():  # the model's outputs are inference tensors
                out.copy_(fn())

        return replay, out


class CudaGraphCapture:
    """torch.cuda.CUDAGraph capture: warm-up runs on a side stream (compiles the Triton kernels, creates cuBLAS
    handles), then the capture; every graph of one executor shares one memory pool (captured largest first)."""

    WARMUP_RUNS = 2

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, fn: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_RUNS):
                fn()
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph.replay, out


@dataclass
class _Bucket:
    inputs: StepInputBuffer
    replay: Replay
    logits: torch.Tensor


class DecodeGraphs:
    """forward(batch) -> logits, captured per (bucket, block-table width) and replayed for decode steps.

    scratch_slot / scratch_block: the state slot and KV block padding rows write (allocated beyond the scheduler's).
    """

    def __init__(self, forward: Callable[[StepBatch], torch.Tensor], buckets: tuple[int, ...], device: torch.device,
                 *, scratch_slot: int, scratch_block: int, capture: Capture | None = None):
        self.forward = forward
        self.buckets = tuple(sorted(buckets))
        self.device = device
        self.scratch_slot, self.scratch_block = scratch_slot, scratch_block
        self.capture = capture or (CudaGraphCapture(device) if device.type == "cuda" else EagerReplay())
        self._graphs: dict[tuple[int, int], _Bucket] = {}
        self.replays = 0  # decode steps run through a graph
        self.captures = 0

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest bucket holding num_seqs sequences; None past the largest."""
        i = bisect.bisect_left(self.buckets, num_seqs)
        return self.buckets[i] if i < len(self.buckets) else None

    def runs(self, batch: StepBatch) -> bool:
        """True for a decode step (one token per sequence) that fits a bucket."""
        return batch.num_tokens == batch.num_seqs and self.bucket(batch.num_seqs) is not None

    def capture_width(self, width: int) -> None:
        """Capture every bucket's graph for block tables `width` wide (largest first: smaller ones reuse its pool)."""
        for b in reversed(self.buckets):
            if (b, width) in self._graphs:
                continue
            inputs = StepInputBuffer(self.device, self.scratch_slot, self.scratch_block)
            static = inputs.load(None, num_seqs=b, width=width)  # every row padding: touches scratch memory only
            replay, logits = self.capture(lambda static=static: self.forward(static))
            self._graphs[(b, width)] = _Bucket(inputs, replay, logits)
            self.captures += 1

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Logits (num_seqs, vocab) of a decode step: a view of the graph's output, valid until its next replay."""
        n, width = batch.num_seqs, int(batch.block_tables.shape[1])
        b = self.bucket(n)
        if b is None or batch.num_tokens != n:
            raise ValueError(f"decode graphs: a step of {batch.num_tokens} tokens for {n} sequences is not a decode "
                             f"step within the largest bucket ({self.buckets[-1]})")
        if (b, width) not in self._graphs:
            self.capture_width(width)
        entry = self._graphs[(b, width)]
        entry.inputs.load(batch, num_seqs=b, width=width)
        entry.replay()
        self.replays += 1
        return entry.logits[:n]
