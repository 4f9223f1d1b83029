"""JSON Lines input files (prompts, benchmark datasets, calibration data): one JSON object per line, every error
naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trtfalcon.errors import RequestError, TrtFalconError


def iter_jsonl_objects(path: Path, error: type[TrtFalconError] = RequestError) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for each non-blank line of a UTF-8 JSONL file; `where` is "file:line" for error messages,
    which are raised as `error` (the reader's own kind: a request, calibration data)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 (invalid byte at offset {e.start})") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise error(f"{where}: expected a JSON object, found {type(obj).__name__}")
        yield where, obj


def is_token_ids(value: object) -> bool:
    """A JSON list of integers (JSON's true and false are not token ids, though Python's bool is an int)."""
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
