"""Calibration data for post-training quantization: token-id samples from a file, or synthetic ids said plainly.

Files:
    *.jsonl  one JSON object per line: {"text": "..."} (also "prompt") tokenized with the checkpoint's tokenizer,
             or {"input_ids": [...]} already tokenized (works without a tokenizer). One line = one sample,
             truncated to seq_len.
    other    UTF-8 text, tokenized as a whole with the checkpoint's tokenizer and cut into seq_len windows.
Without a file: uniformly random token ids. "max" calibration only needs activation ranges, which random ids do
exercise, but they are not the model's data distribution: the scales are then a smoke test, not a deployment
calibration, and every report says `synthetic: true`.

The last `holdout` samples are never shown to the calibrator: the accuracy report measures perplexity on them.
Every error names the file (and line) and what was expected; nothing is read twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trtfalcon.errors import ConfigError
from trtfalcon.jsonl import is_token_ids, iter_jsonl_objects

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class CalibrationDataError(ConfigError):
    """A calibration file that cannot be turned into token ids for this checkpoint."""


@dataclass
class CalibrationSet:
    calib: list[list[int]]  # samples the calibrator sees
    holdout: list[list[int]]  # samples kept for the accuracy report
    source: str  # "file ..." or "synthetic ..."
    synthetic: bool
    tokenizer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source, "synthetic": self.synthetic, "tokenizer": self.tokenizer,
            "calib_samples": len(self.calib), "calib_tokens": sum(map(len, self.calib)),
            "holdout_samples": len(self.holdout), "holdout_tokens": sum(map(len, self.holdout)), **self.meta,
        }


def load_tokenizer(checkpoint_dir: Path):
    """The checkpoint's own tokenizer (transformers AutoTokenizer), or None when it ships none."""
    if not any((checkpoint_dir / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint_dir))
    except Exception as e:  # noqa: BLE001 - any loader failure is the same user-facing problem
        raise CalibrationDataError(f"{checkpoint_dir}: has tokenizer files but transformers cannot load them ({e})") from e


def load_calibration(
    path: Path | None, checkpoint_dir: Path, vocab_size: int, *, num_samples: int, seq_len: int,
    holdout: int = 8, seed: int = 0,
) -> CalibrationSet:
    """num_samples calibration samples (+ up to `holdout` held out) of at most seq_len tokens."""
    if num_samples < 1 or seq_len < 2:
        raise CalibrationDataError(f"calibration: need --calib-size >= 1 and --calib-seq-len >= 2, found "
                                   f"{num_samples} and {seq_len}")
    if path is None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (num_samples + holdout, seq_len), generator=g).tolist()
        return CalibrationSet(
            ids[:num_samples], ids[num_samples:],
            f"synthetic: {num_samples}+{holdout} samples of {seq_len} uniformly random token ids (seed {seed}); "
            "no --calib-data given, so scales reflect random inputs, not real text", True,
        )
    path = Path(path)
    tokenizer = load_tokenizer(checkpoint_dir)
    samples = _read_jsonl(path, tokenizer, seq_len, checkpoint_dir) if path.suffix == ".jsonl" else \
        _read_text(path, tokenizer, seq_len, checkpoint_dir)
    for i, s in enumerate(samples):
        bad = [t for t in s if not 0 <= t < vocab_size]
        if bad:
            raise CalibrationDataError(f"{path}: sample {i + 1} has token id {bad[0]} outside the model's vocabulary "
                                       f"[0, {vocab_size}); is the tokenizer from this checkpoint?")
    samples = [s for s in samples if len(s) >= 2]
    if not samples:
        raise CalibrationDataError(f"{path}: no sample of at least 2 tokens after tokenization (the file is empty "
                                   "or every line is too short)")
    n_hold = min(holdout, len(samples) // 2)  # never more than half: calibration needs the data first
    calib = samples[: len(samples) - n_hold][:num_samples]
    held = samples[len(samples) - n_hold:]
    name = getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None
    return CalibrationSet(calib, held, f"file {path}", False, tokenizer=str(name) if tokenizer is not None else None,
                          meta={"file_samples": len(samples)})


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _need_tokenizer(tokenizer, where: Path | str, checkpoint_dir: Path, what: str) -> None:
    if tokenizer is None:
        raise CalibrationDataError(
            f"{where}: {what} needs a tokenizer, but {checkpoint_dir} has none ({', '.join(TOKENIZER_FILES)}); "
            'give pre-tokenized JSONL lines {"input_ids": [...]} or copy the model\'s tokenizer files there'
        )


def _read_text(path: Path, tokenizer, seq_len: int, checkpoint_dir: Path) -> list[list[int]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); calibration files "
                                   "are text or JSONL") from e
    if "\x00" in text:
        raise CalibrationDataError(f"{path}: contains NUL bytes; expected text or JSONL, found binary data")
    _need_tokenizer(tokenizer, path, checkpoint_dir, "a text file")
    ids = _encode(tokenizer, text)
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]


def _read_jsonl(path: Path, tokenizer, seq_len: int, checkpoint_dir: Path) -> list[list[int]]:
    out = []
    for where, rec in iter_jsonl_objects(path, CalibrationDataError):
        if "input_ids" in rec:
            ids = rec["input_ids"]
            if not is_token_ids(ids):
                raise CalibrationDataError(f"{where}: 'input_ids' must be a list of integers")
        else:
            text = rec.get("text", rec.get("prompt"))
            if not isinstance(text, str):
                raise CalibrationDataError(f"{where}: expected a string field 'text' (or 'prompt') or a list "
                                           f"'input_ids', found keys {sorted(rec)}")
            _need_tokenizer(tokenizer, where, checkpoint_dir, "'text'")
            ids = _encode(tokenizer, text)
        out.append(ids[:seq_len])
    return out
