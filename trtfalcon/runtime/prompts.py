"""Prompts from the command line or a JSONL file, validated at the boundary (ids, lengths, types)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trtfalcon.errors import RequestError


@dataclass(frozen=True)
class Prompt:
    prompt_ids: list[int]
    max_new_tokens: int


def parse_ids(text: str, where: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError as e:
        raise RequestError(f"{where}: expected comma-separated integers such as 1,2,3, found {text!r}") from e
    return ids


def validate_prompt(ids: object, max_new_tokens: object, vocab_size: int, max_seq_len: int, where: str) -> Prompt:
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestError(f"{where}: prompt_ids: expected a list of integers, found {ids!r:.80}")
    if not ids:
        raise RequestError(f"{where}: prompt_ids: expected at least one token, found an empty prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{where}: prompt_ids: expected ids in [0, {vocab_size}), found {bad[:5]}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise RequestError(f"{where}: max_new_tokens: expected a positive integer, found {max_new_tokens!r}")
    if len(ids) + max_new_tokens > max_seq_len:
        raise RequestError(
            f"{where}: prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the maximum sequence "
            f"length {max_seq_len}"
        )
    return Prompt(ids, max_new_tokens)


def load_prompts(
    prompt_ids: str | None, prompts_file: Path | None, default_max_new_tokens: int, vocab_size: int, max_seq_len: int,
) -> list[Prompt]:
    if (prompt_ids is None) == (prompts_file is None):
        raise RequestError("give exactly one of --prompt-ids or --prompts-file")
    if prompt_ids is not None:
        ids = parse_ids(prompt_ids, "--prompt-ids")
        return [validate_prompt(ids, default_max_new_tokens, vocab_size, max_seq_len, "--prompt-ids")]
    assert prompts_file is not None
    prompts = []
    for lineno, line in enumerate(prompts_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{prompts_file}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or "prompt_ids" not in obj:
            raise RequestError(f'{where}: expected an object like {{"prompt_ids": [1, 2], "max_new_tokens": 8}}')
        prompts.append(
            validate_prompt(obj["prompt_ids"], obj.get("max_new_tokens", default_max_new_tokens), vocab_size, max_seq_len, where)
        )
    if not prompts:
        raise RequestError(f"{prompts_file}: no prompts found")
    return prompts
