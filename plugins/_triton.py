"""Triton, imported once for every kernel module, so that the torch references import without it.

triton is an optional dependency (extra `kernels`). Where it is missing, `triton.jit` still decorates (the
kernels are defined beside their references either way) but launching or compiling a kernel raises
MissingDependencyError naming what to install.
"""

from __future__ import annotations

import os

from trtfalcon.errors import MissingDependencyError

# Triton 3.9's interpreter computes tl.dot on bf16 operands from their raw bits (a 16x16 bf16 dot is off by
# 1e10 there, seen on this project's CPU machines). Under TRITON_INTERPRET=1, `mma_operand` upcasts dot operands to
# fp32, which gives what the GPU computes anyway (bf16 x bf16 products are exact in fp32, accumulated in fp32).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
    _UPCAST_DOTS = tl.constexpr(INTERPRETING)

    @triton.jit
    def mma_operand(x):
        """x as a tl.dot operand: unchanged on the GPU, fp32 in the interpreter (see INTERPRETING)."""
        if _UPCAST_DOTS:
            return x.to(tl.float32)
        else:
            return x
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAVE_TRITON = False

    class _MissingKernel:
        def __init__(self, fn):
            self.fn = fn
            self.__name__ = fn.__name__

        def _fail(self, *args, **kwargs):
            raise MissingDependencyError(
                f"Triton kernel {self.__name__!r} needs the `triton` package: pip install 'trtfalcon[kernels]'"
            )

        __call__ = _fail

        def __getitem__(self, grid):
            return self._fail

    class _TritonShim:
        @staticmethod
        def jit(fn=None, **kwargs):
            return _MissingKernel(fn) if fn is not None else _MissingKernel

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, (n - 1).bit_length())

    class _LanguageShim:
        constexpr = object

    triton = _TritonShim()  # type: ignore[assignment]
    tl = _LanguageShim()  # type: ignore[assignment]
    mma_operand = None


def require_triton() -> None:
    if not HAVE_TRITON:
        raise MissingDependencyError("the Triton kernels need the `triton` package: pip install 'trtfalcon[kernels]'")


__all__ = ["HAVE_TRITON", "INTERPRETING", "mma_operand", "require_triton", "tl", "triton"]
