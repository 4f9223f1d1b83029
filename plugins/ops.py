"""The custom ops a Falcon-H1 layer calls, behind one switch: torch references or Triton kernels.

Every implementation takes the arguments of the `*_ref` functions (shapes in each module's docstring) and
updates caches in place the same way, so the model code never knows which one runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from trtfalcon.plugins.attention import paged_attention_ref
from trtfalcon.plugins.conv1d import causal_conv1d_varlen_ref
from trtfalcon.plugins.gated_norm import gated_rms_norm_ref
from trtfalcon.plugins.ssd import ssd_varlen_ref

KERNEL_CHOICES = ("reference", "triton")


@dataclass(frozen=True)
class Ops:
    name: str
    causal_conv1d: Callable
    ssd: Callable
    gated_rms_norm: Callable
    paged_attention: Callable


REFERENCE_OPS = Ops(
    name="reference",
    causal_conv1d=causal_conv1d_varlen_ref,
    ssd=ssd_varlen_ref,
    gated_rms_norm=gated_rms_norm_ref,
    paged_attention=paged_attention_ref,
)


def get_ops(kernels: str = "reference") -> Ops:
    if kernels == "reference":
        return REFERENCE_OPS
    raise ValueError(f"kernels: expected one of {KERNEL_CHOICES}, found {kernels!r}")
