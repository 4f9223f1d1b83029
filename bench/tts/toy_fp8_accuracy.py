"""What FP8 costs a model that does something: `trtfalcon quantize` on the trained toy reasoner.

    python bench/tts/toy_fp8_accuracy.py --seeds 1 2 3 --problems 200

For each calibration seed: a calibration JSONL of the toy task's training distribution
(toy_task.write_calibration_jsonl: --calib-size traces, then 16 held-out problems kept out of calibration for
perplexity; seed 1 is tests/data/toy-calib.jsonl), ModelOpt FP8 calibration (quantize_fp8, what `trtfalcon
quantize` runs), then the accuracy report against the source in fp32 compute (the quantization's cost alone) and in
bf16 compute (a bf16 deployment against an FP8 one), each with task accuracy: greedy answers to --problems held-out
problems, both checkpoints converted to deploy checkpoints and run by the in-flight runtime's torch executor (FP8
linears fake-quantized). Seeds show how much of the difference is which calibration set was drawn.

Writes bench/results/toy_fp8_accuracy.json and .md. One row equals the CLI's report:

    trtfalcon quantize tests/data/toy-reasoner runs/toy-fp8 --calib-data tests/data/toy-calib.jsonl \\
        --calib-size 64 --holdout 16 --task toy-multiplication [--accuracy-dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trtfalcon.quantize.accuracy import accuracy_report
from trtfalcon.quantize.calibration import load_calibration
from trtfalcon.quantize.fp8 import quantize_fp8
from trtfalcon.tts.toy_eval import ToyTaskEvaluator
from trtfalcon.tts.toy_task import VOCAB, write_calibration_jsonl

ROOT = Path(__file__).resolve().parents[2]
HOLDOUT = 16
DTYPES = ("fp32", "bf16")


def row(seed: int, dtype: str, r: dict) -> dict:
    t = r["task"]
    return {
        "calib_seed": seed, "compute_dtype": dtype, "top1_agreement": r["top1_agreement"],
        "logit_rel_rms_err": r["logit_rel_rms_err"], "kl_mean": r["kl_mean"],
        "perplexity_source": r["perplexity_source"], "perplexity_quantized": r["perplexity_quantized"],
        "perplexity_ratio": r["perplexity_ratio"], "task_accuracy_source": t["accuracy_source"],
        "task_accuracy_fp8": t["accuracy_quantized"], "task_right_source_only": t["right_source_only"],
        "task_right_fp8_only": t["right_quantized_only"], "task_same_output": t["same_output"],
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# FP8 (ModelOpt) vs source on the trained toy reasoner ({meta['problems']} held-out problems, greedy)",
        "",
        f"Calibration: {meta['calib_size']} traces of the task's training distribution per seed; perplexity on "
        f"{HOLDOUT} held-out problems' traces (every token, prompt digits included). Task accuracy: both checkpoints "
        "converted and run by the runtime's torch executor on CPU. `python bench/tts/toy_fp8_accuracy.py "
        f"--seeds {' '.join(map(str, meta['seeds']))} --problems {meta['problems']}`.",
        "",
        "| compute | calib seed | top-1 agreement | logit rel. RMS | KL (nats/token) | perplexity source / fp8 (ratio) "
        "| task accuracy source / fp8 | right only with source / fp8 | same greedy output |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['compute_dtype']} | {r['calib_seed']} | {100 * r['top1_agreement']:.2f} % | "
            f"{100 * r['logit_rel_rms_err']:.2f} % | {r['kl_mean']:.4f} | {r['perplexity_source']:.3f} / "
            f"{r['perplexity_quantized']:.3f} (x{r['perplexity_ratio']:.4f}) | {100 * r['task_accuracy_source']:.1f} / "
            f"{100 * r['task_accuracy_fp8']:.1f} % | {r['task_right_source_only']} / {r['task_right_fp8_only']} | "
            f"{100 * r['task_same_output']:.1f} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "tests" / "data" / "toy-reasoner")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="Calibration sets (1 = the committed one).")
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "toy_fp8_accuracy.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    task = ToyTaskEvaluator(args.problems)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            calib_file = write_calibration_jsonl(Path(tmp) / f"calib-{seed}.jsonl", args.calib_size, HOLDOUT, seed)
            fp8 = Path(tmp) / f"fp8-{seed}"
            # fp32 report as quantize writes it; the bf16 report on the same checkpoint and the same held-out lines
            r = quantize_fp8(args.checkpoint, fp8, calib_data=calib_file, calib_size=args.calib_size,
                             calib_seq_len=64, holdout=HOLDOUT, task=task, accuracy_dtype="fp32").accuracy
            rows.append(row(seed, "fp32", r))
            data = load_calibration(calib_file, args.checkpoint, len(VOCAB), num_samples=args.calib_size, seq_len=64,
                                    holdout=HOLDOUT)
            rows.append(row(seed, "bf16", accuracy_report(args.checkpoint, fp8, data, compute_dtype="bf16", task=task)))
            print(f"seed {seed}: " + "; ".join(
                f"{r['compute_dtype']} top-1 {100 * r['top1_agreement']:.2f} %, ppl x{r['perplexity_ratio']:.4f}, "
                f"task {100 * r['task_accuracy_source']:.1f} -> {100 * r['task_accuracy_fp8']:.1f} %"
                for r in rows[-2:]), flush=True)
    meta = {"checkpoint": str(args.checkpoint.relative_to(ROOT) if args.checkpoint.is_relative_to(ROOT)
                              else args.checkpoint), "seeds": args.seeds, "calib_size": args.calib_size,
            "holdout": HOLDOUT, "problems": args.problems, "threads": args.threads}
    summary = {
        dt: {k: {"min": min(v), "max": max(v), "mean": statistics.fmean(v)} for k in
             ("top1_agreement", "perplexity_ratio", "task_accuracy_source", "task_accuracy_fp8")
             for v in [[r[k] for r in rows if r["compute_dtype"] == dt]]}
        for dt in DTYPES
    }
    report = {
        "command": f"python bench/tts/toy_fp8_accuracy.py --seeds {' '.join(map(str, args.seeds))} "
                   f"--calib-size {args.calib_size} --problems {args.problems}",
        "cli_equivalent_of_seed_1": "trtfalcon quantize tests/data/toy-reasoner runs/toy-fp8 --calib-data "
                                    "tests/data/toy-calib.jsonl --calib-size 64 --holdout 16 --task toy-multiplication "
                                    "[--accuracy-dtype bf16]",
        **meta, "wall_s": round(time.perf_counter() - t0, 1), "summary": summary, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
