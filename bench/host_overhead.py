"""Host overhead per step of the runtime, with an executor that does no model work.

What the scheduler, the StepBatch build and the sampler cost on the host per step, at a steady batch of 32 and 64
running sequences (decode only: every sequence adds one token per step; a request that ends is replaced at once)
and in a mixed case (short requests, so prefill chunks of newcomers share steps with decodes). The goal
(../shared/reference/benchmarking.md): well under 1 ms, < 500 us at batch 64, against a 10-20 ms H200 decode step.

The null executor's logits are on the CPU, so "sample" here includes a CPU argmax over (batch, vocab); on a GPU
that argmax is a device kernel and the host pays only its launch and the copy of `batch` ids.

    python bench/host_overhead.py [--vocab 32784] [--steps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from trtfalcon.runtime.executors.null import NullExecutor, null_cache_spec
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import ConfidenceParams, Request, SamplingParams
from trtfalcon.bench.throughput import percentile


def run_case(name: str, *, batch: int, vocab: int, isl: int, osl: int, steps: int, max_num_tokens: int,
             params: SamplingParams | None = None, block_size: int = 32, max_seq_len: int = 32768) -> dict:
    num_blocks = batch * (-(-(isl + osl) // block_size) + 1) + 64
    ex = NullExecutor(vocab, batch, null_cache_spec(num_blocks, block_size, batch))
    eng = LLMEngine(ex, max_batch_size=batch, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len)
    params = params or SamplingParams()
    p = SamplingParams(**{**params.__dict__, "max_new_tokens": osl, "ignore_eos": True})
    g = torch.Generator().manual_seed(0)
    counter = 0

    def add() -> None:
        nonlocal counter
        eng.add_request(Request(str(counter), torch.randint(0, vocab, (isl,), generator=g).tolist(), p))
        counter += 1

    for _ in range(batch):
        add()
    warmup = 50 + -(-batch * isl // max_num_tokens)
    for i in range(warmup + steps):
        if i == warmup:
            eng.step_log.clear()
        for d in eng.step():
            if d.finished:
                add()  # keep `batch` requests in flight, like trtllm-bench --concurrency
    log = eng.step_log
    host = [e.host_us for e in log]
    return {
        "case": name, "batch": batch, "vocab": vocab, "isl": isl, "osl": osl, "steps": len(log),
        "mean_seqs": statistics.fmean(e.num_seqs for e in log),
        "mean_tokens": statistics.fmean(e.num_tokens for e in log),
        "prefill_steps": sum(1 for e in log if e.num_prefill),
        "schedule_us": statistics.fmean(e.schedule_us for e in log),
        "build_us": statistics.fmean(e.build_us for e in log),
        "sample_us": statistics.fmean(e.sample_us for e in log),
        "host_us": statistics.fmean(host),
        "host_p50_us": percentile(host, 50),
        "host_p99_us": percentile(host, 99),
        "execute_us": statistics.fmean(e.execute_us for e in log),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=256,
                    help="logits width for the host-overhead rows (small, so the CPU argmax that a GPU would run "
                         "as a kernel does not hide the host cost)")
    ap.add_argument("--full-vocab", type=int, default=32784, help="logits width of the CPU-sampling rows "
                    "(Falcon-H1-0.5B: 32784)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the runtime's host thread; "
                    "more only adds OpenMP wake-up jitter to these small ops)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    v, full, n = args.vocab, args.full_vocab, args.steps
    long_osl = 12_500  # nothing finishes while we measure: pure steady decode (blocks still grow)
    rows = []
    for batch in (32, 64):
        rows.append(run_case("decode greedy", batch=batch, vocab=v, isl=128, osl=long_osl, steps=n,
                             max_num_tokens=2048))
    for batch in (32, 64):
        rows.append(run_case("mixed isl 256 osl 32", batch=batch, vocab=v, isl=256, osl=32, steps=n // 2,
                             max_num_tokens=1024))
    rows.append(run_case("decode DeepConf sampling", batch=64, vocab=v, isl=128, osl=long_osl, steps=n // 4,
                         max_num_tokens=2048, params=SamplingParams(temperature=0.6, top_p=0.95, logprobs=20)))
    # DeepConf online (no log-probs returned): confidence per token, window push, stop flags in the one copy;
    # threshold 0 never stops (C >= 0), so the batch stays full
    online = ConfidenceParams(top_k=20, window=2048, threshold=0.0)
    rows.append(run_case("decode DeepConf online", batch=64, vocab=v, isl=128, osl=long_osl, steps=n // 4,
                         max_num_tokens=2048, params=SamplingParams(temperature=0.6, top_p=0.95, confidence=online)))
    rows.append(run_case("decode greedy + confidence", batch=64, vocab=v, isl=128, osl=long_osl, steps=n // 4,
                         max_num_tokens=2048, params=SamplingParams(confidence=online)))
    rows.append(run_case("decode greedy, CPU argmax", batch=64, vocab=full, isl=128, osl=long_osl, steps=n // 4,
                         max_num_tokens=2048))
    rows.append(run_case("DeepConf sampling, CPU", batch=64, vocab=full, isl=128, osl=long_osl, steps=20,
                         max_num_tokens=2048, params=SamplingParams(temperature=0.6, top_p=0.95, logprobs=20)))
    rows.append(run_case("DeepConf online, CPU", batch=64, vocab=full, isl=128, osl=long_osl, steps=20,
                         max_num_tokens=2048, params=SamplingParams(temperature=0.6, top_p=0.95, confidence=online)))
    cols = ["case", "batch", "vocab", "steps", "mean_seqs", "mean_tokens", "schedule_us", "build_us", "sample_us",
            "host_us", "host_p50_us", "host_p99_us"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; microseconds per step (mean unless p50/p99)")
    print(" | ".join(f"{c:>26}" if c == "case" else f"{c:>11}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>26}" if c == "case" else
                         (f"{r[c]:>11.1f}" if isinstance(r[c], float) else f"{r[c]:>11}") for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"time": time.time(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
