"""Triton's language for the kernel modules, imported once, here, so that the torch references import without it;
the interpreter switch (INTERPRETING) and the @triton.jit helpers the kernels share.

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

    @triton.jit
    def fp8e4m3_bits(x):
        """fp32 x, already within [-448, 448] -> its E4M3 (float8_e4m3fn) bits as uint8, round to nearest even.

        Integer arithmetic only, so it computes the same on the GPU and in the interpreter. Normal range
        (|x| >= 2**-6): the fp32 mantissa rounded to 3 bits (ties to even; a carry moves into the exponent);
        subnormals: multiples of 2**-9, rounded by the 2**23 trick (exact: |x| * 512 < 8). -0.0 keeps its sign."""
        bits = x.to(tl.int32, bitcast=True)
        sign = ((bits >> 31) & 1) << 7
        a = tl.abs(x)
        ab = a.to(tl.int32, bitcast=True)
        r = ab + 0x7FFFF + ((ab >> 20) & 1)
        normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)  # exponent bias 127 -> 7
        sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
        return (tl.where(a < 0.015625, sub, normal) | sign).to(tl.uint8)

    @triton.jit
    def to_fp8e4m3(x):
        """fp32 x, already within [-448, 448] -> tl.float8e4nv, round to nearest even (checkpoint/deploy_fp8.py quantize_fp8).

        On the GPU the hardware conversion (sm_89+: cvt.rn.satfinite.e4m3x2.f32). Triton 3.9's interpreter
        converts to float8 wrongly (ties away from zero, and a mantissa carry drops the value to half: -124 -> -64,
        seen on this project's CPU machines; tests/plugins/test_attention.py checks it), so there the bits come
        from fp8e4m3_bits. Reading float8 back (fp8 -> fp32) is exact in the interpreter for every finite value."""
        if _UPCAST_DOTS:
            return fp8e4m3_bits(x).to(tl.float8e4nv, bitcast=True)
        else:
            return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")
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
    mma_operand = fp8e4m3_bits = to_fp8e4m3 = None


def require_triton() -> None:
    if not HAVE_TRITON:
        raise MissingDependencyError("the Triton kernels need the `triton` package: pip install 'trtfalcon[kernels]'")


__all__ = ["HAVE_TRITON", "INTERPRETING", "fp8e4m3_bits", "mma_operand", "require_triton", "tl", "to_fp8e4m3",
           "triton"]
