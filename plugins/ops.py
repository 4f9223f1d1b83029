"""The registry of plugin ops (`OPS`: each op's declaration, from the module holding its kernel and reference), and
the custom ops a Falcon-H1 layer calls behind one switch: torch references, vectorized torch, or Triton kernels.

- reference: the `*_ref` loops over sequences; the oracle, plainly correct, slow at large batches;
- torch: the same math vectorized over the batch (torch_batched.py); the torch executor's CPU default;
- triton: the Triton kernels (CUDA; Triton's interpreter on CPU), the same kernels the TensorRT plugins embed.

Every implementation takes the arguments of the `*_ref` functions (shapes in each module's docstring) and
updates caches in place the same way, so the model code never knows which one runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from trtfalcon.plugins.attention import PAGED_ATTENTION
from trtfalcon.plugins.conv1d import CAUSAL_CONV1D
from trtfalcon.plugins.gated_norm import GATED_RMS_NORM, gated_rms_norm_ref
from trtfalcon.plugins.spec import OpSpec, torch_call
from trtfalcon.plugins.ssd import SSD

# Every op's one declaration (plugins/spec.py), by op name: what the exporter, the onnxruntime executor, the
# TensorRT plugins and the ahead-of-time build iterate over.
OPS: dict[str, OpSpec] = {op.name: op for op in (CAUSAL_CONV1D, SSD, GATED_RMS_NORM, PAGED_ATTENTION)}

KERNEL_CHOICES = ("reference", "torch", "triton")


@dataclass(frozen=True)
class Ops:
    name: str
    causal_conv1d: Callable
    ssd: Callable
    gated_rms_norm: Callable
    paged_attention: Callable


REFERENCE_OPS = Ops(name="reference", **{name: op.ref for name, op in OPS.items()})


def _torch_ops() -> Ops:
    from trtfalcon.plugins import torch_batched as tb

    return Ops(
        name="torch",
        causal_conv1d=tb.causal_conv1d_batched,
        ssd=tb.ssd_batched,
        gated_rms_norm=gated_rms_norm_ref,  # already one batched expression
        paged_attention=tb.paged_attention_batched,
    )


def _triton_ops() -> Ops:
    """The Triton kernels, each called through its one declaration (`OPS`, the same declaration the TensorRT
    plugins and the ahead-of-time build come from). CUDA tensors run on the GPU; CPU tensors need
    TRITON_INTERPRET=1 set before triton is imported (Triton's interpreter: slow, for verification)."""
    return Ops(name="triton", **{name: torch_call(op) for name, op in OPS.items()})


def get_ops(kernels: str = "reference") -> Ops:
    if kernels == "reference":
        return REFERENCE_OPS
    if kernels == "torch":
        return _torch_ops()
    if kernels == "triton":
        return _triton_ops()
    raise ValueError(f"kernels: expected one of {KERNEL_CHOICES}, found {kernels!r}")
