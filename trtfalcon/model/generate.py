"""Unbatched generation with the reference model: the oracle path of `trtfalcon generate --backend reference`."""

from __future__ import annotations

import torch

from trtfalcon.model.reference import ReferenceModel


def reference_generate(
    model: ReferenceModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    stop_token_ids: tuple[int, ...] = (),
) -> list[int]:
    """Prefill the prompt, then decode one token at a time with explicit caches. Greedy when temperature is 0."""
    gen = torch.Generator().manual_seed(seed)
    logits, cache = model.prefill(torch.tensor(prompt_ids))
    last = logits[-1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        if temperature == 0.0:
            token = int(torch.argmax(last))
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        out.append(token)
        if token in stop_token_ids or len(out) == max_new_tokens:
            break
        last, cache = model.decode(token, cache)
    return out
