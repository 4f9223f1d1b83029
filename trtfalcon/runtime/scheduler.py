"""In-flight batching: which tokens of which sequences run in the next step, and the StepBatch that carries them.

Each step, in this order, within max_num_tokens tokens and max_batch_size sequences:
  1. decode: every running sequence that has all but its newest token cached contributes that token. Crossing a
     block boundary takes one KV block; when none is free the most recently admitted running sequence is preempted
     (recompute: its blocks and slot are freed and it goes back to the front of the queue with prompt + generated
     tokens as its new prompt; greedy decoding then reproduces exactly the tokens it would have produced).
  2. chunked prefill of running sequences whose prompt is not fully cached yet: the next chunk starts at
     context_len = tokens already cached; the conv/SSM states carry over in the sequence's slot.
  3. admission, first come first served: a waiting sequence joins when a state slot is free and the blocks for its
     whole prompt are (plus the watermark), and runs its first chunk with context_len 0 in this same step.
     No admission in a step that preempted (it would thrash: the freed blocks are exactly the ones needed).
Running sequences never exceed max_batch_size, so every running sequence decodes every step.

n samples of one prompt (SamplingParams.n > 1): sample 0 is queued and prefills the prompt like any request; the
other n-1 wait on it (in `live`, neither waiting nor running, `parent` = sample 0). In the step whose chunk
completes sample 0's prompt, after the executor ran and before anything is sampled, `fork_samples` gives each of
them a state slot (copy of sample 0's) and the prompt's KV blocks (full blocks shared by reference count, the
partly-filled last block copied), with num_computed = prompt length, and adds them to `running`; the engine then
samples each one's first token from sample 0's logits row with the sample's own generator. A sample that cannot
fork then (no free slot, no block for the copy, or the batch full) is not lost: it goes to the front of the queue as
an ordinary sequence and prefills the prompt itself. If sample 0 ends (cancelled, failed) before its prompt is
done, the next pending sample takes over its place and the rest of the group. After the fork the samples are
independent sequences: a preempted one recomputes prompt + its own tokens like any other.

A sequence uses its state slot as its row in the BlockManager's block-table matrix (see cache.py), so
block_tables for the step is one numpy gather. The StepBatch's tensors are views of buffers preallocated for
max_num_tokens / max_batch_size: valid until the next step. In block_tables, entries past a sequence's own
blocks are padding with unspecified values: a kernel reads only logical blocks below ceil((context_len + n) /
block_size).
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from trtfalcon.errors import RequestError
from trtfalcon.runtime.cache import BlockManager, StateSlotPool
from trtfalcon.runtime.contract import StepBatch
from trtfalcon.runtime.request import Request, RequestOutput, SamplingParams, TokenLogprobs
from trtfalcon.runtime.servable import SchedulerLimits, num_samples, request_problem


class Sequence:
    """A request while the scheduler holds it. `tokens` = prompt + generated; `num_computed` = context_len."""

    __slots__ = ("request_id", "params", "output", "tokens", "num_computed", "state_slot", "rng", "stop_ids",
                 "max_new_tokens", "finished", "group", "parent", "children")

    def __init__(self, request_id: str, params: SamplingParams, output: RequestOutput, stop_ids: frozenset[int],
                 rng: random.Random | None, group: str | None = None) -> None:
        self.request_id = request_id
        self.params = params
        self.output = output
        self.tokens: list[int] = list(output.prompt_ids)
        self.num_computed = 0
        self.state_slot = -1
        self.rng = rng
        self.stop_ids = stop_ids
        self.max_new_tokens = params.max_new_tokens
        self.finished = False
        self.group = group  # the request id of an n > 1 request, for its samples
        self.parent: Sequence | None = None  # set while this sample waits to fork from `parent`'s prefill
        self.children: list[Sequence] = []  # samples waiting to fork from this one's prefill


@dataclass
class ScheduledStep:
    """One step's work: `seqs[i]` runs `num_new[i]` tokens (row i of the batch and of the logits).

    `sample_rows` are the rows whose chunk reaches the end of their tokens: only those sample a token (a partial
    prefill chunk's logits are discarded, and must not draw from the request's generator). Token j is sampled from
    logits row sample_rows[j] for sequence sample_seqs[j]. Scheduler.fork_samples (after the step ran) appends the
    samples forked in this step, each with its parent's row (a row then appears more than once), and counts them
    in `num_forked`.
    """

    batch: StepBatch
    seqs: list[Sequence]
    num_new: list[int]
    sample_rows: list[int]
    sample_seqs: list[Sequence]
    num_decode: int
    num_prefill: int
    num_preempted: int
    num_forked: int = 0


class Scheduler:
    def __init__(self, *, vocab_size: int, max_batch_size: int, max_num_tokens: int, max_seq_len: int,
                 num_blocks: int, block_size: int, num_slots: int, watermark_blocks: int = 0,
                 eos_token_ids: tuple[int, ...] = (), seed: int = 0) -> None:
        if max_num_tokens < max_batch_size:
            raise ValueError(
                f"max_num_tokens: expected >= max_batch_size={max_batch_size} (every running sequence decodes "
                f"one token per step), found {max_num_tokens}")
        self.vocab_size = vocab_size
        self.max_batch_size = min(max_batch_size, num_slots)
        self.max_num_tokens = max_num_tokens
        self.max_seq_len = max_seq_len
        self.limits = SchedulerLimits(vocab_size=vocab_size, max_batch_size=self.max_batch_size,
                                      max_seq_len=max_seq_len, block_size=block_size, num_blocks=num_blocks,
                                      watermark_blocks=watermark_blocks)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_blocks_per_seq = -(-max_seq_len // block_size)
        self.blocks = BlockManager(num_blocks, block_size, num_slots, self.max_blocks_per_seq, watermark_blocks)
        self.slots = StateSlotPool(num_slots)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.live: dict[str, Sequence] = {}
        self.groups: dict[str, list[Sequence]] = {}  # request id of an n > 1 request in flight -> its samples
        self._num_parents = 0  # sequences with samples waiting to fork from them (0: fork_samples costs nothing)
        self._seed_rng = random.Random(seed)
        self.last_build_s = 0.0  # time of the last build_batch, for the step log

        # Reusable host buffers for the StepBatch (numpy for filling, torch views of the same memory for the
        # executor). _arange serves the positions of prefill chunks without allocating.
        self._input_ids = np.zeros(max_num_tokens, dtype=np.int32)
        self._positions = np.zeros(max_num_tokens, dtype=np.int32)
        self._cu_seqlens = np.zeros(self.max_batch_size + 1, dtype=np.int32)
        self._seqlens = np.zeros(self.max_batch_size, dtype=np.int32)
        self._context_lens = np.zeros(self.max_batch_size, dtype=np.int32)
        self._state_slots = np.zeros(self.max_batch_size, dtype=np.int32)
        self._block_tables = np.zeros((self.max_batch_size, self.max_blocks_per_seq), dtype=np.int32)
        self._arange = np.arange(max_seq_len + 1, dtype=np.int32)
        self._t = {name: torch.from_numpy(getattr(self, "_" + name)) for name in
                   ("input_ids", "positions", "cu_seqlens", "context_lens", "state_slots", "block_tables")}

    # ---- requests in and out -------------------------------------------------------------------------------
    def check(self, request: Request) -> str | None:
        """Why `request` can never be served, as a message naming it, what was expected and what was found: its
        id already in flight (this scheduler's state), else servable.request_problem against self.limits."""
        rid = request.request_id
        head = f"request {rid!r} rejected:"
        n = request.params.n
        if rid in self.live or rid in self.groups:
            return f"{head} request_id: expected one not in flight, found a running request with the same id"
        if isinstance(n, int) and n > 1 and any(f"{rid}/{k}" in self.live for k in range(n)):
            return f"{head} request_id: expected one whose sample ids {rid!r}/k are not in flight, found a " \
                   f"running request with such an id"
        problem = request_problem(request, self.limits)
        return None if problem is None else f"{head} {problem}"

    def add(self, request: Request, arrival_time: float) -> list[RequestOutput]:
        """Queue `request`: one output per sample (SamplingParams.n), in sample order.

        A request that can never be served comes back already finished with its error: n outputs (ids rid/k), or a
        single one with the request's own id when n itself is invalid.
        """
        prompt = list(request.prompt_ids) if not isinstance(request.prompt_ids, np.ndarray) \
            else request.prompt_ids.tolist()
        rid = request.request_id
        p = request.params
        n = num_samples(p, self.limits)
        if n == 1:
            outputs = [RequestOutput(request_id=rid, prompt_ids=prompt, arrival_time=arrival_time)]
        else:
            outputs = [RequestOutput(request_id=f"{rid}/{k}", prompt_ids=prompt, arrival_time=arrival_time,
                                     parent_id=rid, sample_index=k) for k in range(n)]
        problem = self.check(request)
        if problem is not None:
            now = time.perf_counter()
            for output in outputs:
                output.finish_reason = "error"
                output.error = str(RequestError(problem))
                output.finish_time = now
            return outputs
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        seqs = []
        for k, output in enumerate(outputs):
            if p.logprobs:
                output.logprobs = []
            rng = None
            if not p.greedy:
                rng = random.Random(p.seed + k if p.seed is not None else self._seed_rng.getrandbits(64))
            seq = Sequence(output.request_id, p, output, stop_ids, rng, rid if n > 1 else None)
            self.live[seq.request_id] = seq
            seqs.append(seq)
        first = seqs[0]
        self.waiting.append(first)
        if n > 1:
            self.groups[rid] = seqs
            first.children = seqs[1:]
            for seq in first.children:
                seq.parent = first
            self._num_parents += 1
        return outputs

    def cancel(self, request_id: str) -> list[RequestOutput]:
        """End a queued or running request now, freeing its blocks and slot; [] if it is not in flight.

        `request_id` names one sequence (a plain request, or one sample "rid/k" of an n > 1 request), or an n > 1
        request as a whole ("rid": every sample still in flight). Returns the outputs that ended.
        """
        seq = self.live.get(request_id)
        if seq is not None:
            self._end(seq, "cancelled", time.perf_counter())
            return [seq.output]
        group = self.groups.get(request_id)
        if group is None:
            return []
        now = time.perf_counter()
        ended = []
        for seq in reversed(group):  # waiting samples first, so sample 0 ends with nobody to hand its prompt to
            if not seq.finished:
                self._end(seq, "cancelled", now)
                ended.append(seq.output)
        ended.reverse()
        return ended

    def fail(self, seqs: list[Sequence], message: str) -> None:
        """End `seqs` with finish_reason "error" (an executor failure in their step); the others go on."""
        now = time.perf_counter()
        for seq in seqs:
            if not seq.finished:
                self._end(seq, "error", now, message)

    def _end(self, seq: Sequence, reason: str, now: float, error: str | None = None) -> None:
        """End a sequence wherever it is (running, waiting, or waiting to fork from its parent)."""
        at = 0
        if seq.state_slot >= 0:
            self.running.remove(seq)
        elif seq.parent is not None:
            seq.parent.children.remove(seq)
            if not seq.parent.children:
                self._num_parents -= 1
            seq.parent = None
        else:
            at = self.waiting.index(seq)
            del self.waiting[at]
        if seq.children:
            # Its prompt is not done yet: the next sample takes over its place in the queue and the rest of the
            # group (a running sequence was admitted before anyone waiting: the front).
            heir, *rest = seq.children
            seq.children = []
            heir.parent = None
            heir.children = rest
            for s in rest:
                s.parent = heir
            if not rest:
                self._num_parents -= 1
            self.waiting.insert(at, heir)
        self._finish(seq, reason, now, error)

    def _finish(self, seq: Sequence, reason: str, now: float, error: str | None = None) -> None:
        if seq.state_slot >= 0:
            self.blocks.free(seq.state_slot)
            self.slots.free(seq.state_slot)
            seq.state_slot = -1
        seq.finished = True
        del self.live[seq.request_id]
        if seq.group is not None:
            self._end_group_member(seq.group)
        out = seq.output
        out.finish_reason = reason
        out.error = error
        out.finish_time = now

    def _end_group_member(self, group: str) -> None:
        seqs = self.groups.get(group)
        if seqs is not None and all(s.finished for s in seqs):
            del self.groups[group]

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the caches, requeue at the front with prompt + generated as the prompt."""
        if self.running[-1] is seq:
            self.running.pop()
        else:
            self.running.remove(seq)
        self.blocks.free(seq.state_slot)
        self.slots.free(seq.state_slot)
        seq.state_slot = -1
        seq.num_computed = 0
        seq.output.num_preemptions += 1
        self.waiting.appendleft(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- one step ------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep | None:
        """Choose this step's sequences and chunks (see the module docstring); None when nothing can run."""
        blocks = self.blocks
        block_size = blocks.block_size
        num_seq_blocks = blocks.num_seq_blocks
        running = self.running
        seqs: list[Sequence] = []
        num_new: list[int] = []
        prefilling: list[Sequence] = []
        num_preempted = 0

        i = 0
        while i < len(running):
            seq = running[i]
            cached = seq.num_computed
            if len(seq.tokens) - cached != 1:
                prefilling.append(seq)
                i += 1
                continue
            if cached + 1 > int(num_seq_blocks[seq.state_slot]) * block_size:
                while not blocks.grow(seq.state_slot, cached + 1):
                    victim = running[-1]  # the most recently admitted; never one already in this step
                    self._preempt(victim)
                    num_preempted += 1
                    if victim is seq:
                        break
                if seq.state_slot < 0:
                    continue  # preempted itself: running[i] is now the next sequence
            seqs.append(seq)
            i += 1
        num_decode = len(seqs)
        num_new = [1] * num_decode
        budget = self.max_num_tokens - num_decode

        for seq in prefilling:
            if budget <= 0:
                break
            if seq.state_slot < 0:
                continue  # preempted above
            n = min(len(seq.tokens) - seq.num_computed, budget)
            seqs.append(seq)
            num_new.append(n)
            budget -= n

        if not num_preempted:
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < self.max_batch_size and self.slots.num_free:
                seq = waiting[0]
                pending = len(seq.tokens)
                if not blocks.can_allocate(blocks.blocks_for(pending), admission=True):
                    break  # first come first served: a later, smaller request does not overtake
                waiting.popleft()
                slot = self.slots.allocate()
                blocks.open(slot)
                blocks.grow(slot, pending)
                seq.state_slot = slot
                seq.num_computed = 0  # a fresh start in a possibly reused slot: context_len 0 zeroes its state
                running.append(seq)
                n = min(pending, budget)
                seqs.append(seq)
                num_new.append(n)
                budget -= n

        if not seqs:
            return None
        sample_rows = [r for r, (seq, n) in enumerate(zip(seqs, num_new)) if seq.num_computed + n == len(seq.tokens)]
        sample_seqs = seqs if len(sample_rows) == len(seqs) else [seqs[r] for r in sample_rows]
        t0 = time.perf_counter()
        batch = self.build_batch(seqs, num_new, num_decode)
        self.last_build_s = time.perf_counter() - t0
        return ScheduledStep(batch, seqs, num_new, sample_rows, sample_seqs, num_decode, len(seqs) - num_decode,
                             num_preempted)

    def fork_samples(self, step: ScheduledStep) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """After `step` ran: fork the samples waiting on a sequence whose prompt this step completed.

        Returns the state-slot and KV-block (src, dst) pairs for the executor's copy_slot / copy_blocks, to run
        before anything is sampled. Each forked sample joins `running` with the parent's num_computed and is
        appended to step.sample_rows (the parent's row) / step.sample_seqs. A sample that cannot fork now (no free
        slot or block, or the batch is full) goes to the front of the queue to prefill the prompt itself; the first
        such one of a group prefills for the others, which fork from it then.
        """
        slot_pairs: list[tuple[int, int]] = []
        block_pairs: list[tuple[int, int]] = []
        if not self._num_parents:
            return slot_pairs, block_pairs
        seqs, num_new = step.seqs, step.num_new
        if step.sample_seqs is seqs:
            step.sample_seqs = list(seqs)
        rows, sample_seqs = step.sample_rows, step.sample_seqs
        running, slots, blocks = self.running, self.slots, self.blocks
        for r in list(rows):
            parent = seqs[r]
            if not parent.children:
                continue
            children = parent.children
            parent.children = []
            self._num_parents -= 1
            num_tokens = parent.num_computed + num_new[r]  # the whole prompt, in the caches after this step
            left: list[Sequence] = []
            for child in children:
                child.parent = None
                if len(running) < self.max_batch_size and slots.num_free:
                    src, slot = slots.fork(parent.state_slot)
                    copies = blocks.fork(parent.state_slot, slot, num_tokens)
                    if copies is not None:
                        slot_pairs.append((src, slot))
                        block_pairs.extend(copies)
                        child.state_slot = slot
                        child.num_computed = num_tokens
                        running.append(child)
                        rows.append(r)
                        sample_seqs.append(child)
                        step.num_forked += 1
                        continue
                    slots.free(slot)
                left.append(child)
            if left:
                heir, *rest = left
                heir.children = rest
                for s in rest:
                    s.parent = heir
                if rest:
                    self._num_parents += 1
                self.waiting.appendleft(heir)
        return slot_pairs, block_pairs

    def build_batch(self, seqs: list[Sequence], num_new: list[int], num_decode: int) -> StepBatch:
        """Fill the contract's int32 inputs for `seqs` (decode rows first, each with one token)."""
        num_seqs = len(seqs)
        ids, pos, ctx, slots, seqlens = (self._input_ids, self._positions, self._context_lens, self._state_slots,
                                         self._seqlens)
        if num_decode:
            dec = seqs[:num_decode]
            ids[:num_decode] = [s.tokens[-1] for s in dec]
            ctx[:num_decode] = [s.num_computed for s in dec]
            slots[:num_decode] = [s.state_slot for s in dec]
            seqlens[:num_decode] = 1
            pos[:num_decode] = ctx[:num_decode]
        t = num_decode
        for b in range(num_decode, num_seqs):
            seq, n = seqs[b], num_new[b]
            c = seq.num_computed
            ids[t: t + n] = seq.tokens[c: c + n]
            pos[t: t + n] = self._arange[c: c + n]
            ctx[b] = c
            slots[b] = seq.state_slot
            seqlens[b] = n
            t += n
        np.cumsum(seqlens[:num_seqs], out=self._cu_seqlens[1: num_seqs + 1])
        # Copy only the columns some sequence of this step uses; the rest of each row is padding that no kernel
        # reads (it lies past the sequence's context), so stale values there are harmless and save the copy of
        # a full max_seq_len-wide table per step.
        width = int(self.blocks.num_seq_blocks[slots[:num_seqs]].max())
        np.take(self.blocks.block_tables[:, :width], slots[:num_seqs], axis=0,
                out=self._block_tables[:num_seqs, :width])
        v = self._t
        return StepBatch(input_ids=v["input_ids"][:t], positions=v["positions"][:t],
                         cu_seqlens=v["cu_seqlens"][: num_seqs + 1], context_lens=v["context_lens"][:num_seqs],
                         state_slots=v["state_slots"][:num_seqs], block_tables=v["block_tables"][:num_seqs])

    def update(self, step: ScheduledStep, token_ids: list[int], logprobs: list[TokenLogprobs | None] | None,
               now: float) -> list[Sequence]:
        """Advance the caches' bookkeeping and append sampled tokens; returns the sequences that got a token.

        token_ids[j] (and logprobs[j]) belong to step.sample_seqs[j]. Finished sequences release their
        blocks and slot here, before the next schedule.
        """
        seqs, num_new = step.seqs, step.num_new
        for seq, n in zip(seqs, num_new):
            seq.num_computed += n
        sampled: list[Sequence] = []
        any_finished = False
        for j, seq in enumerate(step.sample_seqs):
            token = token_ids[j]
            seq.tokens.append(token)
            out = seq.output
            generated = out.token_ids
            if not generated:
                out.first_token_time = now
            generated.append(token)
            if logprobs is not None and out.logprobs is not None:
                out.logprobs.append(logprobs[j])
            sampled.append(seq)
            if token in seq.stop_ids:
                self._finish_running(seq, "stop", now)
                any_finished = True
            elif len(generated) >= seq.max_new_tokens:
                self._finish_running(seq, "length", now)
                any_finished = True
        if any_finished:
            self.running = [s for s in self.running if not s.finished]
        return sampled

    def _finish_running(self, seq: Sequence, reason: str, now: float) -> None:
        # Leaves `running` to the caller's single rebuild (finishing many sequences in one step stays O(batch)).
        self._finish(seq, reason, now)
