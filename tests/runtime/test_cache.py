"""BlockManager and StateSlotPool: random operation sequences never own a block or slot twice, free everything."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trtfalcon.runtime.cache import BlockManager, CacheError, StateSlotPool

ops = st.lists(st.tuples(st.sampled_from(["grow", "free", "fork"]), st.integers(0, 5), st.integers(0, 5),
                         st.integers(0, 24)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4), ops=ops)
def test_block_manager_random_ops(num_blocks, block_size, ops):
    max_seqs, max_blocks = 6, 8
    bm = BlockManager(num_blocks, block_size, max_seqs, max_blocks)
    tokens = {}  # seq_id -> tokens its table covers (the model of what it should hold)
    for op, a, b, n in ops:
        if op == "grow":
            if a not in tokens:
                bm.open(a)
                tokens[a] = 0
            n = min(n, max_blocks * block_size)
            free_before = bm.num_free
            need = bm.blocks_needed(a, n)
            ok = bm.grow(a, n)
            assert ok == (need <= free_before)
            if ok:
                tokens[a] = max(tokens[a], n)
                assert bm.num_free == free_before - need
            else:
                assert bm.num_free == free_before
        elif op == "free" and a in tokens:
            bm.free(a)
            del tokens[a]
        elif op == "fork" and a in tokens and b not in tokens:
            n = min(n, tokens[a])
            copies = bm.fork(a, b, n)
            if copies is not None:
                tokens[b] = n
                full = n // block_size
                assert bm.table(b)[:full] == bm.table(a)[:full]
                assert len(copies) == (1 if n % block_size else 0)
                for src, dst in copies:
                    assert src == bm.table(a)[full] and dst == bm.table(b)[full] and src != dst
        bm.check_invariants()
        for s, t in tokens.items():
            assert len(bm.table(s)) >= bm.blocks_for(t)
    for s in list(tokens):
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free == num_blocks and not bm.ref_counts.any()


def test_block_manager_shared_blocks_survive_until_last_holder():
    bm = BlockManager(num_blocks=6, block_size=4, max_seqs=3, max_blocks_per_seq=4)
    bm.open(0)
    assert bm.grow(0, 10)  # 3 blocks: 2 full + 1 partial
    copies = bm.fork(0, 1, 10)
    t0, t1 = bm.table(0), bm.table(1)
    assert t1[:2] == t0[:2] and copies == [(t0[2], t1[2])]
    assert bm.ref_counts[t0[0]] == 2 and bm.num_free == 2
    bm.free(0)
    assert bm.num_free == 3  # only parent's own partial block came back
    bm.free(1)
    assert bm.num_free == 6
    with pytest.raises(CacheError, match="double free"):
        bm.free(1)


def test_block_manager_watermark_only_limits_admission():
    bm = BlockManager(num_blocks=10, block_size=2, max_seqs=2, max_blocks_per_seq=10, watermark_blocks=2)
    assert bm.can_allocate(8, admission=True) and not bm.can_allocate(9, admission=True)
    assert bm.can_allocate(10)


@settings(max_examples=150, deadline=None)
@given(num_slots=st.integers(1, 8), ops=st.lists(st.tuples(st.sampled_from(["alloc", "free", "fork"]),
                                                            st.integers(0, 7)), max_size=60))
def test_state_slot_pool_random_ops(num_slots, ops):
    pool = StateSlotPool(num_slots)
    owned: set[int] = set()
    for op, k in ops:
        if op == "alloc" and pool.num_free:
            s = pool.allocate()
            assert s not in owned
            owned.add(s)
        elif op == "free" and owned:
            s = sorted(owned)[k % len(owned)]
            pool.free(s)
            owned.remove(s)
        elif op == "fork" and owned and pool.num_free:
            src = sorted(owned)[k % len(owned)]
            s, dst = pool.fork(src)
            assert s == src and dst not in owned
            owned.add(dst)
        pool.check_invariants()
        assert pool.num_free == num_slots - len(owned)
    for s in list(owned):
        pool.free(s)
    assert pool.num_free == num_slots
    with pytest.raises(CacheError):
        pool.free(0)


def test_state_slot_pool_exhaustion_is_an_error():
    pool = StateSlotPool(1)
    pool.allocate()
    with pytest.raises(CacheError, match="all 1 slots"):
        pool.allocate()
