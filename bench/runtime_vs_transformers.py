"""The in-flight runtime (torch executor, CPU) against transformers' generate() with static batches.

Same model (tiny preset, fp32), same requests, same token budget (EOS ignored: every request yields exactly osl
tokens), same thread count, measured in one run:

    python bench/runtime_vs_transformers.py --batch 32 --num-requests 64 --isl 32 --osl 64

transformers runs the requests in static batches of --batch (its usual offline pattern); the runtime keeps --batch
requests in flight. Prints output tokens/s of each and the ratio; writes bench/results/runtime_vs_transformers.json.

Reading the ratio: a tiny model on a CPU is bound by per-op overhead (~70 small ops per step), where one dense
static batch of equal-length requests is at its best and in-flight batching has nothing to win (no uneven lengths,
no idle slots). The comparison that matters, uneven lengths on a GPU, needs a GPU.
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
from trtfalcon.runtime.backends import RuntimeOptions, create_executor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--isl", type=int, default=32)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "runtime_vs_transformers.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import FalconH1ForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        hf = synth_checkpoint(preset_dict("tiny"), Path(tmp) / "hf", dtype="fp32")
        cfg_vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
        reqs = token_norm_dist(args.num_requests, args.isl, args.osl, vocab_size=cfg_vocab, seed=0)

        # transformers: static batches, greedy, exactly osl new tokens each
        model = FalconH1ForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        ids = torch.tensor([r.input_ids for r in reqs])
        with torch.no_grad():  # warm-up
            model.generate(ids[:2], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        hf_tokens = 0
        with torch.no_grad():
            for s in range(0, len(reqs), args.batch):
                batch = ids[s:s + args.batch]
                out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=args.osl,
                                     min_new_tokens=args.osl, do_sample=False, pad_token_id=0)
                hf_tokens += (out.shape[1] - batch.shape[1]) * batch.shape[0]
        hf_s = time.perf_counter() - t0

        # trtfalcon: in-flight batching at the same concurrency, after a short warm-up
        opts = RuntimeOptions(max_batch_size=args.batch, max_num_tokens=max(256, args.batch),
                              max_seq_len=args.isl + args.osl, block_size=16, num_threads=args.threads)
        executor, _ = create_executor("torch", hf, opts)
        warm = token_norm_dist(min(8, args.batch), args.isl, 4, vocab_size=cfg_vocab, seed=1)
        res = run_concurrency(executor, warm + reqs, concurrency=args.batch, max_num_tokens=opts.max_num_tokens,
                              max_seq_len=args.isl + args.osl, warmup=len(warm))

    hf_tps = hf_tokens / hf_s
    result = {
        "workload": {"isl": args.isl, "osl": args.osl, "num_requests": args.num_requests, "batch": args.batch,
                     "threads": args.threads, "model": "tiny preset, fp32, CPU"},
        "transformers_static_batches": {"output_tokens": hf_tokens, "seconds": round(hf_s, 3),
                                        "output_tokens_per_s": round(hf_tps, 1)},
        "trtfalcon_in_flight": {"output_tokens": res.total_output_tokens, "seconds": round(res.duration_s, 3),
                                "output_tokens_per_s": round(res.output_tokens_per_s, 1),
                                "mean_live_batch": round(res.mean_live_batch, 1),
                                "host_us_per_step_mean": round(res.host_us_per_step["mean"] or 0, 1)},
        "ratio_trtfalcon_over_transformers": round(res.output_tokens_per_s / hf_tps, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'':<32}{'output tokens':>14}{'seconds':>10}{'tok/s':>10}")
    print(f"{'transformers generate (static)':<32}{hf_tokens:>14}{hf_s:>10.2f}{hf_tps:>10.1f}")
    print(f"{'trtfalcon runtime (in flight)':<32}{res.total_output_tokens:>14}{res.duration_s:>10.2f}"
          f"{res.output_tokens_per_s:>10.1f}")
    print(f"ratio trtfalcon / transformers: {result['ratio_trtfalcon_over_transformers']}x   (wrote {args.out})")


if __name__ == "__main__":
    main()
