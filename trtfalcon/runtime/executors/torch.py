"""The torch executor: runs the engine I/O contract with the ragged-batch model (trtfalcon.model.layers).

On CPU it uses the vectorized torch versions of the plugin ops; on CUDA the same code runs the Triton kernels;
`kernels="reference"` runs the loop references (the oracle).
`kernels="triton"` on a CPU runs those kernels in Triton's interpreter (slow; for verification).
"""

from __future__ import annotations

import torch

from trtfalcon.errors import CheckpointError, MissingDependencyError
from trtfalcon.model.layers import FalconH1Model
from trtfalcon.model.weights import DeployWeights
from trtfalcon.plugins.ops import get_ops
from trtfalcon.runtime.contract import CacheSpec, StepBatch
from trtfalcon.runtime.executors.base import TorchPools

STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The KV pool may also be FP8 (E4M3 with per-layer k/v scales from the checkpoint); the Mamba states may not.
KV_DTYPES = {**STATE_DTYPES, "fp8": torch.float8_e4m3fn}


def check_fp8_kv_scales(weights: DeployWeights, source: str = "the checkpoint") -> None:
    """An FP8 KV pool needs every layer's k_scale and v_scale: refuse up front, naming the first missing tensor,
    rather than fail inside the first step (or silently run with scale 1, which saturates real activations)."""
    from trtfalcon.quantize.fp8_format import KV_SCALES

    for i in range(weights.config.num_hidden_layers):
        for leaf in KV_SCALES:
            name = f"layers.{i}.{leaf}"
            if weights.get(name) is None:
                raise CheckpointError(
                    f"--kv-cache-dtype fp8: {source} has no tensor '{name}' (an fp32 scalar; cache = "
                    "fp8(k / k_scale)); FP8 KV needs scales calibrated by `trtfalcon quantize --kv-cache-dtype fp8` (then convert), "
                    "or run with --kv-cache-dtype auto"
                )


def resolve_kernels(kernels: str, device: torch.device) -> str:
    """'auto' -> Triton kernels on CUDA, the vectorized torch ops elsewhere."""
    if kernels == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if kernels == "triton" and device.type == "cpu":
        from trtfalcon.plugins.triton_lang import INTERPRETING

        if not INTERPRETING:  # Triton decides interpreter vs compiler when it is first imported
            raise MissingDependencyError(
                "--kernels triton on a CPU runs Triton's interpreter, which must be switched on before triton is "
                "imported: set TRITON_INTERPRET=1 in the environment (the trtfalcon CLI does this itself)"
            )
    return kernels



class TorchExecutor(TorchPools):
    def __init__(
        self,
        weights: DeployWeights,
        *,
        num_blocks: int,
        block_size: int,
        num_slots: int,
        device: str | torch.device = "cpu",
        kernels: str = "auto",
        kv_dtype: str | None = None,
        ssm_dtype: str = "fp32",
        conv_dtype: str | None = None,
    ):
        self.device = torch.device(device)
        self.kernels = resolve_kernels(kernels, self.device)
        self.cache_spec = self.cache_spec_for(weights, num_blocks=num_blocks, block_size=block_size,
                                              num_slots=num_slots, kv_dtype=kv_dtype, ssm_dtype=ssm_dtype,
                                              conv_dtype=conv_dtype)
        self.model = FalconH1Model(weights.to(self.device), get_ops(self.kernels))
        self.vocab_size = weights.config.vocab_size
        self.pools = self.cache_spec.allocate(self.device)

    @staticmethod
    def cache_spec_for(weights: DeployWeights, *, num_blocks: int, block_size: int, num_slots: int,
                       kv_dtype: str | None = None, ssm_dtype: str = "fp32", conv_dtype: str | None = None) -> CacheSpec:
        """The pools this executor allocates for these weights (KV and conv state default to the weights' dtype)."""
        model_dtype = {v: k for k, v in STATE_DTYPES.items()}[weights.dtype]
        kv_dtype = None if kv_dtype in (None, "auto") else kv_dtype
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype: expected auto or one of {', '.join(KV_DTYPES)}, found {kv_dtype!r}")
        if kv_dtype == "fp8":
            check_fp8_kv_scales(weights)
        return CacheSpec.for_model(
            weights.config, num_blocks=num_blocks, block_size=block_size, num_slots=num_slots,
            kv_dtype=KV_DTYPES[kv_dtype or model_dtype], conv_dtype=STATE_DTYPES[conv_dtype or model_dtype],
            ssm_dtype=STATE_DTYPES[ssm_dtype],
        )

    def execute(self, batch: StepBatch) -> torch.Tensor:
        return self.model.forward(batch.to(self.device), self.pools)

