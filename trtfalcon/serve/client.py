"""Talking to the served model with tritonclient: gRPC streaming (token by token) and HTTP (one response).

    from trtfalcon.serve.client import grpc_stream, http_generate
    for chunk in grpc_stream("localhost:8001", "trtfalcon", text="The capital of France is", max_tokens=32):
        print(chunk["text_output"], end="", flush=True)
    print(http_generate("localhost:8000", "trtfalcon", input_ids=[1, 2, 3], max_tokens=8)["output_ids"])

Inputs are built from protocol.INPUTS, so the names and dtypes are the ones config.pbtxt declares. Only what the
caller sets is sent: the model fills in the rest. Needs `pip install 'trtfalcon[serve]'`.
"""

from __future__ import annotations

import queue
import uuid
from typing import Any, Iterator

import numpy as np

from trtfalcon.errors import MissingDependencyError
from trtfalcon.serve.protocol import LOGPROB_OUTPUTS, input_spec

# config.pbtxt data types -> the wire names tritonclient's InferInput takes.
_WIRE = {"TYPE_BOOL": "BOOL", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_FP32": "FP32",
         "TYPE_STRING": "BYTES"}


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


def _inputs(module: Any, arrays: dict[str, np.ndarray]) -> list:
    out = []
    for name, arr in arrays.items():
        inp = module.InferInput(name, list(arr.shape), _WIRE[input_spec(name).data_type])
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
        elif name in ("prompt_tokens", "completion_tokens"):
            r[name] = int(arr.reshape(-1)[0])
        else:
            r[name] = arr.tolist()
    return r


_OUTPUT_NAMES = ["text_output", "output_ids", "finish_reason", "prompt_tokens", "completion_tokens",
                 *LOGPROB_OUTPUTS]


def _import(kind: str) -> Any:
    try:
        if kind == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError as e:
        raise MissingDependencyError(f"tritonclient.{kind}: not installed (pip install 'trtfalcon[serve]'): {e}") from e
    return module


def grpc_stream(url: str, model: str, *, text: str | None = None, input_ids: list[int] | None = None,
                timeout_s: float = 600.0, **params: Any) -> Iterator[dict[str, Any]]:
    """Stream one request over gRPC: yields one dict per response (one per token), the last with finish_reason.

    Closing the generator early (break) cancels the request on the server: the stream is stopped with
    cancel_requests=True, which the model sees through is_cancelled() and the engine frees its cache at once.
    Raises RuntimeError with the server's message if the request fails.
    """
    grpcclient = _import("grpc")
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    finished = False
    try:
        client.async_stream_infer(model, _inputs(grpcclient, request_arrays(text, input_ids, stream=True, **params)),
                                  request_id=uuid.uuid4().hex)
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                finished = True
                raise RuntimeError(f"{model}: {error}")
            chunk = _result(result.as_numpy, _OUTPUT_NAMES)
            finished = bool(chunk.get("finish_reason"))
            yield chunk
            if finished:
                return
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()


def http_generate(url: str, model: str, *, text: str | None = None, input_ids: list[int] | None = None,
                  timeout_s: float = 600.0, **params: Any) -> dict[str, Any]:
    """One request over HTTP, whole completion in one response (Triton's HTTP endpoint takes exactly one response
    from a decoupled model, so `stream` is false here)."""
    httpclient = _import("http")
    client = httpclient.InferenceServerClient(url, network_timeout=timeout_s, connection_timeout=timeout_s)
    try:
        result = client.infer(model, _inputs(httpclient, request_arrays(text, input_ids, stream=False, **params)),
                              request_id=uuid.uuid4().hex)
        return _result(lambda n: result.as_numpy(n), _OUTPUT_NAMES)
    finally:
        client.close()
