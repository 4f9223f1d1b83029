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

Each sequence's SequenceStatus says where it is: WAITING in `waiting`, RUNNING in `running` (the only status that
owns a state slot and KV blocks), FORK_PENDING in its parent's `children`, FINISHED nowhere. The moves between
them (admit, fork, preempt, hand over, finish) are a few methods in one section, and only they set it. Every
ending (stop, length, confidence, cancelled, error) goes through `_finish`: the sequence leaves its queue, samples waiting on
its prefill are handed over, its slot and blocks are free before the next schedule.

n samples of one prompt (SamplingParams.n > 1): sample 0 is queued and prefills the prompt like any request; the
other n-1 wait on it (FORK_PENDING: in `live`, neither waiting nor running, `parent` = sample 0). In the step whose chunk
completes sample 0's prompt, after the executor ran and before anything is sampled, `fork_samples` gives each of
them a state slot (copy of sample 0's) and the prompt's KV blocks (full blocks shared by reference count, the
partly-filled last block copied), with num_computed = prompt length, and adds them to `running`; the engine then
samples each one's first token from sample 0's logits row with the sample's own generator. A sample that cannot
fork then (no free slot, no block for the copy, or the batch full) is not lost: it goes to the front of the queue as
an ordinary sequence and prefills the prompt itself. If sample 0 ends (cancelled, failed) before its prompt is
done, the next pending sample takes over its place and the rest of the group. After the fork the samples are
independent sequences: a preempted one recomputes prompt + its own tokens like any other.

DeepConf online (SamplingParams.confidence): a sequence that takes a state slot (admission, fork, re-admission
after a preemption) is listed in `slot_started` for the engine to (re)start its group-confidence row
(runtime/confidence.py); `update` records each token's confidence and ends a trace whose window fell below its
threshold with finish_reason "confidence", through `_finish` like stop and length.

A sequence uses its state slot as its row in the BlockManager's block-table matrix (see cache.py), so
block_tables for the step is one numpy gather. The StepBatch's tensors are views of buffers preallocated for
max_num_tokens / max_batch_size: valid until the next step. In block_tables, entries past a sequence's own
blocks are padding with unspecified values: a kernel reads only logical blocks below ceil((context_len + n) /
block_size).
"""

from __future__ import annotations

import enum
import random
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from trtfalcon.errors import RequestError
from trtfalcon.runtime.cache import BlockManager, StateSlotPool
from trtfalcon.runtime.contract import StepBatch
from trtfalcon.runtime.request import FINISH_REASONS, Request, RequestOutput, SamplingParams, TokenLogprobs
from trtfalcon.runtime.sampler import ConfidenceStats
from trtfalcon.runtime.servable import SchedulerLimits, num_samples, request_problem


class SequenceStatus(enum.IntEnum):
    """Where a sequence is, and so what it holds. Set only by the Scheduler's moves (the section "moves between
    queues"), each asserting that it is one of NEXT_STATUS's; Scheduler.check_invariants checks that every
    sequence is in the one place its status names.

    How far a running sequence has got (prompt chunks still to prefill, or decoding) is not a status: it is
    num_computed against len(tokens), read where it matters.
    """

    WAITING = 1       # in Scheduler.waiting: no state slot, no KV block
    FORK_PENDING = 2  # in its `parent`'s `children` (n > 1): forks from the parent's prefill
    RUNNING = 3       # in Scheduler.running: owns a state slot (its block-table row) and KV blocks
    FINISHED = 4      # ended, output.finish_reason says why: in no queue, owns nothing


# The members as module names: on Python 3.11 `SequenceStatus.RUNNING` is a descriptor lookup, about ten times a
# global read, and the step's loops compare a status per sequence. (An IntEnum, so that the transition check
# below hashes in C.)
WAITING, FORK_PENDING, RUNNING, FINISHED = (SequenceStatus.WAITING, SequenceStatus.FORK_PENDING,
                                            SequenceStatus.RUNNING, SequenceStatus.FINISHED)

NEXT_STATUS: dict[SequenceStatus, frozenset[SequenceStatus]] = {
    WAITING: frozenset({RUNNING, FINISHED}),  # admitted; or cancelled in the queue
    # forked; or queued to prefill the prompt itself (no slot/block to fork into, or its parent ended first);
    # or cancelled
    FORK_PENDING: frozenset({RUNNING, WAITING, FINISHED}),
    RUNNING: frozenset({WAITING, FINISHED}),  # preempted (recompute); or ended: stop, length, cancelled, error
    FINISHED: frozenset(),
}


class Sequence:
    """A request while the scheduler holds it. `tokens` = prompt + generated; `num_computed` = context_len."""

    __slots__ = ("request_id", "params", "output", "tokens", "num_computed", "state_slot", "rng", "stop_ids",
                 "max_new_tokens", "status", "group", "parent", "children")

    def __init__(self, request_id: str, params: SamplingParams, output: RequestOutput, stop_ids: frozenset[int],
                 rng: random.Random | None, group: str | None = None,
                 status: SequenceStatus = WAITING) -> None:
        self.request_id = request_id
        self.params = params
        self.output = output
        self.tokens: list[int] = list(output.prompt_ids)
        self.num_computed = 0
        self.state_slot = -1  # while RUNNING: its Mamba state slot, and its row of the block-table matrix
        self.rng = rng
        self.stop_ids = stop_ids
        self.max_new_tokens = params.max_new_tokens
        self.status = status
        self.group = group  # the request id of an n > 1 request, for its samples
        self.parent: Sequence | None = None  # while FORK_PENDING: the sequence whose prefill it forks from
        self.children: list[Sequence] = []  # FORK_PENDING samples waiting on this one's prefill

    @property
    def finished(self) -> bool:
        return self.status is FINISHED


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
        self.num_confidence = 0  # live sequences with SamplingParams.confidence (0: the engine skips DeepConf)
        self.slot_started: list[Sequence] = []  # such sequences that took a slot since the engine last looked
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
            if p.confidence is not None:
                output.confidences = []
                self.num_confidence += 1
            rng = None
            if not p.greedy:
                rng = random.Random(p.seed + k if p.seed is not None else self._seed_rng.getrandbits(64))
            # Sample 0 queues and prefills the prompt; the others wait on it to fork.
            seq = Sequence(output.request_id, p, output, stop_ids, rng, rid if n > 1 else None,
                           WAITING if k == 0 else FORK_PENDING)
            self.live[seq.request_id] = seq
            seqs.append(seq)
        self.waiting.append(seqs[0])
        if n > 1:
            self.groups[rid] = seqs
            self._wait_on(seqs[0], seqs[1:])
        return outputs

    def cancel(self, request_id: str) -> list[RequestOutput]:
        """End a queued or running request now, freeing its blocks and slot; [] if it is not in flight.

        `request_id` names one sequence (a plain request, or one sample "rid/k" of an n > 1 request), or an n > 1
        request as a whole ("rid": every sample still in flight). Returns the outputs that ended.
        """
        seq = self.live.get(request_id)
        if seq is not None:
            self.end([seq], "cancelled")
            return [seq.output]
        group = self.groups.get(request_id)
        if group is None:
            return []
        # Waiting samples first, so that sample 0 ends with nobody to hand its prompt to.
        ending = [seq for seq in reversed(group) if not seq.finished]
        self.end(ending, "cancelled")
        return [seq.output for seq in reversed(ending)]

    def fail(self, seqs: list[Sequence], message: str) -> None:
        """End `seqs` with finish_reason "error" (an executor failure in their step); the others go on."""
        self.end([seq for seq in seqs if not seq.finished], "error", message)

    def fail_forked(self, step: ScheduledStep, message: str) -> list[Sequence]:
        """End the samples `step` forked with finish_reason "error" (copying their caches failed) and take their
        rows out of the step's sampling; returns them. Their parents and the rest of the step go on."""
        first = len(step.sample_seqs) - step.num_forked
        forked = step.sample_seqs[first:]
        del step.sample_seqs[first:]
        del step.sample_rows[len(step.sample_rows) - step.num_forked:]
        step.num_forked = 0
        self.fail(forked, message)
        return forked

    def end(self, seqs: list[Sequence], reason: str, error: str | None = None) -> None:
        """End each of `seqs` (none finished yet) now, wherever it is, with `reason` (one of FINISH_REASONS): its
        state slot and KV blocks are free for the next schedule."""
        now = time.perf_counter()
        any_running = False
        for seq in seqs:
            any_running |= seq.status is RUNNING
            self._finish(seq, reason, now, error)
        if any_running:
            self._drop_finished()

    # ---- moves between queues: the only code that sets Sequence.status ---------------------------------------
    @staticmethod
    def _set_status(seq: Sequence, status: SequenceStatus) -> None:
        assert status in NEXT_STATUS[seq.status], f"{seq.request_id}: {seq.status.name} -> {status.name}"
        seq.status = status

    def _admit(self, num_tokens: int) -> Sequence:
        """WAITING -> RUNNING: the front of the queue gets a state slot and the blocks for its `num_tokens`
        tokens (the caller checked they are free) and runs from context_len 0."""
        seq = self.waiting.popleft()
        self._set_status(seq, RUNNING)
        slot = self.slots.allocate()
        self.blocks.open(slot)
        self.blocks.grow(slot, num_tokens)
        seq.state_slot = slot
        seq.num_computed = 0  # a fresh start in a possibly reused slot: context_len 0 zeroes its state
        self.running.append(seq)
        if seq.params.confidence is not None:
            self.slot_started.append(seq)
        return seq

    def _fork(self, child: Sequence, parent: Sequence, num_tokens: int) -> tuple[int, list[tuple[int, int]]] | None:
        """FORK_PENDING -> RUNNING: `child` gets a slot (copy of `parent`'s) and shares/copies its KV blocks for
        `num_tokens` tokens; returns (the parent's slot, the block copies), or None (nothing taken) when no slot
        or block is free for it or the batch is full."""
        if len(self.running) >= self.max_batch_size or not self.slots.num_free:
            return None
        src, slot = self.slots.fork(parent.state_slot)
        copies = self.blocks.fork(parent.state_slot, slot, num_tokens)
        if copies is None:
            self.slots.free(slot)
            return None
        self._set_status(child, RUNNING)
        child.parent = None
        child.state_slot = slot
        child.num_computed = num_tokens
        self.running.append(child)
        if child.params.confidence is not None:
            self.slot_started.append(child)
        return src, copies

    def _preempt(self, seq: Sequence) -> None:
        """RUNNING -> WAITING, recompute preemption: drop the caches, requeue at the front with prompt + generated
        as the prompt."""
        self._set_status(seq, WAITING)
        if self.running[-1] is seq:
            self.running.pop()
        else:
            self.running.remove(seq)
        self._free_slot(seq)
        seq.num_computed = 0
        seq.output.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _hand_over(self, samples: list[Sequence], at: int) -> None:
        """FORK_PENDING -> WAITING for the first of `samples` (pending samples of one prompt whose parent will not
        prefill it for them): it queues at position `at` to prefill the prompt itself, the rest wait on it."""
        heir, *rest = samples
        self._set_status(heir, WAITING)
        heir.parent = None
        self.waiting.insert(at, heir)
        if rest:
            self._wait_on(heir, rest)

    def _wait_on(self, parent: Sequence, samples: list[Sequence]) -> None:
        """`samples` (FORK_PENDING) fork from `parent`'s prefill when it completes."""
        parent.children = samples
        for s in samples:
            s.parent = parent
        self._num_parents += 1

    def _take_children(self, parent: Sequence) -> list[Sequence]:
        children = parent.children
        parent.children = []
        self._num_parents -= 1
        return children

    def _finish(self, seq: Sequence, reason: str, now: float, error: str | None = None) -> None:
        """Any status -> FINISHED: the one way a sequence ends. It leaves `waiting` or its parent's `children` here;
        a RUNNING one stays in `running` until the caller's _drop_finished (one pass for all that end in a step).
        Samples still waiting on its prefill hand over to the next of them; slot and blocks are freed at once."""
        assert reason in FINISH_REASONS, reason
        status = seq.status
        self._set_status(seq, FINISHED)
        at = 0  # where an heir queues: a running sequence was admitted before anyone waiting, so the front
        if status is RUNNING:
            self._free_slot(seq)
        elif status is WAITING:
            at = self.waiting.index(seq)
            del self.waiting[at]
        else:
            siblings = seq.parent.children
            siblings.remove(seq)
            if not siblings:
                self._num_parents -= 1
            seq.parent = None
        if seq.children:
            self._hand_over(self._take_children(seq), at)
        del self.live[seq.request_id]
        if seq.params.confidence is not None:
            self.num_confidence -= 1
        if seq.group is not None:
            group = self.groups.get(seq.group)
            if group is not None and all(s.status is FINISHED for s in group):
                del self.groups[seq.group]
        out = seq.output
        out.finish_reason = reason
        out.error = error
        out.finish_time = now

    def _drop_finished(self) -> None:
        self.running = [s for s in self.running if s.status is RUNNING]

    def _free_slot(self, seq: Sequence) -> None:
        self.blocks.free(seq.state_slot)
        self.slots.free(seq.state_slot)
        seq.state_slot = -1

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def check_invariants(self) -> None:
        """Between steps: every live sequence is in exactly the one place its status names and owns what that
        status owns (a slot and blocks only while RUNNING), the fork bookkeeping agrees, and the cache managers'
        own invariants hold. O(live + pools); for tests. Raises AssertionError naming the sequence."""
        self.blocks.check_invariants()
        self.slots.check_invariants()
        placed: dict[int, str] = {}

        def place(seq: Sequence, status: SequenceStatus, where: str) -> None:
            if id(seq) in placed:
                raise AssertionError(f"{seq.request_id} is in {placed[id(seq)]} and in {where}")
            placed[id(seq)] = where
            if seq.status is not status:
                raise AssertionError(f"{seq.request_id} is in {where} with status {seq.status.name}")
            if (seq.state_slot >= 0) != (status is RUNNING):
                raise AssertionError(f"{seq.request_id} ({status.name}) has state slot {seq.state_slot}")
            if (seq.parent is not None) != (status is FORK_PENDING):
                raise AssertionError(f"{seq.request_id} ({status.name}) has parent {seq.parent}")
            if seq.children and seq.num_computed >= len(seq.tokens):
                raise AssertionError(f"{seq.request_id} has samples waiting on a prompt it has already prefilled")

        if len(self.running) > self.max_batch_size:
            raise AssertionError(f"{len(self.running)} running sequences, max_batch_size={self.max_batch_size}")
        for seq in self.running:
            place(seq, RUNNING, "running")
        for seq in self.waiting:
            place(seq, WAITING, "waiting")
        parents = [seq for seq in (*self.running, *self.waiting) if seq.children]
        for parent in parents:
            for child in parent.children:
                place(child, FORK_PENDING, f"{parent.request_id}'s children")
                if child.parent is not parent or child.children:
                    raise AssertionError(f"{child.request_id} waits on {parent.request_id} but its parent is "
                                         f"{child.parent and child.parent.request_id}, its children "
                                         f"{[c.request_id for c in child.children]}")
        if sorted(placed) != sorted(id(seq) for seq in self.live.values()):
            raise AssertionError("the sequences in running, waiting and children are not exactly the live ones")
        if self._num_parents != len(parents):
            raise AssertionError(f"_num_parents={self._num_parents}, {len(parents)} sequences have children")
        in_use = set(np.flatnonzero(self.slots.in_use).tolist())
        if in_use != {seq.state_slot for seq in self.running}:
            raise AssertionError(f"slots in use {sorted(in_use)} are not the running sequences' slots")
        for rid, group in self.groups.items():
            if all(seq.finished for seq in group):
                raise AssertionError(f"group {rid!r} has ended but is still listed")

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
                if seq.status is not RUNNING:
                    continue  # preempted itself: running[i] is now the next sequence
            seqs.append(seq)
            i += 1
        num_decode = len(seqs)
        num_new = [1] * num_decode
        budget = self.max_num_tokens - num_decode

        for seq in prefilling:
            if budget <= 0:
                break
            if seq.status is not RUNNING:
                continue  # preempted above
            n = min(len(seq.tokens) - seq.num_computed, budget)
            seqs.append(seq)
            num_new.append(n)
            budget -= n

        if not num_preempted:
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < self.max_batch_size and self.slots.num_free:
                pending = len(waiting[0].tokens)
                if not blocks.can_allocate(blocks.blocks_for(pending), admission=True):
                    break  # first come first served: a later, smaller request does not overtake
                seq = self._admit(pending)
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
        for r in list(rows):
            parent = seqs[r]
            if not parent.children:
                continue
            num_tokens = parent.num_computed + num_new[r]  # the whole prompt, in the caches after this step
            left: list[Sequence] = []
            for child in self._take_children(parent):
                forked = self._fork(child, parent, num_tokens)
                if forked is None:
                    left.append(child)
                    continue
                src, copies = forked
                slot_pairs.append((src, child.state_slot))
                block_pairs.extend(copies)
                rows.append(r)
                sample_seqs.append(child)
                step.num_forked += 1
            if left:
                self._hand_over(left, 0)
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

    def take_slot_started(self) -> list[Sequence]:
        """The DeepConf sequences that took a state slot since the last call (see `slot_started`)."""
        started = self.slot_started
        self.slot_started = []
        return started

    def update(self, step: ScheduledStep, token_ids: list[int], logprobs: list[TokenLogprobs | None] | None,
               now: float, confidence: ConfidenceStats | None = None) -> list[Sequence]:
        """Advance the caches' bookkeeping and append sampled tokens; returns the sequences that got a token.

        token_ids[j] (and logprobs[j], confidence's entries [j]) belong to step.sample_seqs[j]. A sequence that ends
        with its token is finished here: its blocks and slot are free for the next schedule's admissions. It ends
        with "stop" (a stop token), else "length" (max_new_tokens), else "confidence" (DeepConf: its full window's
        mean fell strictly below its threshold with this token). A natural end wins when they coincide: the token
        completed the trace anyway, and a thresholded trace's finish reason then differs from the same trace's
        without a threshold only when it was cut short.
        """
        seqs, num_new = step.seqs, step.num_new
        for seq, n in zip(seqs, num_new):
            seq.num_computed += n
        sampled: list[Sequence] = []
        any_finished = False
        conf = confidence.confidence if confidence is not None else None
        stop = confidence.stop if confidence is not None else None
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
            if conf is not None and out.confidences is not None:
                out.confidences.append(conf[j])
                if stop is not None:
                    out.lowest_group_confidence = confidence.lowest_group[j]
            sampled.append(seq)
            if token in seq.stop_ids:
                self._finish(seq, "stop", now)
                any_finished = True
            elif len(generated) >= seq.max_new_tokens:
                self._finish(seq, "length", now)
                any_finished = True
            elif stop is not None and stop[j]:
                self._finish(seq, "confidence", now)
                any_finished = True
        if any_finished:
            self._drop_finished()
        return sampled
