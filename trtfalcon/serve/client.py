"""Talking to the served model: gRPC streaming with tritonclient (token by token), and Triton's HTTP generate
endpoint (one response, standard library only).

    from trtfalcon.serve.client import grpc_stream, http_generate
    for chunk in grpc_stream("localhost:8001", "trtfalcon", text="The capital of France is", max_tokens=32):
        print(chunk["text_output"], end="", flush=True)
    print(http_generate("localhost:8000", "trtfalcon", input_ids=[1, 2, 3], max_tokens=8)["output_ids"])

Inputs are built from protocol.INPUTS, so the names and dtypes are the ones config.pbtxt declares. Only what the
caller sets is sent: the model fills in the rest. grpc_stream needs `pip install 'trtfalcon[serve]'`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Iterator

import numpy as np

from trtfalcon.errors import MissingDependencyError
from trtfalcon.serve.protocol import LOGPROB_OUTPUTS, input_spec, output_spec

def request_arrays(text: str | None = None, input_ids: list[int] | None = None, **params: Any) -> dict[str, np.ndarray]:
    """Name -> numpy array of the declared dtype and shape, for every input given (None = not sent)."""
    values: dict[str, Any] = {"text_input": text, "input_ids": input_ids, **params}
    arrays = {}
    for name, value in values.items():
        if value is None:
            continue
        spec = input_spec(name)  # StopIteration = not an input of the model: say which
        if spec.data_type == "TYPE_STRING":
            items = [value] if isinstance(value, str) else list(value)
            arr = np.array([s.encode("utf-8") for s in items], dtype=object)
        else:
            arr = np.asarray(value if not spec.scalar else [value], dtype=spec.numpy_dtype).reshape(-1)
        arrays[name] = arr
    return arrays


class RequestFailed(RuntimeError):
    """The server answered a request with an error; `status` is the HTTP status (400 = INVALID_ARG, 499 =
    CANCELLED, 500 = INTERNAL, ...) where the transport carries one (the generate endpoint; not a gRPC stream)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def tritonclient_inputs(module: Any, arrays: dict[str, np.ndarray]) -> list:
    """tritonclient InferInputs (module = tritonclient.grpc or tritonclient.http), each with its array's own dtype
    (request_arrays gives the declared ones; a test may send others on purpose)."""
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for name, arr in arrays.items():
        inp = module.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def _result(get: Any, names: list[str]) -> dict[str, Any]:
    """A response's outputs as Python values (text decoded, ids and logprobs as lists)."""
    r: dict[str, Any] = {}
    for name in names:
        arr = get(name)
        if arr is None:
            continue
        if name in ("text_output", "finish_reason"):
            r[name] = arr.reshape(-1)[0].decode("utf-8")
        elif name in ("prompt_tokens", "completion_tokens", "sample_index"):
            r[name] = int(arr.reshape(-1)[0])
        elif name == "lowest_group_confidence":
            r[name] = float(arr.reshape(-1)[0])
        else:
            r[name] = arr.tolist()
    return r


_OUTPUT_NAMES = ["text_output", "output_ids", "finish_reason", "prompt_tokens", "completion_tokens", "sample_index",
                 *LOGPROB_OUTPUTS, "lowest_group_confidence", "confidences"]


def _import(kind: str) -> Any:
    try:
        if kind == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError as e:
        raise MissingDependencyError(f"tritonclient.{kind}: not installed (pip install 'trtfalcon[serve]'): {e}") from e
    return module


class StreamCall:
    """One request on its own gRPC stream, recorded response by response (what the end-to-end tests and the load
    benchmark check): its chunks and their arrival times, how many responses carried Triton's FINAL flag, and the
    error it ended with.

    The stream asks for Triton's final-response flag on every response (enable_empty_final_response), so a FINAL
    sent on its own would be seen too. A request ends with exactly one of: a response flagged final, or an error
    (the model sends its errors with the FINAL flag; the gRPC stream carries only their message). `on_event`, if
    given, is called from tritonclient's thread with (chunk or None, error message or None, final).
    """

    def __init__(self, url: str, model: str, *, request_id: str | None = None, text: str | None = None,
                 input_ids: list[int] | None = None, arrays: dict[str, np.ndarray] | None = None,
                 parameters: dict[str, Any] | None = None, on_event: Any = None, **params: Any) -> None:
        self.grpc = _import("grpc")
        self.model = model
        self.arrays = arrays if arrays is not None else request_arrays(text, input_ids, **params)
        self.request_id = request_id or uuid.uuid4().hex
        self.parameters = parameters
        self.on_event = on_event
        self.chunks: list[dict[str, Any]] = []
        self.times: list[float] = []  # time.perf_counter() of each chunk
        self.finals = 0  # responses flagged final, plus errors: exactly 1 for a request that ended properly
        self.chunks_at_end: int | None = None  # len(chunks) when it ended: more later = a response after FINAL
        self.error: str | None = None
        self.sent_at = 0.0
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._client = self.grpc.InferenceServerClient(url)

    def start(self) -> StreamCall:
        self._client.start_stream(callback=self._on_response)
        self.sent_at = time.perf_counter()
        self._client.async_stream_infer(self.model, tritonclient_inputs(self.grpc, self.arrays),
                                        request_id=self.request_id, parameters=self.parameters,
                                        enable_empty_final_response=True)
        return self

    def _on_response(self, result: Any, error: Any) -> None:
        now = time.perf_counter()
        chunk = None
        with self._lock:
            if error is not None:
                message = error.message() if hasattr(error, "message") else str(error)
                self.error = message or str(error)
                final = True
            else:
                response = result.get_response()
                flag = response.parameters.get("triton_final_response")
                final = bool(flag is not None and flag.bool_param)
                if response.outputs:  # a FINAL sent on its own carries no outputs
                    chunk = _result(result.as_numpy, _OUTPUT_NAMES)
                    self.chunks.append(chunk)
                    self.times.append(now)
            self.finals += final
            if final and self.chunks_at_end is None:
                self.chunks_at_end = len(self.chunks)
        if self.on_event is not None:
            self.on_event(chunk, self.error if error is not None else None, final)
        if final:
            self.done.set()

    def wait(self, timeout_s: float) -> bool:
        return self.done.wait(timeout_s)

    def cancel(self) -> None:
        """Cancel from the client: the stream is stopped with cancel_requests=True, which the server passes on to
        the model (is_cancelled()), and the engine frees the request's cache."""
        self._client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        """Stop the stream (cancelling the request if it has not ended) and close the channel."""
        self._client.stop_stream(cancel_requests=not self.done.is_set())
        self._client.close()

    # ---- what came back
    @property
    def token_ids(self) -> list[int]:
        return [t for c in self.chunks for t in c.get("output_ids", [])]

    @property
    def text(self) -> str:
        return "".join(c.get("text_output", "") for c in self.chunks)

    @property
    def finish_reason(self) -> str | None:
        return self.chunks[-1].get("finish_reason") if self.chunks and self.error is None else None

    def samples(self) -> dict[int, dict[str, Any]]:
        """Per sample_index (a request with n > 1), what came back for it: its token_ids, finish_reason,
        completion_tokens and, with DeepConf, its lowest_group_confidence (the last one sent) and confidences
        (when asked for), gathered from its responses in order."""
        out: dict[int, dict[str, Any]] = {}
        for c in self.chunks:
            s = out.setdefault(c.get("sample_index", 0), {"token_ids": [], "finish_reason": ""})
            s["token_ids"] += c.get("output_ids", [])
            s["finish_reason"] = c.get("finish_reason", "")
            s["completion_tokens"] = c.get("completion_tokens")
            if "lowest_group_confidence" in c:
                s["lowest_group_confidence"] = c["lowest_group_confidence"]
            if "confidences" in c:
                s.setdefault("confidences", []).extend(c["confidences"])
        return dict(sorted(out.items()))

    @property
    def ttft_s(self) -> float | None:
        return self.times[0] - self.sent_at if self.times else None

    @property
    def token_gaps_s(self) -> list[float]:
        """Time between consecutive streamed chunks (one token each): the per-token latency a client sees."""
        return [b - a for a, b in zip(self.times, self.times[1:])]


def grpc_stream(url: str, model: str, *, text: str | None = None, input_ids: list[int] | None = None,
                timeout_s: float = 600.0, **params: Any) -> Iterator[dict[str, Any]]:
    """Stream one request over gRPC: yields one dict per response (one per token), the last with finish_reason.

    Closing the generator early (break) cancels the request on the server: the stream is stopped with
    cancel_requests=True, which the model sees through is_cancelled() and the engine frees its cache at once.
    Raises RequestFailed with the server's message if the request fails.
    """
    events: queue.Queue = queue.Queue()
    call = StreamCall(url, model, text=text, input_ids=input_ids, stream=True,
                      on_event=lambda chunk, error, final: events.put((chunk, error, final)), **params).start()
    try:
        while True:
            chunk, error, final = events.get(timeout=timeout_s)
            if error is not None:
                raise RequestFailed(f"{model}: {error}")
            if chunk is not None:
                yield chunk
            if final:
                return
    finally:
        call.close()


def http_generate(url: str, model: str, *, text: str | None = None, input_ids: list[int] | None = None,
                  timeout_s: float = 600.0, **params: Any) -> dict[str, Any]:
    """One request through Triton's generate endpoint (POST /v2/models/<model>/generate): the whole completion in
    one response. (Triton's /infer HTTP endpoint refuses decoupled models; the generate endpoint takes them.)

    Raises RequestFailed with the server's message and HTTP status (400 for a bad request).
    """
    body = {}
    for name, arr in request_arrays(text, input_ids, stream=False, **params).items():
        values = [v.decode("utf-8") if isinstance(v, bytes) else v.item() for v in arr.reshape(-1)]
        body[name] = values[0] if input_spec(name).scalar else values
    req = urllib.request.Request(f"http://{url}/v2/models/{model}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read().decode("utf-8", errors="replace")
        try:
            message = json.loads(raw).get("error", raw)
        except (ValueError, AttributeError):
            message = raw
        raise RequestFailed(f"{model}: HTTP {e.code}: {message}", e.code) from None
    return _generate_result(out)


def _generate_result(out: dict[str, Any]) -> dict[str, Any]:
    """The generate endpoint's JSON, shaped like grpc_stream's chunks: it writes a one-element tensor as a bare
    value and a [tokens, k] tensor flattened."""
    r: dict[str, Any] = {}
    for name in _OUTPUT_NAMES:
        if name not in out:
            continue
        value = out[name]
        if output_spec(name).scalar:
            r[name] = value[0] if isinstance(value, list) else value
        else:
            r[name] = value if isinstance(value, list) else [value]
    n = len(r.get("output_ids", []))
    for name in ("top_logprobs", "top_ids"):
        if name in r and n:
            k = len(r[name]) // n
            r[name] = [r[name][i * k:(i + 1) * k] for i in range(n)]
    return r
