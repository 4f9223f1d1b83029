"""Falcon-H1 on a ragged batch: the model every executor runs (torch here; the ONNX graph mirrors it).

One decoder layer (attention and Mamba2 in PARALLEL on one shared pre-norm; multipliers already folded):
    n = input_layernorm(h)
    h = h + out_proj(gated_norm(ssd(conv(in_proj(n))))) + o_proj(attention(rope(qkv_proj(n))))
    h = h + down_proj(up * silu(gate)),  [gate | up] = gate_up_proj(pre_ff_layernorm(h))
The Mamba conv, SSD scan, gated norm and paged attention are plugin ops (trtfalcon.plugins.ops): torch
references on CPU, Triton kernels on CUDA; they read and update the cache pools of the engine I/O contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from trtfalcon.config import FalconH1Config
from trtfalcon.errors import CheckpointError
from trtfalcon.model.weights import DeployWeights
from trtfalcon.plugins.ops import Ops, get_ops
from trtfalcon.checkpoint.deploy_fp8 import FP8_DTYPE, KV_SCALES, fake_quant_fp8
from trtfalcon.runtime.contract import StepBatch

if TYPE_CHECKING:
    from trtfalcon.model.fp8_gemm import ScaledMmLinears

# linear's signature: (x, weights, deploy name of the linear) -> x @ W.T + b. A model whose FP8 linears run as FP8
# GEMMs passes its own (FalconH1Model.proj); None means the module's `linear`, looked up at call time.
Linear = Callable[[torch.Tensor, DeployWeights, str], torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' FalconH1RMSNorm: fp32 statistics, cast back, THEN the weight (in the weight's dtype)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def linear(x: torch.Tensor, w: DeployWeights, name: str) -> torch.Tensor:
    """x @ W.T + b. For an FP8 linear (an input_scale is present) the input is fake-quantized to E4M3 and the
    weight dequantized, as TensorRT's explicit Q/DQ computes it (trtfalcon.checkpoint.deploy_fp8)."""
    input_scale = w.get(f"{name}.input_scale")
    if input_scale is not None:
        x = fake_quant_fp8(x, input_scale)
    return F.linear(x, w.dense(f"{name}.weight"), w.get(f"{name}.bias"))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style RoPE tables over the full head_dim: (tokens, head_dim) each, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim); rotate_half convention (transformers' apply_rotary_pos_emb)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def mlp(n: torch.Tensor, w: DeployWeights, prefix: str, proj: Linear | None = None) -> torch.Tensor:
    proj = proj or linear
    gate, up = proj(n, w, f"{prefix}.mlp.gate_up_proj").chunk(2, dim=-1)
    return proj(up * F.silu(gate), w, f"{prefix}.mlp.down_proj")


def split_qkv(qkv: torch.Tensor, cfg: FalconH1Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = qkv.shape[0]
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    return (  # q and k get new tensors from RoPE; v goes to the kernel as is, so it must be dense
        q.reshape(t, cfg.num_attention_heads, cfg.head_dim),
        k.reshape(t, cfg.num_key_value_heads, cfg.head_dim),
        v.reshape(t, cfg.num_key_value_heads, cfg.head_dim).contiguous(),
    )


def mamba_in_proj(n: torch.Tensor, w: DeployWeights, prefix: str, cfg: FalconH1Config, proj: Linear | None = None):
    """-> z (T, d_ssm), xBC (T, conv_dim), dt (T, H), each contiguous: the plugin kernels index dense layouts."""
    zxbcdt = (proj or linear)(n, w, f"{prefix}.mamba.in_proj")
    z, xbc, dt = zxbcdt.split([cfg.mamba_d_ssm, cfg.conv_dim, cfg.mamba_n_heads], -1)
    return z.contiguous(), xbc.contiguous(), dt.contiguous()


def split_xbc(xbc: torch.Tensor, cfg: FalconH1Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """xBC (T, conv_dim) -> x (T, H, P), B (T, G, N), C (T, G, N)."""
    t = xbc.shape[0]
    gn = cfg.ssm_group_state_size
    x, b, c = xbc.split([cfg.mamba_d_ssm, gn, gn], dim=-1)
    return (
        x.reshape(t, cfg.mamba_n_heads, cfg.mamba_d_head).contiguous(),
        b.reshape(t, cfg.mamba_n_groups, cfg.mamba_d_state).contiguous(),
        c.reshape(t, cfg.mamba_n_groups, cfg.mamba_d_state).contiguous(),
    )


def kv_cache_scales(w: DeployWeights, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's FP8 KV-cache scales (deploy_fp8.py: cache = fp8(k / k_scale)). Only an FP8 pool uses them: a
    bf16/fp32 pool ignores scales a checkpoint may carry, so it computes what it did before FP8 KV existed."""
    scales = []
    for leaf in KV_SCALES:
        name = f"layers.{i}.{leaf}"
        t = w.get(name)
        if t is None:
            raise CheckpointError(f"an FP8 KV cache needs tensor '{name}' (fp32 scalar, calibrated by `trtfalcon "
                                  "quantize --kv-cache-dtype fp8`); the checkpoint has none: use a bf16/fp32 KV cache "
                                  "or re-quantize with --kv-cache-dtype fp8")
        scales.append(t.float())
    return scales[0], scales[1]


class FalconH1Model:
    """The ragged-batch model: `forward(batch, pools)` runs one step of the engine I/O contract.

    fp8_gemms: the FP8 linears as FP8 GEMMs (model/fp8_gemm.py, CUDA); without it they are fake-quantized."""

    def __init__(self, weights: DeployWeights, ops: Ops | None = None, fp8_gemms: ScaledMmLinears | None = None):
        self.w = weights
        self.cfg = weights.config
        self.ops = ops or get_ops("reference")
        self.dtype = weights.dtype
        self.fp8_gemms = fp8_gemms
        self.proj: Linear | None = self._fp8_or_linear if fp8_gemms is not None and fp8_gemms.names() else None
        # A = -exp(A_log), once, in fp32 (the SSD kernels take A).
        self.A = [-torch.exp(weights[f"layers.{i}.mamba.A_log"].float()) for i in range(self.cfg.num_hidden_layers)]

    @torch.inference_mode()
    def forward(self, batch: StepBatch, pools: dict[str, torch.Tensor]) -> torch.Tensor:
        """-> logits (num_seqs, vocab) fp32 for the last token of each sequence; pools updated in place."""
        cfg, w = self.cfg, self.w
        h = F.embedding(batch.input_ids.long(), w["embed_tokens.weight"])
        cos, sin = rope_cos_sin(batch.positions, cfg.head_dim, cfg.rope_theta, h.dtype)
        for i in range(cfg.num_hidden_layers):
            p = f"layers.{i}"
            n = rms_norm(h, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
            m = self._mamba(n, i, batch, pools)
            a = self._attention(n, i, batch, pools, cos, sin)
            h = h + m + a
            h = h + mlp(rms_norm(h, w[f"{p}.pre_ff_layernorm.weight"], cfg.rms_norm_eps), w, p, self.proj)
        last = (batch.cu_seqlens[1:] - 1).long()
        h = rms_norm(h[last], w["final_layernorm.weight"], cfg.rms_norm_eps)
        return F.linear(h, w["lm_head.weight"]).float()

    def _fp8_or_linear(self, x: torch.Tensor, w: DeployWeights, name: str) -> torch.Tensor:
        return self.fp8_gemms(x, name) if name in self.fp8_gemms else linear(x, w, name)

    def _mamba(self, n: torch.Tensor, i: int, batch: StepBatch, pools: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg, w, p = self.cfg, self.w, f"layers.{i}"
        z, xbc, dt = mamba_in_proj(n, w, p, cfg, self.proj)
        xbc = self.ops.causal_conv1d(
            xbc, w[f"{p}.mamba.conv1d.weight"], w.get(f"{p}.mamba.conv1d.bias"), pools[f"conv_state.{i}"],
            batch.cu_seqlens, batch.context_lens, batch.state_slots,
        )
        x, b, c = split_xbc(xbc, cfg)
        y = self.ops.ssd(
            x, dt, self.A[i], b, c, w[f"{p}.mamba.D"], w[f"{p}.mamba.dt_bias"], pools[f"ssm_state.{i}"],
            batch.cu_seqlens, batch.context_lens, batch.state_slots, cfg.mamba_chunk_size, cfg.time_step_limit,
        )
        y = self.ops.gated_rms_norm(
            y.reshape(y.shape[0], cfg.mamba_d_ssm), z, w.get(f"{p}.mamba.norm.weight"), cfg.mamba_n_groups,
            cfg.rms_norm_eps, cfg.mamba_norm_before_gate, n.dtype,
        )
        return (self.proj or linear)(y, w, f"{p}.mamba.out_proj")

    def _attention(
        self, n: torch.Tensor, i: int, batch: StepBatch, pools: dict[str, torch.Tensor],
        cos: torch.Tensor, sin: torch.Tensor,
    ) -> torch.Tensor:
        cfg, w, p = self.cfg, self.w, f"layers.{i}"
        proj = self.proj or linear
        q, k, v = split_qkv(proj(n, w, f"{p}.attn.qkv_proj"), cfg)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv_cache = pools[f"kv_cache.{i}"]
        k_scale, v_scale = kv_cache_scales(w, i) if kv_cache.dtype == FP8_DTYPE else (None, None)
        o = self.ops.paged_attention(
            q, k, v, kv_cache, batch.block_tables, batch.cu_seqlens, batch.context_lens,
            cfg.head_dim**-0.5, k_scale, v_scale,
        )
        return proj(o.reshape(o.shape[0], cfg.q_size), w, f"{p}.attn.o_proj")
