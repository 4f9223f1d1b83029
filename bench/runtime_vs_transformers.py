"""The in-flight runtime (torch executor, CPU) against transformers' generate() with static batches.

Same model (tiny preset, fp32), same requests, same token budget (EOS ignored: every request yields exactly osl
tokens), same thread count, measured in one run:

    python bench/runtime_vs_transformers.py --batch 32 --num-requests 64 --isl 32 --osl 64

transformers runs the requests in static batches of --batch (its usual offline pattern); the runtime keeps --batch
requests in flight. Prints output tokens/s of each and the ratio; writes bench/results/runtime_vs_transformers.json.

Two workloads in one run: equal lengths (a static batch's best case: no padding, no idle rows) and uneven output
lengths (each static batch runs until its longest request; only requested tokens count as delivered). A tiny model
on a CPU is bound by per-op overhead (~70 small ops per step), so the equal-length ratio mostly measures that; the
uneven one shows what in-flight batching buys. The comparison that matters, the 7B on a GPU, needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from trtfalcon.bench.dataset import token_norm_dist
from trtfalcon.bench.throughput import run_concurrency
from trtfalcon.checkpoint.synth import synth_checkpoint
from trtfalcon.config import preset_dict
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.options import RuntimeOptions


def run_transformers(model, reqs, batch: int) -> tuple[int, float]:
    """Static batches of `batch` requests in arrival order, greedy. A static batch runs until its longest request
    is done, so only each request's own output_tokens count as delivered (the rest is padding work)."""
    t0 = time.perf_counter()
    useful = 0
    with torch.no_grad():
        for s in range(0, len(reqs), batch):
            group = reqs[s:s + batch]
            ids = torch.tensor([r.input_ids for r in group])
            n = max(r.output_tokens for r in group)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            useful += sum(r.output_tokens for r in group)
    return useful, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--isl", type=int, default=32)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--osl-stdev", type=float, default=32.0, help="Output-length spread of the uneven workload.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "runtime_vs_transformers.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import FalconH1ForCausalLM

    workloads = {"equal lengths": 0.0, f"uneven outputs (stdev {args.osl_stdev:g})": args.osl_stdev}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf = synth_checkpoint(preset_dict("tiny"), Path(tmp) / "hf", dtype="fp32")
        vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
        model = FalconH1ForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        with torch.no_grad():  # warm-up
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        max_len = args.isl + int(args.osl + 4 * args.osl_stdev)
        opts = RuntimeOptions(max_batch_size=args.batch, max_num_tokens=max(256, args.batch), max_seq_len=max_len,
                              block_size=16, num_threads=args.threads)
        engine = LLMEngine.from_options("torch", hf, opts)
        for name, stdev in workloads.items():
            reqs = token_norm_dist(args.num_requests, args.isl, args.osl, 0.0, stdev, vocab_size=vocab, seed=0,
                                   max_seq_len=max_len)
            hf_tokens, hf_s = run_transformers(model, reqs, args.batch)
            warm = token_norm_dist(min(8, args.batch), args.isl, 4, vocab_size=vocab, seed=1)
            res = run_concurrency(engine, warm + reqs, concurrency=args.batch, warmup=len(warm))
            assert res.total_output_tokens == hf_tokens  # the same delivered tokens on both sides
            rows[name] = {
                "transformers_static_batches": {"output_tokens": hf_tokens, "seconds": round(hf_s, 3),
                                                "output_tokens_per_s": round(hf_tokens / hf_s, 1)},
                "trtfalcon_in_flight": {"output_tokens": res.total_output_tokens, "seconds": round(res.duration_s, 3),
                                        "output_tokens_per_s": round(res.output_tokens_per_s, 1),
                                        "mean_live_batch": round(res.mean_live_batch, 1),
                                        "host_us_per_step_mean": round(res.host_us_per_step["mean"] or 0, 1)},
                "ratio_trtfalcon_over_transformers": round(res.output_tokens_per_s / (hf_tokens / hf_s), 2),
            }
    result = {"workload": {"isl": args.isl, "osl": args.osl, "num_requests": args.num_requests, "batch": args.batch,
                           "threads": args.threads, "model": "tiny preset, fp32, CPU"}, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'workload':<28}{'transformers tok/s':>20}{'trtfalcon tok/s':>17}{'ratio':>7}")
    for name, r in rows.items():
        print(f"{name:<28}{r['transformers_static_batches']['output_tokens_per_s']:>20.1f}"
              f"{r['trtfalcon_in_flight']['output_tokens_per_s']:>17.1f}{r['ratio_trtfalcon_over_transformers']:>7.2f}")
    print(f"(output tokens/s delivered, same requests and token budget on both sides; wrote {args.out})")


if __name__ == "__main__":
    main()
