"""The served model's inputs and outputs, declared once.

config.pbtxt is rendered from these lists (repository.py), model.py reads and writes exactly these names with
these dtypes (requests.py, backend.py), and the tests check both against the parsed config. Names follow the
conventions users already script against (TensorRT-LLM's Triton backend and Triton's generate endpoint:
text_input, max_tokens, stream, text_output), so `/v2/models/<name>/generate` JSON bodies work unchanged.

The model is decoupled with max_batch_size 0: dims are the whole tensor shape (no batch dimension), because
batching happens inside the runtime, across requests, token by token, not in Triton's scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Triton data type -> the numpy dtype pb_utils.Tensor.as_numpy() gives (TYPE_STRING: object array of bytes).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "TYPE_BOOL": np.dtype(np.bool_),
    "TYPE_INT32": np.dtype(np.int32),
    "TYPE_INT64": np.dtype(np.int64),
    "TYPE_FP32": np.dtype(np.float32),
    "TYPE_FP64": np.dtype(np.float64),
    "TYPE_STRING": np.dtype(object),
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. dims as in config.pbtxt (-1 = variable); `text` = only when the model has a tokenizer."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    description: str
    text: bool = False

    @property
    def numpy_dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.data_type]

    @property
    def scalar(self) -> bool:
        return self.dims == (1,)


# Every input is optional in Triton's sense: the model decides what is required (text_input or input_ids) and
# fills in defaults, so a client sends only what it changes.
INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", "TYPE_STRING", (1,), "prompt as UTF-8 text (tokenized in the model)", text=True),
    TensorSpec("input_ids", "TYPE_INT32", (-1,), "prompt as token ids (instead of text_input)"),
    TensorSpec("max_tokens", "TYPE_INT32", (1,), "tokens to generate at most (default from trtfalcon.json)"),
    TensorSpec("temperature", "TYPE_FP32", (1,), "0 = greedy (default)"),
    TensorSpec("top_p", "TYPE_FP32", (1,), "nucleus filter in (0, 1]; 1 = off (default)"),
    TensorSpec("top_k", "TYPE_INT32", (1,), "keep the k most likely tokens; 0 = off (default)"),
    TensorSpec("seed", "TYPE_INT64", (1,), "sampling seed >= 0, reproducible whatever shares the batch"),
    TensorSpec("stop_words", "TYPE_STRING", (-1,), "stop when the text contains one (not included in the text)",
               text=True),
    TensorSpec("stop_token_ids", "TYPE_INT32", (-1,), "stop after generating one of these ids (included)"),
    TensorSpec("ignore_eos", "TYPE_BOOL", (1,), "keep generating past the model's EOS (benchmarks)"),
    TensorSpec("stream", "TYPE_BOOL", (1,), "one response per token (true) or one response at the end (default)"),
    TensorSpec("logprobs", "TYPE_INT32", (1,), "k > 0: return each token's logprob and the top-k; 0 = off"),
    TensorSpec("n", "TYPE_INT32", (1,), "samples of the prompt (DeepConf's parallel traces; default 1): each "
               "response carries one sample, named by sample_index; sample k is seeded with seed + k"),
    TensorSpec("confidence_top_k", "TYPE_INT32", (1,), "DeepConf: log-probs averaged into a token's confidence "
               "(default 20); sending any confidence_* input turns DeepConf on"),
    TensorSpec("confidence_window", "TYPE_INT32", (1,), "DeepConf: sliding window of the group confidence, tokens "
               "(default 2048)"),
    TensorSpec("confidence_threshold", "TYPE_FP64", (1,), "DeepConf online: stop a sample when a full window's mean "
               "falls below it (finish_reason 'confidence'); absent = never stop"),
    TensorSpec("return_confidences", "TYPE_BOOL", (1,), "DeepConf: also return each token's confidence"),
)

# The DeepConf inputs: any one of them present turns DeepConf on for the request.
CONFIDENCE_INPUTS = ("confidence_top_k", "confidence_window", "confidence_threshold", "return_confidences")

# A streaming response carries what its step added (text and ids are deltas; counts are running totals);
# a non-streaming response carries the whole completion. The logprob outputs are present only when asked for, the
# confidence outputs only with DeepConf on (confidences only with return_confidences). With n > 1 each response
# carries one sample (sample_index): a non-streaming request gets one response per sample, as each ends.
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", (1,), "generated text (the new text when streaming)", text=True),
    TensorSpec("output_ids", "TYPE_INT32", (-1,), "generated token ids (the new ids when streaming)"),
    TensorSpec("finish_reason", "TYPE_STRING", (1,), "'' while running, then 'length', 'stop' or 'confidence' "
               "(stopped by DeepConf online)"),
    TensorSpec("sample_index", "TYPE_INT32", (1,), "which of the request's n samples this response is about"),
    TensorSpec("prompt_tokens", "TYPE_INT32", (1,), "tokens in the prompt"),
    TensorSpec("completion_tokens", "TYPE_INT32", (1,), "tokens generated so far"),
    TensorSpec("output_logprobs", "TYPE_FP32", (-1,), "log-probability of each token in output_ids"),
    TensorSpec("top_logprobs", "TYPE_FP32", (-1, -1), "[tokens, k] the k highest log-probabilities per token"),
    TensorSpec("top_ids", "TYPE_INT32", (-1, -1), "[tokens, k] their token ids"),
    TensorSpec("lowest_group_confidence", "TYPE_FP64", (1,), "DeepConf: the sample's lowest window mean so far "
               "(its min_conf; the whole-sample mean while shorter than the window)"),
    TensorSpec("confidences", "TYPE_FP32", (-1,), "DeepConf: each token's confidence in output_ids "
               "(return_confidences)"),
)

LOGPROB_OUTPUTS = ("output_logprobs", "top_logprobs", "top_ids")


def inputs(has_tokenizer: bool) -> tuple[TensorSpec, ...]:
    """The inputs a model with (or without) a tokenizer declares: text inputs only when it can tokenize."""
    return tuple(s for s in INPUTS if has_tokenizer or not s.text)


def outputs(has_tokenizer: bool) -> tuple[TensorSpec, ...]:
    return tuple(s for s in OUTPUTS if has_tokenizer or not s.text)


def input_spec(name: str) -> TensorSpec:
    for s in INPUTS:
        if s.name == name:
            return s
    raise KeyError(f"input {name!r}: not an input of the served model (known: {', '.join(s.name for s in INPUTS)})")


def output_spec(name: str) -> TensorSpec:
    for s in OUTPUTS:
        if s.name == name:
            return s
    raise KeyError(f"output {name!r}: not an output of the served model (known: "
                   f"{', '.join(s.name for s in OUTPUTS)})")
