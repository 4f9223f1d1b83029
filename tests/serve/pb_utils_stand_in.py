"""A STAND-IN for Triton's `triton_python_backend_utils` (the Python backend's API), for tests only.

Not Triton: a minimal, in-process imitation of the parts a decoupled Python model uses (Tensor,
InferenceRequest, InferenceResponse, TritonError with codes, get_input_tensor_by_name, the response sender with
send(flags=...) and is_cancelled(), TRITONSERVER_RESPONSE_COMPLETE_FINAL), with the checks Triton makes on
a decoupled model's use of them: nothing may be sent after the FINAL flag, every response is an
InferenceResponse, output tensors are named pb_utils.Tensors. `install()` puts it in sys.modules under the real
module's name so that the generated model.py imports it unchanged.
"""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import dataclass, field
import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = 1) -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        if not isinstance(name, str) or not isinstance(array, np.ndarray):
            raise TypeError(f"Tensor(name: str, array: np.ndarray), found {type(name)}, {type(array)}")
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None) -> None:
        for t in output_tensors or []:
            if not isinstance(t, Tensor):
                raise TypeError(f"output_tensors: expected pb_utils.Tensor, found {type(t)}")
        self._outputs = list(output_tensors or [])
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def outputs(self) -> dict[str, np.ndarray]:
        return {t.name(): t.as_numpy() for t in self._outputs}


class ResponseSender:
    """Records what the model sends; `done` is set by the FINAL flag; a send after it is a protocol error."""

    def __init__(self) -> None:
        self.responses: list[InferenceResponse] = []
        self.final_count = 0
        self.errors: list[str] = []  # protocol violations seen
        self.done = threading.Event()
        self.cancelled = False
        self._lock = threading.Lock()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        with self._lock:
            if self.final_count:
                self.errors.append("send after the FINAL flag")
            if response is not None:
                if not isinstance(response, InferenceResponse):
                    self.errors.append(f"send: expected an InferenceResponse, found {type(response)}")
                self.responses.append(response)
            elif not flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
                self.errors.append("send() with neither a response nor the FINAL flag")
            if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
                self.final_count += 1
                self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancelled


@dataclass
class InferenceRequest:
    """What Triton hands to execute(): named input tensors, an id, a response sender (decoupled)."""

    inputs: dict[str, np.ndarray]
    id: str = ""
    sender: ResponseSender = field(default_factory=ResponseSender)

    def request_id(self) -> str:
        return self.id

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.sender.cancelled


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    arr = request.inputs.get(name)
    return None if arr is None else Tensor(name, np.asarray(arr))


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)


def install() -> types.ModuleType:
    """Register this stand-in as `triton_python_backend_utils` (what model.py imports)."""
    mod = sys.modules[__name__]
    sys.modules["triton_python_backend_utils"] = mod
    return mod
