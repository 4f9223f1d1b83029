"""End-to-end throughput of the torch executor on a GPU: a 7B-shaped model with random weights made on the device.

`trtfalcon bench`'s measurement (trtfalcon.bench.throughput.run_concurrency: trtllm-bench's method, EOS ignored,
warm-up not counted) on an executor whose weights are drawn directly in GPU memory (model/random_weights.py: no
15 GB checkpoint file), with the CUDA-graph decode path and, for --weights fp8, FP8 GEMMs. One wave of `batch`
requests per batch size (all arrive together: the same work as transformers' generate on a static batch, which
bench/gpu/hf_generate.py measures beside it).

    python bench/gpu/e2e.py --weights bf16 --batch 32 --batch 64 --isl 512 --osl 256 --out e2e-bf16.json
    python bench/gpu/e2e.py --weights fp8 --kv-cache-dtype fp8 --ssm-state-dtype bf16 --batch 64 --out x.json
    python bench/gpu/e2e.py --dry-run --weights fp8 --out e2e.json     # CPU: tiny preset, same code path

Besides tokens/s it reports the decode step against its memory roofline: the bytes a decode step must move (every
weight once, each sequence's Mamba state read and written, its KV cache read at the mean context) over 4.3 TB/s,
divided by the measured time per output token (TPOT P50, one decode step of the whole batch).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from trtfalcon.bench.dataset import token_norm_dist
from trtfalcon.bench.throughput import run_concurrency
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.config import FalconH1Config, preset
from trtfalcon.dtypes import lookup
from trtfalcon.model.random_weights import random_deploy_weights
from trtfalcon.runtime.executors.torch import TorchExecutor

HBM_BYTES_PER_S = 4.3e12  # bench/kernel_roofline.py's H200 figure
CUDA_GRAPHS = {"on": True, "off": False}


def decode_step_bytes(cfg: FalconH1Config, weight_bytes: int, batch: int, context: float, kv_dtype: str,
                      ssm_dtype: str, conv_dtype: str) -> float:
    """Least bytes one decode step of `batch` sequences at `context` cached tokens moves."""
    state = 2 * batch * cfg.state_bytes_per_seq(ssm_dtype, conv_dtype)  # read + write
    kv = batch * (context + 1) * cfg.kv_cache_bytes_per_token(kv_dtype)
    return weight_bytes + state + kv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU (EagerReplay graphs, torch ops)")
    ap.add_argument("--preset", default=None, help="default: 7b (tiny with --dry-run)")
    ap.add_argument("--weights", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    ap.add_argument("--ssm-state-dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch", type=int, action="append", help="repeatable [default: 32 and 64]")
    ap.add_argument("--isl", type=int, default=None, help="default: 512 (32 with --dry-run)")
    ap.add_argument("--osl", type=int, default=None, help="default: 256 (8 with --dry-run)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="compute dtype [default: bf16; fp32 with --dry-run, where CPU bf16 GEMMs are slow]")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-tokens", type=int, default=8192)
    ap.add_argument("--cuda-graphs", choices=sorted(CUDA_GRAPHS), default="on")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dry = args.dry_run
    name = args.preset or ("tiny" if dry else "7b")
    isl, osl = args.isl or (32 if dry else 512), args.osl or (8 if dry else 256)
    batches = sorted(args.batch or [32, 64])
    device = torch.device("cpu" if dry else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("e2e: no CUDA device (use --dry-run on a CPU)")
    if args.kv_cache_dtype == "fp8" and args.weights != "fp8":
        raise SystemExit("e2e: --kv-cache-dtype fp8 needs --weights fp8 (the KV scales are part of the FP8 format)")
    if device.type == "cpu":
        torch.set_num_threads(1)  # a tiny model: more threads only contend (as runtime/backends.py decides)
    cfg = preset(name)
    t0 = time.perf_counter()
    dtype = lookup(args.dtype or ("fp32" if dry else "bf16")).torch
    weights = random_deploy_weights(cfg, dtype=dtype, device=device, seed=args.seed,
                                    fp8=args.weights == "fp8", kv_cache_fp8=args.kv_cache_dtype == "fp8")
    if device.type == "cuda":
        torch.cuda.synchronize()
    make_s = time.perf_counter() - t0
    weight_bytes = sum(t.numel() * t.element_size() for n, t in weights.tensors.items() if n != "embed_tokens.weight")
    max_seq_len = isl + osl + 8
    max_batch = max(batches)
    kv = None if args.kv_cache_dtype == "auto" else "fp8"
    executor = TorchExecutor(
        weights, num_blocks=max_batch * math.ceil(max_seq_len / args.block_size), block_size=args.block_size,
        num_slots=max_batch, device=device, kernels="torch" if dry else "auto", kv_dtype=kv,
        ssm_dtype=args.ssm_state_dtype, cuda_graphs=CUDA_GRAPHS[args.cuda_graphs],
        fp8_gemm="scaled_mm" if args.weights == "fp8" else "auto")
    del weights  # the executor holds what it needs
    t0 = time.perf_counter()
    executor.capture_graphs(max_seq_len)
    capture_s = time.perf_counter() - t0
    cfg = executor.model.cfg
    spec = executor.cache_spec
    kv_name = lookup(spec.kv_dtype, "torch").name
    meta = {
        "preset": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "weights": args.weights, "kv_cache": kv_name, "ssm_state": args.ssm_state_dtype,
        "compute": lookup(dtype, "torch").name,
        "kernels": executor.kernels, "fp8_gemm": executor.fp8_gemm, "cuda_graphs": executor.graphs is not None,
        "graph_buckets": list(executor.graphs.buckets) if executor.graphs else [],
        "fp8_gemm_fallbacks": executor.model.fp8_gemms.fallbacks if executor.model.fp8_gemms else {},
        "isl": isl, "osl": osl, "block_size": args.block_size, "max_num_tokens": args.max_num_tokens,
        "weight_bytes": weight_bytes, "make_weights_s": round(make_s, 2), "capture_graphs_s": round(capture_s, 2),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    }
    print(json.dumps(meta), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for b in batches:
        requests = token_norm_dist(b, isl, osl, vocab_size=cfg.vocab_size, seed=args.seed, max_seq_len=max_seq_len)
        warm = token_norm_dist(2, isl, 4, vocab_size=cfg.vocab_size, seed=args.seed + 1, max_seq_len=max_seq_len)
        replays0 = executor.graphs.replays if executor.graphs else 0
        eager0 = executor.eager_steps
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        engine = LLMEngine(executor, max_batch_size=b, max_num_tokens=max(args.max_num_tokens, b),
                           max_seq_len=max_seq_len, log_steps=True)
        r = run_concurrency(engine, warm + requests, concurrency=b, warmup=len(warm))
        tpot = r.tpot_ms["p50"]
        step_bytes = decode_step_bytes(cfg, weight_bytes, b, isl + osl / 2, kv_name, args.ssm_state_dtype,
                                       lookup(spec.conv_dtype, "torch").name)
        roof_ms = step_bytes / HBM_BYTES_PER_S * 1e3
        run = {
            "batch": b, "num_requests": r.num_requests, "errors": r.errors[:3], "duration_s": round(r.duration_s, 3),
            "output_tokens": r.total_output_tokens, "output_tokens_per_s_per_gpu": round(r.output_tokens_per_s, 1),
            "ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "num_steps": r.num_steps,
            "host_us_per_step": r.host_us_per_step,
            # graph_replays / eager_steps include the warm-up requests' steps; num_steps does not
            "graph_replays": (executor.graphs.replays if executor.graphs else 0) - replays0,
            "eager_steps": executor.eager_steps - eager0,
            "decode_step_roofline_ms": float(f"{roof_ms:.4g}"), "decode_step_gb": float(f"{step_bytes / 1e9:.4g}"),
            "decode_fraction_of_roofline": float(f"{roof_ms / tpot:.3g}") if tpot else None,
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None,
        }
        runs.append(run)
        args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")  # kept if a later one dies
        print(f"batch {b}: {run['output_tokens_per_s_per_gpu']} tok/s, TPOT p50 {tpot} ms, "
              f"{run['graph_replays']} graph steps, {run['eager_steps']} eager steps", flush=True)


if __name__ == "__main__":
    main()
