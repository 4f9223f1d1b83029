"""Text in and out of a served model: the checkpoint's tokenizer, incremental detokenization, stop words.

Streaming text must be the exact concatenation of what a non-streaming request returns, and must never split a
multi-byte character or show part of a stop word that a later token completes. So each request keeps one
TextStream: tokens go in as they are sampled, text comes out only when it can no longer change.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

from trtfalcon.errors import MissingDependencyError

# What makes a directory "have a tokenizer": the files transformers' fast or sentencepiece tokenizers load from.
# (tokenizer_config.json alone only names a class; it needs one of these beside it.)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")

# Tokens of the prompt decoded together with the first generated tokens, so that decoders which treat the start
# of a string specially (sentencepiece's leading space, byte-level merges) give the text as it continues the
# prompt (vLLM's detokenizer uses the same 5).
_CONTEXT_TOKENS = 5


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(directory: str | Path) -> Any:
    """transformers' AutoTokenizer from local files only: a server never reaches the Hub."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a core dependency
        raise MissingDependencyError(f"{directory}: loading its tokenizer needs transformers ({e})") from e
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


class ThreadLocalTokenizer:
    """One tokenizer per thread: Triton's thread encodes while the engine thread decodes.

    HF fast tokenizers raise "Already borrowed" when their Rust object is used from two threads at once; a shared
    lock would fix that but let one long prompt's encode stall every stream's detokenization, so each thread gets
    its own copy (loaded on first use, once per thread)."""

    def __init__(self, directory: str | Path, first: Any | None = None) -> None:
        self.directory = directory
        self._local = threading.local()
        if first is not None:  # the caller's thread already loaded one (to fail early on a bad tokenizer)
            self._local.tokenizer = first

    @property
    def tokenizer(self) -> Any:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = load_tokenizer(self.directory)
        return tok

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class TextStream:
    """The text of one request's generated tokens, released as soon as it is final.

    Incremental decoding as in vLLM/TGI: decode a short window ending at the new tokens and append what it adds
    beyond the window's previous text; a window ending in U+FFFD (an incomplete UTF-8 sequence of a byte-level
    tokenizer) waits for the next token. Stop words: the text is cut before the first occurrence of any of them
    (`stopped` becomes True), and text that could still become the start of a stop word is held back.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop_words: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""
        self._sent = 0
        self._searched = 0
        self.stop_words = tuple(stop_words)
        self._longest_stop = max((len(w) for w in self.stop_words), default=0)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: Sequence[int]) -> None:
        """Append sampled tokens (ignored once a stop word has ended the text)."""
        for t in token_ids:
            if self.stopped:
                return
            self._ids.append(int(t))
            self._advance(final=False)
            self._find_stop()

    def _advance(self, final: bool) -> None:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def _find_stop(self) -> None:
        if not self.stop_words:
            return
        # Only the new text, plus the tail a stop word could straddle, needs searching.
        start = max(0, self._searched - self._longest_stop + 1)
        hits = [i for i in (self.text.find(w, start) for w in self.stop_words) if i >= 0]
        self._searched = len(self.text)
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def take(self, final: bool = False) -> str:
        """The text not yet returned that can no longer change (all of it when `final`)."""
        if final and not self.stopped and self._read_offset < len(self._ids):
            self._advance(final=True)  # flush a trailing incomplete character as U+FFFD rather than drop it
            self._find_stop()
        end = len(self.text)
        if not (final or self.stopped) and self.stop_words:
            end -= self._stop_prefix_len()
        out = self.text[self._sent:end]
        self._sent = max(self._sent, end)
        return out

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop word (held back)."""
        text = self.text
        for n in range(min(self._longest_stop - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(w.startswith(tail) for w in self.stop_words):
                return n
        return 0
