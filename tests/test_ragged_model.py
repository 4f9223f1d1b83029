"""Rung 2 (model level): the ragged-batch model on the cache pools equals the reference model per sequence."""

import torch

from trtfalcon.model.layers import FalconH1Model
from trtfalcon.model.reference import ReferenceModel
from trtfalcon.model.weights import load_weights
from trtfalcon.runtime.contract import CacheSpec, StepBatch


def _batch(chunks, block_size, max_blocks):
    """chunks: [(tokens, context_len, slot, blocks)] -> StepBatch."""
    ids, pos, cu, ctx, slots, tables = [], [], [0], [], [], []
    for toks, c, slot, blocks in chunks:
        ids += toks
        pos += list(range(c, c + len(toks)))
        cu.append(cu[-1] + len(toks))
        ctx.append(c)
        slots.append(slot)
        tables.append(blocks + [0] * (max_blocks - len(blocks)))
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return StepBatch(i32(ids), i32(pos), i32(cu), i32(ctx), i32(slots), i32(tables))


def test_ragged_steps_match_reference_per_sequence(tiny_hf):
    weights = load_weights(tiny_hf, "fp32")
    cfg = weights.config
    model, ref = FalconH1Model(weights), ReferenceModel(weights)
    spec = CacheSpec.for_model(cfg, num_blocks=32, block_size=4, num_slots=6, kv_dtype=torch.float32,
                               conv_dtype=torch.float32, ssm_dtype=torch.float32)
    pools = spec.allocate()
    for t in pools.values():  # garbage in every slot and block: a fresh sequence must never read it
        t.normal_()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (13, 1, 22)]
    slots, blocks = [5, 0, 3], [[7, 2, 9, 30], [11], [1, 4, 6, 8, 10, 12]]
    # step 1: prefill chunks of different sizes; step 2: continue; step 3: decode-like single tokens
    plan = [[(0, 9), (1, 1), (2, 8)], [(0, 4), (2, 14)]]
    done = [0, 0, 0]
    got = {0: [], 1: [], 2: []}
    for step in plan:
        chunks = []
        for s, n in step:
            chunks.append((seqs[s][done[s]:done[s] + n], done[s], slots[s], blocks[s]))
        logits = model.forward(_batch(chunks, 4, 6), pools)
        for j, (s, n) in enumerate(step):
            done[s] += n
            got[s].append((done[s], logits[j]))
    for s, seq in enumerate(seqs):
        full, _ = ref.prefill(torch.tensor(seq))
        for upto, logit in got[s]:
            torch.testing.assert_close(logit, full[upto - 1], rtol=0, atol=1e-5 * full.abs().max().item())
