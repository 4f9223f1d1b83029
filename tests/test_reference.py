"""Rung 1 of the verification ladder: the reference model (on folded, fused weights) matches transformers."""

import pytest
import torch

from trtfalcon.config import FalconH1Config
from trtfalcon.model.generate import reference_generate
from trtfalcon.model.reference import ReferenceModel
from trtfalcon.model.weights import load_weights
from helpers import hf_greedy, hf_logits, hf_model

LENGTHS = (1, 5, 8, 19)  # the tiny preset's mamba_chunk_size is 8: these cross it


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_logits_and_greedy_tokens_match_transformers(hf_checkpoints, variant):
    path = hf_checkpoints(variant)
    oracle = hf_model(path)
    model = ReferenceModel(load_weights(path, "fp32"))
    vocab = model.cfg.vocab_size
    for n in LENGTHS:
        ids = _prompt(n, n, vocab)
        want = hf_logits(oracle, ids)
        got, _ = model.prefill(torch.tensor(ids))
        scale = want.abs().max().item()
        assert scale > 0
        assert (got - want).abs().max().item() <= 1e-4 * scale, f"{variant}: logits differ at prompt length {n}"
    ids = _prompt(11, 99, vocab)
    assert reference_generate(model, ids, 6) == hf_greedy(oracle, ids, 6), variant


@pytest.mark.parametrize("split", [1, 7, 8, 9, 16])
def test_prefill_then_decode_equals_one_prefill(tiny_hf, split):
    model = ReferenceModel(load_weights(tiny_hf, "fp32"))
    ids = torch.tensor(_prompt(21, 3, model.cfg.vocab_size))
    full, _ = model.prefill(ids)
    part, cache = model.prefill(ids[:split])
    outs = [part]
    for t in ids[split:].tolist():
        logits, cache = model.decode(t, cache)
        outs.append(logits[None])
    torch.testing.assert_close(torch.cat(outs), full, rtol=0, atol=1e-5 * full.abs().max().item())


def test_chunked_prefill_with_initial_state_equals_one_prefill(tiny_hf):
    model = ReferenceModel(load_weights(tiny_hf, "fp32"))
    ids = torch.tensor(_prompt(30, 4, model.cfg.vocab_size))
    full, cache_full = model.prefill(ids)
    a, cache = model.prefill(ids[:11])
    b, cache = model.prefill(ids[11:], cache)  # continues from the saved conv/SSM state and KV
    torch.testing.assert_close(torch.cat([a, b]), full, rtol=0, atol=1e-5 * full.abs().max().item())
    for lc, lf in zip(cache.layers, cache_full.layers):
        torch.testing.assert_close(lc.ssm_state, lf.ssm_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lc.conv_state, lf.conv_state)


def test_bf16_reference_stays_close_to_fp32(tiny_hf):
    ids = torch.tensor(_prompt(19, 5, 256))
    want, _ = ReferenceModel(load_weights(tiny_hf, "fp32")).prefill(ids)
    got, _ = ReferenceModel(load_weights(tiny_hf, "bf16")).prefill(ids)
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
