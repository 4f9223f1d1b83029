"""Roofline of each plugin kernel at Falcon-H1-7B's shapes: bytes it must move, FLOPs it must do, time implied.

Per call = one layer (the 7B runs each kernel once per layer, 44 layers per step). Scenarios: decode at batch 32
and 64 (every sequence with CONTEXT tokens already cached), and one prefill of 512 and of 8192 tokens from an empty
cache. H200: 4.3 TB/s HBM3e, ~989 TFLOP/s dense bf16 (tensor cores). Activations bf16, KV cache bf16, conv
state bf16, SSM state fp32 (the contract's default; bf16 halves the SSD decode bytes).

The counts are the algorithm's minimum (each tensor read or written once; the SSD's chunked form at the model's
chunk length 256, CB computed once per group). What our kernels do beyond that (the chunked SSD recomputes C B^T
per head and 16-channel block, with a 16-token chunk to stay within registers; paged attention re-reads K/V per
query tile) is noted in the "kernel" column, not counted.

Run: python bench/kernel_roofline.py  ->  prints a table, writes bench/results/kernel_roofline.{json,md}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from trtfalcon.config import FalconH1Config, preset

HBM_BYTES_PER_S = 4.3e12
BF16_FLOP_PER_S = 989e12
CONTEXT = 4096  # tokens already cached per sequence in the decode scenarios
BF16, FP32 = 2, 4


@dataclass
class Row:
    kernel: str
    scenario: str
    tokens: int
    bytes: float
    flops: float
    t_mem_us: float = 0.0
    t_flop_us: float = 0.0
    bound: str = ""
    t_roof_us: float = 0.0
    t_roof_44_layers_us: float = 0.0
    note: str = ""

    def finish(self) -> Row:
        self.t_mem_us = self.bytes / HBM_BYTES_PER_S * 1e6
        self.t_flop_us = self.flops / BF16_FLOP_PER_S * 1e6
        self.bound = "memory" if self.t_mem_us >= self.t_flop_us else "compute"
        self.t_roof_us = max(self.t_mem_us, self.t_flop_us)
        self.t_roof_44_layers_us = self.t_roof_us * 44
        return self


# (name, sequences, tokens, tokens already cached per sequence); decode = one token per sequence
SCENARIOS = (("decode b=32", 32, 32, CONTEXT), ("decode b=64", 64, 64, CONTEXT),
             ("prefill 512", 1, 512, 0), ("prefill 8k", 1, 8192, 0))


def rows(cfg: FalconH1Config | None = None, scenarios: tuple[tuple[str, int, int, int], ...] = SCENARIOS) -> list[Row]:
    """The table for `cfg` (default: the 7B) over `scenarios` (bench/gpu/kernel_timings.py times the same rows)."""
    cfg = cfg or preset("7b")
    H, P, N, G = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state, cfg.mamba_n_groups
    d_ssm, conv_dim, K = cfg.mamba_d_ssm, cfg.conv_dim, cfg.mamba_d_conv
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Q = cfg.mamba_chunk_size
    state_bytes = H * P * N * FP32  # per sequence
    out: list[Row] = []
    for name, seqs, T, ctx in scenarios:
        decode = T == seqs
        # causal conv1d: x in, out, conv state read + write, weights
        out.append(Row("causal_conv1d", name, T,
                       bytes=2 * T * conv_dim * BF16 + 2 * seqs * conv_dim * (K - 1) * BF16 + conv_dim * (K + 1) * BF16,
                       flops=T * conv_dim * (2 * K + 1 + 4),  # taps (FMA), bias, SiLU ~4
                       note="one program per sequence x 64 channels").finish())
        # SSD
        io = T * (2 * d_ssm + 2 * G * N + H) * BF16  # x, y, B, C, dt
        if decode:
            out.append(Row("ssd_recurrent", name, T, bytes=io + 2 * seqs * state_bytes,
                           flops=T * H * P * N * 5,  # decay*S, dt*x*B (FMA), S.C (FMA)
                           note="state read+write dominates (3 MiB fp32 per sequence)").finish())
        else:
            per_token = H * (2 * Q * P + 4 * N * P) + G * 2 * Q * N  # y_diag, y_off + states, CB per group
            out.append(Row("ssd (chunked)", name, T, bytes=io + 2 * seqs * state_bytes, flops=T * per_token,
                           note="kernel: 16-token chunks, CB recomputed per head x 16 channels").finish())
        # gated RMSNorm: y, z in, out
        out.append(Row("gated_rms_norm", name, T, bytes=3 * T * d_ssm * BF16 + d_ssm * BF16,
                       flops=T * d_ssm * 9, note="one program per token x group").finish())
        # paged attention
        kv_row = 2 * hkv * hd * BF16  # one position's K and V
        qkvo = T * (2 * hq * hd + 2 * hkv * hd) * BF16
        if decode:
            out.append(Row("paged_attention_decode", name, T,
                           bytes=qkvo + seqs * ctx * kv_row + T * kv_row,
                           flops=T * 4 * (ctx + 1) * hq * hd,
                           note=f"context {ctx}; K/V read once per KV head (GQA rows packed)").finish())
        else:
            out.append(Row("paged_attention", name, T, bytes=qkvo + T * kv_row,
                           flops=4 * hq * hd * T * (T + 1) / 2,  # causal: QK^T and PV over the lower triangle
                           note="causal from an empty cache").finish())
    return out


def to_markdown(rs: list[Row]) -> str:
    head = ("| kernel | scenario | tokens | MB moved | GFLOP | t_mem us | t_flop us | bound | roofline us/layer "
            "| x44 layers us | note |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r.kernel} | {r.scenario} | {r.tokens} | {r.bytes / 1e6:.2f} | {r.flops / 1e9:.3f} | {r.t_mem_us:.2f} "
        f"| {r.t_flop_us:.2f} | {r.bound} | {r.t_roof_us:.2f} | {r.t_roof_44_layers_us:.1f} | {r.note} |\n"
        for r in rs)
    return (f"# Plugin kernel roofline, Falcon-H1-7B, H200 ({HBM_BYTES_PER_S / 1e12:.1f} TB/s, "
            f"{BF16_FLOP_PER_S / 1e12:.0f} TFLOP/s bf16 dense)\n\n"
            f"Per call = one layer. Decode: every sequence has {CONTEXT} cached tokens. SSM state fp32, "
            "everything else bf16. Minimum traffic and FLOPs of the algorithm; see bench/kernel_roofline.py.\n\n"
            + head + body)


def main() -> None:
    rs = rows()
    md = to_markdown(rs)
    print(md)
    out = Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_roofline.json").write_text(json.dumps(
        {"hbm_bytes_per_s": HBM_BYTES_PER_S, "bf16_flop_per_s": BF16_FLOP_PER_S, "decode_context": CONTEXT,
         "rows": [asdict(r) for r in rs]}, indent=2) + "\n")
    (out / "kernel_roofline.md").write_text(md)


if __name__ == "__main__":
    main()
