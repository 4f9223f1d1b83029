"""The torch executor: runs the engine I/O contract with the ragged-batch model (trtfalcon.model.layers).

On CPU it uses the vectorized torch versions of the plugin ops; on CUDA the same code runs the Triton kernels;
`kernels="reference"` runs the loop references (the oracle).
`kernels="triton"` on a CPU runs those kernels in Triton's interpreter (slow; for verification).

On CUDA (TensorRT-free GPU speed):
- decode steps replay CUDA graphs captured per batch-size bucket (cuda_graphs.py), prefill and mixed steps run
  eagerly; the pools then hold one more state slot and KV block than the cache spec, the padding rows' scratch;
- FP8 linears run as FP8 GEMMs (torch._scaled_mm, model/fp8_gemm.py) when the compute dtype is bf16/fp16 on sm_89+,
  else (and on CPU) fake-quantized as TensorRT's Q/DQ computes them;
- a step's inputs go to the device in one copy (step_inputs.py).
"""

from __future__ import annotations

import dataclasses

import torch

from trtfalcon.dtypes import FLOAT_NAMES, KV_CACHE_NAMES, lookup
from trtfalcon.errors import CheckpointError, MissingDependencyError
from trtfalcon.model.layers import FalconH1Model
from trtfalcon.model.weights import DeployWeights
from trtfalcon.plugins.ops import get_ops
from trtfalcon.runtime.contract import CacheSpec, StepBatch
from trtfalcon.runtime.executors.base import TorchPools
from trtfalcon.runtime.executors.cuda_graphs import Capture, DecodeGraphs, decode_buckets
from trtfalcon.runtime.executors.step_inputs import StepInputBuffer

FP8_GEMM_CHOICES = ("auto", "scaled_mm", "fake_quant")


def check_fp8_kv_scales(weights: DeployWeights, source: str = "the checkpoint") -> None:
    """An FP8 KV pool needs every layer's k_scale and v_scale: refuse up front, naming the first missing tensor,
    rather than fail inside the first step (or silently run with scale 1, which saturates real activations)."""
    from trtfalcon.checkpoint.deploy_fp8 import KV_SCALES

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



def resolve_fp8_gemm(fp8_gemm: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' -> FP8 GEMMs where _scaled_mm's row-wise kernels run (CUDA sm_89+, bf16/fp16 out), else fake-quant."""
    if fp8_gemm not in FP8_GEMM_CHOICES:
        raise ValueError(f"fp8_gemm: expected one of {FP8_GEMM_CHOICES}, found {fp8_gemm!r}")
    if fp8_gemm != "auto":
        return fp8_gemm
    fast = (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(device) >= (8, 9))
    return "scaled_mm" if fast else "fake_quant"


class TorchExecutor(TorchPools):
    """cuda_graphs: None = on for CUDA; True on a CPU runs the same bucketing with EagerReplay (tests).
    graph_capture: how a graph is captured (default: torch.cuda.CUDAGraph on CUDA, EagerReplay elsewhere).
    fp8_gemm: auto | scaled_mm | fake_quant (FP8 checkpoints only)."""

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
        cuda_graphs: bool | None = None,
        fp8_gemm: str = "auto",
        graph_capture: Capture | None = None,
    ):
        self.device = torch.device(device)
        self.kernels = resolve_kernels(kernels, self.device)
        self.cache_spec = self.cache_spec_for(weights, num_blocks=num_blocks, block_size=block_size,
                                              num_slots=num_slots, kv_dtype=kv_dtype, ssm_dtype=ssm_dtype,
                                              conv_dtype=conv_dtype)
        weights = weights.to(self.device)
        self.fp8_gemm = resolve_fp8_gemm(fp8_gemm, self.device, weights.dtype)
        fp8 = None
        if self.fp8_gemm == "scaled_mm":
            from trtfalcon.model.fp8_gemm import ScaledMmLinears

            fp8 = ScaledMmLinears(weights)
        self.model = FalconH1Model(weights, get_ops(self.kernels), fp8)
        self.vocab_size = weights.config.vocab_size
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        spec = self.cache_spec
        # padding rows of a graph's bucket write one scratch slot and block beyond what the scheduler hands out
        pools_spec = dataclasses.replace(spec, num_slots=spec.num_slots + 1, num_blocks=spec.num_blocks + 1) \
            if use_graphs else spec
        self.pools = pools_spec.allocate(self.device)
        self.graphs = DecodeGraphs(self._forward, decode_buckets(num_slots), self.device,
                                   scratch_slot=spec.num_slots, scratch_block=spec.num_blocks,
                                   capture=graph_capture) if use_graphs else None
        self._inputs = StepInputBuffer(self.device) if self.device.type == "cuda" else None
        self.eager_steps = 0

    @staticmethod
    def cache_spec_for(weights: DeployWeights, *, num_blocks: int, block_size: int, num_slots: int,
                       kv_dtype: str | None = None, ssm_dtype: str = "fp32", conv_dtype: str | None = None) -> CacheSpec:
        """The pools this executor allocates for these weights (KV and conv state default to the weights' dtype)."""
        model_dtype = lookup(weights.dtype, "torch", among=FLOAT_NAMES, what="weights dtype").name
        kv_dtype = None if kv_dtype in (None, "auto") else kv_dtype
        if kv_dtype is not None and kv_dtype not in KV_CACHE_NAMES:
            raise ValueError(f"kv_dtype: expected auto or one of {', '.join(KV_CACHE_NAMES)}, found {kv_dtype!r}")
        if kv_dtype == "fp8":
            check_fp8_kv_scales(weights)
        return CacheSpec.for_model(
            weights.config, num_blocks=num_blocks, block_size=block_size, num_slots=num_slots,
            kv_dtype=lookup(kv_dtype or model_dtype, among=KV_CACHE_NAMES).torch,  # FP8: E4M3, the Mamba states may not
            conv_dtype=lookup(conv_dtype or model_dtype, among=FLOAT_NAMES, what="conv_dtype").torch,
            ssm_dtype=lookup(ssm_dtype, among=FLOAT_NAMES, what="ssm_dtype").torch,
        )

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Logits of the step; with graphs, a decode step's are a view valid until the next step."""
        if self.graphs is not None and self.graphs.runs(batch):
            return self.graphs.run(batch)
        self.eager_steps += 1
        return self._forward(self._inputs.load(batch) if self._inputs is not None else batch.to(self.device))

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        return self.model.forward(batch, self.pools)

    def capture_graphs(self, max_seq_len: int) -> None:
        """Capture every decode bucket now (else at the first decode step), for the block tables of an engine
        whose max_seq_len is this: ceil(max_seq_len / block_size) columns, as the scheduler builds them."""
        if self.graphs is not None:
            self.graphs.capture_width(-(-max_seq_len // self.cache_spec.block_size))

