"""Accuracy of a quantized checkpoint against its source, on the same prompts: what FP8 costs.

Both checkpoints run through the same code (the reference model, model/reference.py), in the same compute dtype
(fp32 by default), so the difference measured is the quantization alone: the FP8 side computes what TensorRT's
explicit Q/DQ computes (fake-quantized inputs, dequantized weights, checkpoint/deploy_fp8.py), read through the
same FP8 loader `convert` uses (checkpoint/fp8.py), so the folded scales are what is measured.

Per token position of every evaluation sample:
    logit error      max |l_q - l_s|, mean |l_q - l_s|, and relative RMS ||l_q - l_s|| / ||l_s||
    top-1 agreement  argmax l_q == argmax l_s
    KL(p_s || p_q)   mean over positions (nats)
    perplexity       exp(mean NLL of the next token) for each model, on the held-out samples (never calibrated on)

Optionally, task accuracy: a `TaskEvaluator` (supplied by whoever knows the task, e.g. the toy reasoner's greedy
answers, trtfalcon/tts/toy_eval.py) scores both checkpoints on its items. Each checkpoint goes the way a deployment
goes: `convert` to a deploy checkpoint in the compute dtype, then the in-flight runtime's torch executor (on CPU,
FP8 linears fake-quantized: what TensorRT's Q/DQ computes). The report stays model-agnostic: it only counts the
items each side got right, those only one side got right, and how often the two generated the same tokens.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from trtfalcon.errors import TrtFalconError
from trtfalcon.quantize.calibration import CalibrationSet

if TYPE_CHECKING:
    from trtfalcon.config import FalconH1Config
    from trtfalcon.model.weights import DeployWeights


@dataclass
class TaskRun:
    """One checkpoint's results on a task, in item order: whether each item was answered right, and the tokens
    generated for it."""

    correct: list[bool]
    outputs: list[list[int]]


class TaskEvaluator(Protocol):
    """A task both checkpoints are scored on. `check` runs before calibration (a model that cannot do the task
    fails before any work); `__call__` runs the task on deploy weights and returns one result per item, the same
    items in the same order on every call."""

    name: str

    def describe(self) -> dict[str, Any]:
        """What is run (items, decoding), for the report."""

    def check(self, config: FalconH1Config, source: Path) -> None:
        """Raise a trtfalcon error naming `source` when this model cannot do the task."""

    def __call__(self, weights: DeployWeights) -> TaskRun: ...


@torch.inference_mode()
def accuracy_report(
    source_dir: str | Path, quant_dir: str | Path, data: CalibrationSet, *, compute_dtype: str = "fp32",
    task: TaskEvaluator | None = None,
) -> dict[str, Any]:
    """Compare quant_dir with source_dir on data.holdout (or data.calib when nothing was held out), and on `task`
    when one is given."""
    from trtfalcon.model.reference import ReferenceModel
    from trtfalcon.model.weights import load_weights

    source = ReferenceModel(load_weights(source_dir, compute_dtype))
    quant = ReferenceModel(load_weights(quant_dir, compute_dtype))
    samples, split = (data.holdout, "holdout") if data.holdout else (data.calib, "calibration")
    n_pos = n_agree = 0
    max_err = sum_abs = sum_sq_err = sum_sq_ref = sum_kl = 0.0
    nll_s = nll_q = 0.0
    n_next = 0
    for ids in samples:
        t = torch.tensor(ids)
        ls, _ = source.forward(t)
        lq, _ = quant.forward(t)
        ls, lq = ls.double(), lq.double()
        diff = lq - ls
        max_err = max(max_err, float(diff.abs().max()))
        sum_abs += float(diff.abs().mean(-1).sum())
        sum_sq_err += float(diff.pow(2).sum())
        sum_sq_ref += float(ls.pow(2).sum())
        n_agree += int((lq.argmax(-1) == ls.argmax(-1)).sum())
        lps, lpq = ls.log_softmax(-1), lq.log_softmax(-1)
        sum_kl += float((lps.exp() * (lps - lpq)).sum())
        n_pos += len(ids)
        nxt = t[1:].long()
        nll_s -= float(lps[:-1].gather(-1, nxt[:, None]).sum())
        nll_q -= float(lpq[:-1].gather(-1, nxt[:, None]).sum())
        n_next += len(ids) - 1
    ppl_s, ppl_q = math.exp(nll_s / n_next), math.exp(nll_q / n_next)
    del source, quant
    report = {
        "source": str(source_dir), "quantized": str(quant_dir), "compute_dtype": compute_dtype,
        "eval": {"split": split, "samples": len(samples), "positions": n_pos, "data": data.source,
                 "synthetic": data.synthetic},
        "logit_max_abs_err": max_err,
        "logit_mean_abs_err": sum_abs / n_pos,
        "logit_rel_rms_err": math.sqrt(sum_sq_err / max(sum_sq_ref, 1e-30)),
        "top1_agreement": n_agree / n_pos,
        "kl_mean": sum_kl / n_pos,
        "perplexity_source": ppl_s,
        "perplexity_quantized": ppl_q,
        "perplexity_ratio": ppl_q / ppl_s,
    }
    if task is not None:
        report["task"] = task_report(source_dir, quant_dir, task, compute_dtype=compute_dtype)
    return report


def task_report(source_dir: str | Path, quant_dir: str | Path, task: TaskEvaluator, *,
                compute_dtype: str = "fp32") -> dict[str, Any]:
    """Score both checkpoints on `task` through convert -> deploy checkpoint -> the runtime (see the module doc).

    The deploy checkpoints are written next to quant_dir (the same file system the user chose) and removed."""
    from trtfalcon.checkpoint.convert import convert_checkpoint
    from trtfalcon.model.weights import load_weights

    quant_dir = Path(quant_dir)
    runs: dict[str, TaskRun] = {}
    with tempfile.TemporaryDirectory(prefix=".trtfalcon-task-", dir=quant_dir.parent) as tmp:
        for side, ckpt in (("source", Path(source_dir)), ("quantized", quant_dir)):
            deploy = convert_checkpoint(ckpt, Path(tmp) / side, dtype=compute_dtype)
            runs[side] = task(load_weights(deploy))
    src, qnt = runs["source"], runs["quantized"]
    n = len(src.correct)
    if n == 0 or any(len(x) != n for x in (src.outputs, qnt.correct, qnt.outputs)):
        raise TrtFalconError(f"task {task.name!r}: expected one result and one output per item, the same number for "
                             f"both checkpoints, found source {len(src.correct)}/{len(src.outputs)}, quantized "
                             f"{len(qnt.correct)}/{len(qnt.outputs)}")
    acc_s, acc_q = sum(src.correct) / n, sum(qnt.correct) / n
    return {
        "name": task.name, **task.describe(), "items": n,
        "runtime": f"convert --dtype {compute_dtype} -> deploy checkpoint -> torch executor (in-flight engine)",
        "accuracy_source": acc_s,
        "accuracy_quantized": acc_q,
        "accuracy_delta": acc_q - acc_s,
        "right_source_only": sum(s and not q for s, q in zip(src.correct, qnt.correct)),
        "right_quantized_only": sum(q and not s for s, q in zip(src.correct, qnt.correct)),
        "same_output": sum(a == b for a, b in zip(src.outputs, qnt.outputs)) / n,
    }


def format_report(r: dict[str, Any]) -> str:
    ev = r["eval"]
    lines = [
        f"FP8 accuracy vs source ({ev['samples']} {ev['split']} samples, {ev['positions']} positions"
        f"{', SYNTHETIC data' if ev['synthetic'] else ''}; compute {r['compute_dtype']}):",
        f"  top-1 agreement     {100 * r['top1_agreement']:.2f} %",
        f"  logit error         max {r['logit_max_abs_err']:.4g}, mean {r['logit_mean_abs_err']:.4g}, "
        f"relative RMS {100 * r['logit_rel_rms_err']:.3f} %",
        f"  KL(source || fp8)   {r['kl_mean']:.3g} nats / token",
        f"  perplexity          source {r['perplexity_source']:.4g}, fp8 {r['perplexity_quantized']:.4g} "
        f"(x{r['perplexity_ratio']:.4f})",
    ]
    if "task" in r:
        t = r["task"]
        lines += [
            f"  task accuracy       {t['name']} ({t['items']} items): source {100 * t['accuracy_source']:.1f} %, "
            f"fp8 {100 * t['accuracy_quantized']:.1f} % ({100 * t['accuracy_delta']:+.1f} points; right only with "
            f"source {t['right_source_only']}, only with fp8 {t['right_quantized_only']})",
            f"  same output         {100 * t['same_output']:.1f} % of items generate identical tokens",
        ]
    return "\n".join(lines)
