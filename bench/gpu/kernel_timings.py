"""Time each plugin kernel at the rows of bench/kernel_roofline.py and compare with the roofline.

On a GPU (bench/gpu/check.sh): the 7B's shapes, the Triton kernels compiled for the device, each row timed as
CUDA-graph replays of many calls (triton.testing.do_bench_cudagraph, median), so Python launch overhead is out of
the figure; inputs rotate over enough copies that one row's data is at least twice the L2 (a decode norm moves
0.6 MB: timed on one buffer it would run from the L2, not HBM). Per row: microseconds, achieved GB/s and TFLOP/s
(the roofline's minimum bytes and FLOPs over the time), and the fraction of the roofline (roofline time / time).

    python bench/gpu/kernel_timings.py --out kernel_timings.json            # GPU, 7B shapes
    python bench/gpu/kernel_timings.py --dry-run --out kernel_timings.json  # CPU: tiny shapes, interpreted kernels

--dry-run runs the same rows on the tiny preset's shapes in Triton's interpreter (host clock, one call each): the
script's own check, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: kernel_roofline

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by trtfalcon.plugins)

import kernel_roofline  # noqa: E402

from trtfalcon.config import FalconH1Config, preset  # noqa: E402
from trtfalcon.dtypes import lookup  # noqa: E402
from trtfalcon.plugins.ops import get_ops  # noqa: E402

L2_BYTES = 60e6  # H200 (KINDS.md)
MAX_SET_BYTES = 2e9  # rotated copies of one row's inputs, at most
DRY_SCENARIOS = (("decode b=4", 4, 4, 40), ("decode b=8", 8, 8, 40), ("prefill 32", 1, 32, 0),
                 ("prefill 96", 1, 96, 0))


def _ragged(seqs: int, tokens: int, ctx: int, device: torch.device):
    per = tokens // seqs
    i32 = dict(dtype=torch.int32, device=device)
    cu = torch.arange(seqs + 1, **i32) * per
    return cu, torch.full((seqs,), ctx, **i32), torch.arange(seqs, **i32)


def make_call(kernel: str, cfg: FalconH1Config, seqs: int, tokens: int, ctx: int, dtype: torch.dtype,
              device: torch.device, block_size: int = 16):
    """(a zero-argument function running the op once on fresh random inputs, the op's name in get_ops)."""
    ops = get_ops("triton")
    cu, ctx_t, slots = _ragged(seqs, tokens, ctx, device)
    r = dict(device=device)
    if kernel == "causal_conv1d":
        x = torch.randn(tokens, cfg.conv_dim, dtype=dtype, **r)
        w = torch.randn(cfg.conv_dim, cfg.mamba_d_conv, dtype=dtype, **r) * 0.3
        b = torch.randn(cfg.conv_dim, dtype=dtype, **r) if cfg.mamba_conv_bias else None
        state = torch.randn(seqs, cfg.conv_dim, cfg.conv_state_len, dtype=dtype, **r)
        return lambda: ops.causal_conv1d(x, w, b, state, cu, ctx_t, slots)
    if kernel.startswith("ssd"):
        H, P, G, N = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_groups, cfg.mamba_d_state
        x = torch.randn(tokens, H, P, dtype=dtype, **r)
        dt = torch.randn(tokens, H, dtype=dtype, **r)
        A = -torch.rand(H, **r) * 8 - 1
        B, C = (torch.randn(tokens, G, N, dtype=dtype, **r) for _ in range(2))
        D, dt_bias = torch.randn(H, **r), torch.randn(H, **r) - 4
        state = torch.randn(seqs, H, P, N, **r) * 0.1
        return lambda: ops.ssd(x, dt, A, B, C, D, dt_bias, state, cu, ctx_t, slots, cfg.mamba_chunk_size,
                               cfg.time_step_limit)
    if kernel == "gated_rms_norm":
        y, z = (torch.randn(tokens, cfg.mamba_d_ssm, dtype=dtype, **r) for _ in range(2))
        w = torch.randn(cfg.mamba_d_ssm, dtype=dtype, **r) if cfg.mamba_rms_norm else None
        return lambda: ops.gated_rms_norm(y, z, w, cfg.mamba_n_groups, cfg.rms_norm_eps, cfg.mamba_norm_before_gate,
                                          dtype)
    if kernel.startswith("paged_attention"):
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = torch.randn(tokens, hq, d, dtype=dtype, **r)
        k, v = (torch.randn(tokens, hkv, d, dtype=dtype, **r) for _ in range(2))
        per_seq = math.ceil((ctx + tokens // seqs) / block_size)
        cache = torch.randn(2, seqs * per_seq, block_size, hkv, d, dtype=dtype, **r)
        tables = torch.randperm(seqs * per_seq, device=device).to(torch.int32).reshape(seqs, per_seq)
        return lambda: ops.paged_attention(q, k, v, cache, tables, cu, ctx_t, d**-0.5)
    raise ValueError(f"no inputs for kernel {kernel!r}")


def time_row(row, cfg, scenario, dtype, device, dry_run: bool) -> float:
    """Median microseconds of one call."""
    _, seqs, tokens, ctx = scenario
    if dry_run:
        fn = make_call(row.kernel, cfg, seqs, tokens, ctx, dtype, device)
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    import triton.testing

    sets = int(min(max(1, math.ceil(2 * L2_BYTES / row.bytes)), max(1, MAX_SET_BYTES // row.bytes), 32))
    calls = [make_call(row.kernel, cfg, seqs, tokens, ctx, dtype, device) for _ in range(sets)]
    for c in calls:
        c()  # compile outside the graph
    torch.cuda.synchronize()
    turn = [0]

    def fn() -> None:
        calls[turn[0] % sets]()
        turn[0] += 1

    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    dtype = lookup(args.dtype).torch
    if args.dry_run:
        cfg, scenarios, device = preset("tiny"), DRY_SCENARIOS, torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("kernel_timings: no CUDA device (use --dry-run on a CPU)")
        cfg, scenarios, device = preset("7b"), kernel_roofline.SCENARIOS, torch.device("cuda")
    by_name = {s[0]: s for s in scenarios}
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
            "dtype": args.dtype, "preset": "tiny" if args.dry_run else "7b",
            "hbm_bytes_per_s": kernel_roofline.HBM_BYTES_PER_S, "bf16_flop_per_s": kernel_roofline.BF16_FLOP_PER_S,
            "method": "host clock, one call" if args.dry_run else "do_bench_cudagraph median, rotated inputs"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for row in kernel_roofline.rows(cfg, scenarios):
        entry = {"kernel": row.kernel, "scenario": row.scenario, "tokens": row.tokens, "roofline_us": row.t_roof_us,
                 "bound": row.bound, "mb_moved": row.bytes / 1e6, "gflop": row.flops / 1e9}
        try:
            torch.manual_seed(0)
            us = time_row(row, cfg, by_name[row.scenario], dtype, device, args.dry_run)
            entry.update(us=us, gb_per_s=row.bytes / us / 1e3, tflop_per_s=row.flops / us / 1e6,
                         fraction_of_roofline=row.t_roof_us / us)
        except Exception as exc:  # noqa: BLE001 - one kernel's failure still reports the others
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        results.append(entry)
        shown = (f"{entry['us']:9.1f} us {entry['gb_per_s']:8.1f} GB/s {entry['fraction_of_roofline']:6.1%}"
                 if "us" in entry else entry["error"][:80])
        print(f"{row.kernel:<24}{row.scenario:<14}{shown}", flush=True)
        # after every row: a part stopped at its time box still reports the rows it timed
        args.out.write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
