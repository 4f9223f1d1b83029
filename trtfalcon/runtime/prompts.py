"""Prompts from the command line or a JSONL file.

Parsing here checks structure (JSON, integer lists); whether a prompt can be served (ids inside the vocab, length
within max_seq_len) is the runtime's call (Scheduler.add), so that one bad request ends with its own error while
the others run. `check_servable` asks the same (runtime/servable.py) for the unbatched reference backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trtfalcon.errors import RequestError
from trtfalcon.jsonl import is_token_ids, iter_jsonl_objects
from trtfalcon.runtime.servable import length_problem, prompt_problem


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


def parse_prompt(ids: object, max_new_tokens: object, where: str) -> Prompt:
    if not is_token_ids(ids):
        raise RequestError(f"{where}: prompt_ids: expected a list of integers, found {ids!r:.80}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise RequestError(f"{where}: max_new_tokens: expected a positive integer, found {max_new_tokens!r}")
    return Prompt(ids, max_new_tokens)


def check_servable(p: Prompt, vocab_size: int, max_seq_len: int, where: str) -> None:
    problem = prompt_problem(p.prompt_ids, vocab_size) or length_problem(len(p.prompt_ids), p.max_new_tokens,
                                                                         max_seq_len)
    if problem is not None:
        raise RequestError(f"{where}: {problem}")


def load_prompts(prompt_ids: str | None, prompts_file: Path | None, default_max_new_tokens: int) -> list[Prompt]:
    if (prompt_ids is None) == (prompts_file is None):
        raise RequestError("give exactly one of --prompt-ids or --prompts-file")
    if prompt_ids is not None:
        ids = parse_ids(prompt_ids, "--prompt-ids")
        return [parse_prompt(ids, default_max_new_tokens, "--prompt-ids")]
    assert prompts_file is not None
    prompts = []
    for where, obj in iter_jsonl_objects(prompts_file):
        if "prompt_ids" not in obj:
            raise RequestError(f'{where}: expected an object like {{"prompt_ids": [1, 2], "max_new_tokens": 8}}')
        prompts.append(parse_prompt(obj["prompt_ids"], obj.get("max_new_tokens", default_max_new_tokens), where))
    if not prompts:
        raise RequestError(f"{prompts_file}: no prompts found")
    return prompts
