"""The reference model: one sequence, dense caches, plain torch. The oracle every executor is checked against.

It shares the small blocks (norms, RoPE, MLP, projections) with the ragged model in layers.py but keeps its own
cache handling: a contiguous KV cache per layer, a conv history and an SSM state, passed explicitly. The Mamba2
math comes from the dense references beside the kernels (causal_conv1d_ref, ssd_chunked_ref, ssd_recurrent_ref).
It is tested against transformers' FalconH1ForCausalLM on the original HF checkpoint (tests/test_reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trtfalcon.model.layers import (
    apply_rope, linear, mamba_in_proj, mlp, rms_norm, rope_cos_sin, split_qkv, split_xbc,
)
from trtfalcon.model.weights import DeployWeights
from trtfalcon.plugins.conv1d import causal_conv1d_ref
from trtfalcon.plugins.gated_norm import gated_rms_norm_ref
from trtfalcon.plugins.ssd import dt_transform, ssd_chunked_ref, ssd_recurrent_ref


@dataclass
class LayerCache:
    k: torch.Tensor  # (tokens, Hkv, D) after RoPE
    v: torch.Tensor  # (tokens, Hkv, D)
    conv_state: torch.Tensor | None  # (conv_dim, d_conv-1); None = zeros
    ssm_state: torch.Tensor | None  # (H, P, N) fp32; None = zeros


@dataclass
class ReferenceCache:
    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0  # tokens processed so far


class ReferenceModel:
    def __init__(self, weights: DeployWeights):
        self.w = weights
        self.cfg = weights.config

    def new_cache(self) -> ReferenceCache:
        cfg = self.cfg
        empty = torch.zeros(0, cfg.num_key_value_heads, cfg.head_dim, dtype=self.w.dtype)
        return ReferenceCache([LayerCache(empty, empty, None, None) for _ in range(cfg.num_hidden_layers)], 0)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: ReferenceCache | None = None) -> tuple[torch.Tensor, ReferenceCache]:
        """ids: (seqlen,) -> logits (seqlen, vocab) fp32 and the updated cache (a new object; the input is kept).

        With no cache this is a prefill from scratch; with one it continues the sequence (chunked prefill,
        or a one-token decode step)."""
        cfg, w = self.cfg, self.w
        cache = cache or self.new_cache()
        start = cache.length
        positions = torch.arange(start, start + ids.shape[0])
        h = F.embedding(ids.long(), w["embed_tokens.weight"])
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
        new_layers = []
        for i, lc in enumerate(cache.layers):
            p = f"layers.{i}"
            n = rms_norm(h, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
            m, conv_state, ssm_state = self._mamba(n, i, lc)
            a, k, v = self._attention(n, i, lc, cos, sin, start)
            h = h + m + a
            h = h + mlp(rms_norm(h, w[f"{p}.pre_ff_layernorm.weight"], cfg.rms_norm_eps), w, p)
            new_layers.append(LayerCache(k, v, conv_state, ssm_state))
        h = rms_norm(h, w["final_layernorm.weight"], cfg.rms_norm_eps)
        logits = F.linear(h, w["lm_head.weight"]).float()
        return logits, ReferenceCache(new_layers, start + ids.shape[0])

    def prefill(self, ids: torch.Tensor, cache: ReferenceCache | None = None) -> tuple[torch.Tensor, ReferenceCache]:
        return self.forward(ids, cache)

    def decode(self, token: int, cache: ReferenceCache) -> tuple[torch.Tensor, ReferenceCache]:
        """One token -> logits (vocab,)."""
        logits, cache = self.forward(torch.tensor([token]), cache)
        return logits[0], cache

    def _mamba(self, n: torch.Tensor, i: int, lc: LayerCache):
        cfg, w, p = self.cfg, self.w, f"layers.{i}"
        z, xbc, dt = mamba_in_proj(n, w, p, cfg)
        xbc, conv_state = causal_conv1d_ref(xbc, w[f"{p}.mamba.conv1d.weight"], w.get(f"{p}.mamba.conv1d.bias"), lc.conv_state)
        x, b, c = split_xbc(xbc, cfg)
        dt = dt_transform(dt, w[f"{p}.mamba.dt_bias"], cfg.time_step_limit)
        A = -torch.exp(w[f"{p}.mamba.A_log"].float())
        if x.shape[0] == 1:
            y, ssm_state = ssd_recurrent_ref(x, dt, A, b, c, w[f"{p}.mamba.D"], lc.ssm_state)
        else:
            y, ssm_state = ssd_chunked_ref(x, dt, A, b, c, w[f"{p}.mamba.D"], cfg.mamba_chunk_size, lc.ssm_state)
        y = gated_rms_norm_ref(
            y.reshape(y.shape[0], cfg.mamba_d_ssm), z, w.get(f"{p}.mamba.norm.weight"), cfg.mamba_n_groups,
            cfg.rms_norm_eps, cfg.mamba_norm_before_gate, n.dtype,
        )
        return linear(y, w, f"{p}.mamba.out_proj"), conv_state, ssm_state

    def _attention(self, n: torch.Tensor, i: int, lc: LayerCache, cos, sin, start: int):
        cfg, w, p = self.cfg, self.w, f"layers.{i}"
        q, k, v = split_qkv(linear(n, w, f"{p}.attn.qkv_proj"), cfg)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = torch.cat([lc.k, k]), torch.cat([lc.v, v])
        rep = cfg.gqa_group_size
        scores = torch.einsum("qhd,khd->hqk", q.float(), keys.float().repeat_interleave(rep, 1)) * cfg.head_dim**-0.5
        qpos = torch.arange(start, start + q.shape[0])
        causal = torch.arange(keys.shape[0])[None, :] <= qpos[:, None]
        scores = scores.masked_fill(~causal[None], -torch.inf)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        o = torch.einsum("hqk,khd->qhd", probs, values.repeat_interleave(rep, 1))
        return linear(o.reshape(o.shape[0], cfg.q_size), w, f"{p}.attn.o_proj"), keys, values
