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
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from trtfalcon.quantize.calibration import CalibrationSet


@torch.inference_mode()
def accuracy_report(
    source_dir: str | Path, quant_dir: str | Path, data: CalibrationSet, *, compute_dtype: str = "fp32",
) -> dict[str, Any]:
    """Compare quant_dir with source_dir on data.holdout (or data.calib when nothing was held out)."""
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
    return {
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
    return "\n".join(lines)
