"""One Triton request's input tensors -> a runtime Request, with every network-reachable field validated.

Everything a client can send is checked here, before the request reaches the engine: which inputs are present,
their dtypes and shapes, UTF-8, token ids inside the vocab, lengths against max_seq_len, sampling ranges, and
caps on what would make one request expensive for everyone (logprobs k, stop lists, text size). Each problem is
reported as "input 'name': expected ..., found ..."; all of a request's problems come back together so a client
fixes them in one round trip. The engine checks ids, params and lengths again (Scheduler.check): that is the
runtime's own contract, and it stays the last word.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from trtfalcon.errors import RequestError
from trtfalcon.runtime.request import ConfidenceParams, SamplingParams
from trtfalcon.serve.protocol import CONFIDENCE_INPUTS, TensorSpec, input_spec
from trtfalcon.tts.deepconf import DEFAULT_TOP_K, DEFAULT_WINDOW

GetInput = Callable[[str], "np.ndarray | None"]


@dataclass(frozen=True)
class ServeLimits:
    """What the served model accepts; from the model (vocab, max_seq_len) and trtfalcon.json (the caps)."""

    vocab_size: int
    max_seq_len: int
    default_max_tokens: int = 256
    max_logprobs: int = 20  # DeepConf's k; larger k multiplies response size for every token
    max_stop_token_ids: int = 64
    max_stop_words: int = 16
    max_stop_word_chars: int = 256
    bytes_per_token: int = 64  # text_input cap = max_seq_len * this, checked before tokenizing
    max_n: int = 64  # samples per request (n); the engine's max_batch_size caps it too


def serve_limits(caps: dict[str, Any], vocab_size: int, max_seq_len: int) -> ServeLimits:
    """trtfalcon.json's `limits` + the model's sizes, naming any unknown or non-integer cap."""
    from trtfalcon.errors import ConfigError

    known = set(ServeLimits.__dataclass_fields__) - {"vocab_size", "max_seq_len"}
    unknown = sorted(set(caps) - known)
    if unknown:
        raise ConfigError(f"limits: unknown fields {unknown} (known: {sorted(known)})")
    bad = {k: v for k, v in caps.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        raise ConfigError(f"limits: expected integers >= 0, found {bad}")
    return ServeLimits(vocab_size=vocab_size, max_seq_len=max_seq_len, **caps)


@dataclass
class ParsedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    stop_words: tuple[str, ...]
    return_confidences: bool = False


class _Inputs:
    """Reads inputs by name with dtype and shape checks, collecting problems instead of stopping at the first."""

    def __init__(self, get: GetInput, allowed: set[str]) -> None:
        self.get = get
        self.allowed = allowed
        self.problems: list[str] = []

    def bad(self, name: str, expected: str, found: object) -> None:
        self.problems.append(f"input '{name}': expected {expected}, found {found}")

    def array(self, name: str) -> np.ndarray | None:
        spec = input_spec(name)
        if name not in self.allowed:  # text inputs on a model without a tokenizer
            arr = self.get(name)
            if arr is not None:
                self.problems.append(f"input '{name}': expected token ids instead (this model has no tokenizer: "
                                     f"send input_ids / stop_token_ids), found {name}")
            return None
        arr = self.get(name)
        if arr is None:
            return None
        arr = np.asarray(arr)
        if not _dtype_ok(arr, spec):
            self.bad(name, f"{spec.data_type} ({spec.numpy_dtype})", f"dtype {arr.dtype}")
            return None
        if spec.scalar:
            if arr.size != 1:
                self.bad(name, "a single value (shape [1])", f"shape {list(arr.shape)}")
                return None
        elif arr.ndim != len(spec.dims):
            self.bad(name, f"a {len(spec.dims)}-D tensor (dims {list(spec.dims)})", f"shape {list(arr.shape)}")
            return None
        return arr

    def scalar(self, name: str) -> Any:
        arr = self.array(name)
        return None if arr is None else arr.reshape(-1)[0].item()

    def strings(self, name: str) -> list[str] | None:
        arr = self.array(name)
        if arr is None:
            return None
        out = []
        for i, v in enumerate(arr.reshape(-1)):
            if isinstance(v, str):
                out.append(v)
                continue
            try:
                out.append(bytes(v).decode("utf-8"))
            except (UnicodeDecodeError, TypeError) as e:
                self.bad(name, "UTF-8 text", f"element {i}: {e}")
                return None
        return out


def _dtype_ok(arr: np.ndarray, spec: TensorSpec) -> bool:
    if spec.data_type == "TYPE_STRING":
        return arr.dtype == object or arr.dtype.kind in "SU"
    return arr.dtype == spec.numpy_dtype


def parse_request(get: GetInput, limits: ServeLimits, tokenizer: Any | None = None,
                  parameters: dict[str, Any] | None = None) -> ParsedRequest:
    """Validate and convert; raise RequestError naming every bad input (and every request parameter)."""
    allowed = {"input_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos",
               "stream", "logprobs", "n", *CONFIDENCE_INPUTS}
    if tokenizer is not None:
        allowed |= {"text_input", "stop_words"}
    inp = _Inputs(get, allowed)
    vocab, max_seq = limits.vocab_size, limits.max_seq_len

    # ---- the prompt: exactly one of text_input / input_ids
    text = inp.strings("text_input")
    ids_arr = inp.array("input_ids")
    prompt: list[int] | None = None
    if text is not None and ids_arr is not None:
        inp.problems.append("inputs 'text_input' and 'input_ids': expected one of them, found both")
    elif text is not None:
        prompt = _tokenize(inp, text[0], tokenizer, limits)
    elif ids_arr is not None:
        prompt = _check_ids(inp, "input_ids", ids_arr, vocab)
        if prompt is not None and not prompt:
            inp.bad("input_ids", "at least 1 token", "an empty prompt")
            prompt = None
    elif not inp.problems:
        which = "'text_input' or 'input_ids'" if tokenizer is not None else "'input_ids'"
        inp.problems.append(f"input {which}: expected a prompt, found none")

    # ---- generation length: the prompt plus max_tokens must fit the engine's max_seq_len
    max_tokens = inp.scalar("max_tokens")
    if max_tokens is not None and max_tokens < 1:
        inp.bad("max_tokens", "an integer >= 1", max_tokens)
        max_tokens = None
    if prompt is not None:
        room = max_seq - len(prompt)
        if room < 1:
            name = "text_input" if text is not None else "input_ids"
            inp.bad(name, f"a prompt of at most {max_seq - 1} tokens (max_seq_len={max_seq} incl. the output)",
                    f"{len(prompt)} tokens")
        elif max_tokens is not None and max_tokens > room:
            inp.bad("max_tokens", f"at most {room} (max_seq_len={max_seq} - prompt of {len(prompt)} tokens)",
                    max_tokens)
        elif max_tokens is None:
            max_tokens = min(limits.default_max_tokens, room)

    # ---- sampling
    temperature = inp.scalar("temperature")
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        inp.bad("temperature", "a finite number >= 0 (0 = greedy)", temperature)
    top_p = inp.scalar("top_p")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        inp.bad("top_p", "a number in (0, 1] (1 = off)", top_p)
    top_k = inp.scalar("top_k")
    if top_k is not None and not 0 <= top_k <= vocab:
        inp.bad("top_k", f"an integer in [0, vocab_size={vocab}] (0 = off)", top_k)
    seed = inp.scalar("seed")
    if seed is not None and seed < 0:
        inp.bad("seed", "an integer >= 0", seed)
    logprobs = inp.scalar("logprobs")
    if logprobs is not None and not 0 <= logprobs <= min(limits.max_logprobs, vocab):
        inp.bad("logprobs", f"an integer in [0, {min(limits.max_logprobs, vocab)}] (the server's max_logprobs)",
                logprobs)

    # ---- stopping
    stop_ids: list[int] = []
    stop_arr = inp.array("stop_token_ids")
    if stop_arr is not None:
        if stop_arr.size > limits.max_stop_token_ids:
            inp.bad("stop_token_ids", f"at most {limits.max_stop_token_ids} ids", f"{stop_arr.size}")
        else:
            stop_ids = _check_ids(inp, "stop_token_ids", stop_arr, vocab) or []
    stop_words = inp.strings("stop_words") or []
    if len(stop_words) > limits.max_stop_words:
        inp.bad("stop_words", f"at most {limits.max_stop_words} words", len(stop_words))
    for i, w in enumerate(stop_words):
        if not 1 <= len(w) <= limits.max_stop_word_chars:
            inp.bad("stop_words", f"words of 1 to {limits.max_stop_word_chars} characters",
                    f"{len(w)} characters at position {i}")
    ignore_eos = inp.scalar("ignore_eos")
    stream = inp.scalar("stream")

    # ---- samples and DeepConf
    n = inp.scalar("n")
    if n is not None and not 1 <= n <= limits.max_n:
        inp.bad("n", f"an integer in [1, {limits.max_n}] (the server's max_n samples)", n)
    conf_top_k = inp.scalar("confidence_top_k")
    if conf_top_k is not None and not 1 <= conf_top_k <= vocab:
        inp.bad("confidence_top_k", f"an integer in [1, vocab_size={vocab}]", conf_top_k)
    window = inp.scalar("confidence_window")
    if window is not None and window < 1:
        inp.bad("confidence_window", "an integer >= 1 (tokens)", window)
    threshold = inp.scalar("confidence_threshold")
    if threshold is not None and not math.isfinite(threshold):
        inp.bad("confidence_threshold", "a finite number (absent = never stop)", threshold)
    return_confidences = inp.scalar("return_confidences")
    deepconf = any(inp.get(name) is not None for name in CONFIDENCE_INPUTS)

    # Every option is an input. A request parameter is a client's mistake that would otherwise pass silently:
    # the generate endpoint turns each JSON field that names no input into one (`"max_new_tokens": 64`).
    for name, value in sorted((parameters or {}).items()):
        inp.problems.append(f"parameter '{name}': expected no request parameters (this model's options are its "
                            f"inputs: {', '.join(sorted(allowed))}), found {name}={value!r:.40}")

    if inp.problems:
        raise RequestError("; ".join(inp.problems))
    assert prompt is not None and max_tokens is not None
    params = SamplingParams(
        max_new_tokens=int(max_tokens),
        temperature=float(temperature) if temperature is not None else 0.0,
        top_k=int(top_k) if top_k is not None else 0,
        top_p=float(top_p) if top_p is not None else 1.0,
        seed=int(seed) if seed is not None else None,
        stop_token_ids=tuple(stop_ids),
        ignore_eos=bool(ignore_eos),
        logprobs=int(logprobs) if logprobs is not None else 0,
        n=int(n) if n is not None else 1,
        # A window longer than max_seq_len never fills, exactly like one of max_seq_len (a sample is shorter):
        # served as that, so that DeepConf's default 2048 works on any model and the window's ring buffers stay
        # bounded by the model's own length.
        confidence=ConfidenceParams(
            top_k=int(conf_top_k) if conf_top_k is not None else min(DEFAULT_TOP_K, vocab),
            window=min(int(window) if window is not None else DEFAULT_WINDOW, max_seq),
            threshold=float(threshold) if threshold is not None else None) if deepconf else None,
    )
    return ParsedRequest(prompt, params, bool(stream), tuple(stop_words), bool(return_confidences))


def _check_ids(inp: _Inputs, name: str, arr: np.ndarray, vocab: int) -> list[int] | None:
    flat = arr.reshape(-1).astype(np.int64)
    bad = np.flatnonzero((flat < 0) | (flat >= vocab))
    if bad.size:
        inp.bad(name, f"token ids in [0, vocab_size={vocab})", f"{int(flat[bad[0]])} at position {int(bad[0])}")
        return None
    return flat.tolist()


def _tokenize(inp: _Inputs, text: str, tokenizer: Any, limits: ServeLimits) -> list[int] | None:
    cap = limits.max_seq_len * limits.bytes_per_token
    size = len(text.encode("utf-8"))
    if size > cap:
        inp.bad("text_input", f"at most {cap} bytes (max_seq_len={limits.max_seq_len})", f"{size} bytes")
        return None
    if not text:
        inp.bad("text_input", "non-empty text", "an empty string")
        return None
    ids = [int(t) for t in tokenizer.encode(text)]
    if not ids:
        inp.bad("text_input", "text that tokenizes to at least 1 token", f"{text!r:.40}")
        return None
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:  # a tokenizer larger than the model's embedding: a deployment error, reported to the client as is
        inp.bad("text_input", f"token ids in [0, vocab_size={limits.vocab_size}) from the tokenizer", bad[0])
        return None
    return ids
