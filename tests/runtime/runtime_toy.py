"""A deterministic toy "model" that exercises the contract's caches the way the real model does.

Its next token depends on the whole prefix through two routes, both kept in the caches:
  * a running hash h (like the Mamba state) kept per state slot in conv_state.0; a sequence with context_len 0
    starts from h = 0, one with context_len > 0 continues from its slot;
  * the token history written into kv_cache.0 through the block table (like attention's KV), read back in full
    every step: g = sum((token_p + 1) * (p + 1)), with the position p + 1 stored beside each token as a marker.
So a wrong slot, a wrong context_len, a wrong position, a wrong or stale block all change the tokens, and the
result can be compared with `toy_next_token(prefix)` computed on the prefix alone.
"""

from __future__ import annotations

import numpy as np
import torch

from trtfalcon.runtime.contract import CacheSpec, StepBatch

P = 65521  # keeps h and g exact in float32


def toy_next_token(prefix: list[int], vocab_size: int) -> int:
    h = 0
    g = 0
    for p, x in enumerate(prefix):
        h = (h * 31 + x + 1) % P
        g = (g + (x + 1) * (p + 1)) % P
    return (h + g) % vocab_size


def toy_greedy(prompt: list[int], max_new_tokens: int, vocab_size: int, stop_ids: frozenset[int] = frozenset()
               ) -> list[int]:
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        t = toy_next_token(tokens, vocab_size)
        out.append(t)
        tokens.append(t)
        if t in stop_ids:
            break
    return out


def toy_logits(next_ids: np.ndarray, vocab_size: int) -> torch.Tensor:
    """A peaked but smooth distribution: argmax at next_id, falling off with (v - next_id) mod vocab."""
    v = np.arange(vocab_size)
    dist = (v[None, :] - next_ids[:, None]) % vocab_size
    return torch.from_numpy((-0.7 * dist).astype(np.float32))


class ToyExecutor:
    def __init__(self, vocab_size: int, num_blocks: int, block_size: int, num_slots: int) -> None:
        self.vocab_size = vocab_size
        self.cache_spec = CacheSpec(num_layers=1, num_blocks=num_blocks, block_size=block_size, num_kv_heads=1,
                                    head_dim=1, num_slots=num_slots, conv_dim=1, conv_state_len=1, mamba_n_heads=1,
                                    mamba_d_head=1, mamba_d_state=1)
        self.pools = self.cache_spec.allocate()
        self.batches: list[dict[str, np.ndarray]] = []  # copies, for tests that inspect what was run
        self.keep_batches = False

    def execute(self, batch: StepBatch) -> torch.Tensor:
        kv = self.pools["kv_cache.0"].numpy()
        conv = self.pools["conv_state.0"].numpy()
        b = {k: v.numpy().copy() for k, v in batch.as_dict().items()}
        if self.keep_batches:
            self.batches.append(b)
        for name, t in batch.as_dict().items():
            assert t.dtype == torch.int32, f"{name}: expected int32, found {t.dtype}"
        bs = self.cache_spec.block_size
        nxt = np.zeros(batch.num_seqs, dtype=np.int64)
        cu = b["cu_seqlens"]
        for i in range(batch.num_seqs):
            c, slot, table = int(b["context_lens"][i]), int(b["state_slots"][i]), b["block_tables"][i]
            h = 0 if c == 0 else int(conv[slot, 0, 0])
            for t in range(cu[i], cu[i + 1]):
                pos = c + (t - cu[i])
                assert b["positions"][t] == pos, f"positions[{t}]: expected {pos}, found {b['positions'][t]}"
                x = int(b["input_ids"][t])
                blk = table[pos // bs]
                kv[0, blk, pos % bs, 0, 0] = x
                kv[1, blk, pos % bs, 0, 0] = pos + 1
                h = (h * 31 + x + 1) % P
            conv[slot, 0, 0] = h
            g = 0
            for pos in range(c + cu[i + 1] - cu[i]):
                blk = table[pos // bs]
                x, marker = int(kv[0, blk, pos % bs, 0, 0]), int(kv[1, blk, pos % bs, 0, 0])
                if marker != pos + 1:
                    g += 7777  # a block that does not hold this sequence's token at pos: poison
                g = (g + (x + 1) * (pos + 1)) % P
            nxt[i] = (h + g) % self.vocab_size
        return toy_logits(nxt, self.vocab_size)

    def copy_slot(self, src: int, dst: int) -> None:
        for name, t in self.pools.items():
            if not name.startswith("kv_cache"):
                t[dst] = t[src]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        for name, t in self.pools.items():
            if name.startswith("kv_cache"):
                for src, dst in pairs:
                    t[:, dst] = t[:, src]


def assert_output_matches(out, want: list[int], stops, label: str) -> None:
    """A finished output against the toy run of its prompt alone: a cancelled one is a prefix of it, any other
    equals it and ends for the right reason."""
    if out.finish_reason == "cancelled":
        assert out.token_ids == want[:len(out.token_ids)], label
    else:
        assert out.token_ids == want, f"{label} (preempted {out.num_preemptions}x)"
        assert out.finish_reason == ("stop" if want[-1] in stops else "length"), label


def check_step_invariants(sched) -> None:
    """After every step: the cache managers' own invariants, the batch limit, slots owned exactly by the running
    sequences, and every sequence's status agreeing with the queue it is in (Scheduler.check_invariants)."""
    import numpy as np

    sched.blocks.check_invariants()
    sched.slots.check_invariants()
    assert len(sched.running) <= sched.max_batch_size
    assert set(np.flatnonzero(sched.slots.in_use).tolist()) == {s.state_slot for s in sched.running}
    sched.check_invariants()
