"""Launch an ahead-of-time compiled plugin kernel (PTX) on a CUDA stream with the CUDA driver API.

This is what TensorRT 11 does itself for a quickly deployable AOT plugin (it embeds the PTX and launches it with the
grid and scalar arguments evaluated from the shapes); TensorRT for RTX has no such plugin kind, so its IPluginV3
plugins (plugins/tensorrt_rtx.py) carry the PTX in the engine and launch it here from `enqueue`. The driver library
(libcuda.so.1, installed with the NVIDIA driver) is reached through ctypes: no extra package, no Triton or torch at
run time.

The kernel ABI is plugins/spec.py's: input pointers, then 32-bit scalar arguments, then output pointers (Triton's
two hidden scratch parameters are removed from the PTX by plugins/aot.py). The PTX is JIT-compiled by the driver for
the GPU at first use in each CUDA context (cuModuleLoadData), and cached per context.

Tested here (no GPU, no driver): only the argument packing and the error when libcuda is missing; the launch itself
runs only on a machine with an NVIDIA driver.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

from trtfalcon.errors import MissingDependencyError, TrtFalconError

# cuFuncSetAttribute: a launch may ask for more than 48 KiB of dynamic shared memory only after this is raised.
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_DEFAULT_SHARED_LIMIT = 48 * 1024


class CudaDriverError(TrtFalconError):
    """A CUDA driver call failed; the message names the call, the kernel and the driver's error string."""


def pack_kernel_args(signature: dict[str, str], values: list[int]) -> tuple[Any, list[Any]]:
    """(void*[] for cuLaunchKernel, the ctypes values it points to, to keep alive) for the kernel's non-constexpr
    parameters in order: "*..." pointers as 64-bit addresses, "i32" scalars as 32-bit ints."""
    kinds = [t for t in signature.values() if t != "constexpr"]
    if len(kinds) != len(values):
        raise CudaDriverError(f"kernel takes {len(kinds)} arguments ({', '.join(kinds)}), given {len(values)}")
    boxed: list[Any] = []
    for kind, v in zip(kinds, values):
        if kind.startswith("*"):
            boxed.append(ctypes.c_uint64(int(v)))
        elif kind == "i32":
            if not -2**31 <= int(v) < 2**31:
                raise CudaDriverError(f"scalar argument {v} does not fit the kernel's i32 parameter")
            boxed.append(ctypes.c_int32(int(v)))
        else:
            raise CudaDriverError(f"kernel parameter type {kind!r} is not a pointer or i32")
    params = (ctypes.c_void_p * len(boxed))(*[ctypes.cast(ctypes.pointer(b), ctypes.c_void_p) for b in boxed])
    return params, boxed


class CudaDriver:
    """The few driver calls a plugin launch needs. One per process (driver())."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise MissingDependencyError(f"running a TensorRT for RTX engine's trtfalcon plugins needs the NVIDIA driver "
                                         f"(libcuda.so.1 could not be loaded: {e})") from e
        self._functions: dict[tuple[int, str], ctypes.c_void_p] = {}
        self._lock = threading.Lock()
        self._call("cuInit", 0)

    def _call(self, fn: str, *args: Any, kernel: str = "") -> None:
        rc = getattr(self.lib, fn)(*args)
        if rc != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            where = f" for kernel {kernel}" if kernel else ""
            raise CudaDriverError(f"{fn}{where} failed: CUDA error {rc} "
                                  f"({(msg.value or b'unknown').decode(errors='replace')})")

    def function(self, key: str, name: str, ptx: str, shared_mem: int) -> ctypes.c_void_p:
        """The kernel `name` of `ptx` in the current context (loaded once per context and key)."""
        ctx = ctypes.c_void_p()
        self._call("cuCtxGetCurrent", ctypes.byref(ctx))
        if not ctx.value:
            raise CudaDriverError(f"no current CUDA context to load kernel {name} into (TensorRT enqueues in one)")
        with self._lock:
            cached = self._functions.get((ctx.value, key))
            if cached is not None:
                return cached
            module, fn = ctypes.c_void_p(), ctypes.c_void_p()
            self._call("cuModuleLoadData", ctypes.byref(module), ctypes.c_char_p(ptx.encode() + b"\0"), kernel=name)
            self._call("cuModuleGetFunction", ctypes.byref(fn), module, name.encode(), kernel=name)
            if shared_mem > _DEFAULT_SHARED_LIMIT:
                self._call("cuFuncSetAttribute", fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                           ctypes.c_int(shared_mem), kernel=name)
            self._functions[(ctx.value, key)] = fn
            return fn

    def launch(self, fn: ctypes.c_void_p, name: str, grid: list[int], block_x: int, shared_mem: int, stream: int,
               signature: dict[str, str], values: list[int]) -> None:
        gx, gy, gz = (list(grid) + [1, 1, 1])[:3]
        if min(gx, gy, gz) <= 0:
            return  # an empty batch: nothing to launch (as the torch path does)
        params, _keep = pack_kernel_args(signature, values)
        self._call("cuLaunchKernel", fn, ctypes.c_uint(gx), ctypes.c_uint(gy), ctypes.c_uint(gz),
                   ctypes.c_uint(block_x), ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_uint(shared_mem),
                   ctypes.c_void_p(stream), params, None, kernel=name)


_DRIVER: CudaDriver | None = None


def driver() -> CudaDriver:
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = CudaDriver()
    return _DRIVER


__all__ = ["CudaDriver", "CudaDriverError", "driver", "pack_kernel_args"]
