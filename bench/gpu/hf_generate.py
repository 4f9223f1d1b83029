"""transformers' generate() on the same model shape and batch as bench/gpu/e2e.py, on the same GPU: the baseline.

The model is transformers' FalconH1ForCausalLM built from the preset's config with random weights, in GPU memory
(no checkpoint file), bf16. One static batch per batch size: `batch` random prompts of isl tokens, greedy, exactly
osl new tokens (min_new_tokens = max_new_tokens: EOS cannot end a row early), timed from the call to its return
with the device synchronized. Output tokens/s = batch x generated / seconds, trtllm-bench's figure for a static
batch. A time budget per batch stops generation early if it runs out (a stopping criterion), and the report says
how many tokens were generated; the prefill alone is timed too (max_new_tokens = 1), so the decode rate is known.

No fused Mamba kernels are on the GPU machine (mamba_ssm, causal_conv1d, the kernels hub: absent, no network), so
transformers runs its torch path: what a user without those packages gets. That path's prefill scan (transformers
5.17, the GPU image's) materialises broadcast products in fp32: C x B over (batch, chunks, chunk, chunk, heads,
d_state), the chunk states over (batch, tokens, heads, head_dim, d_state) twice (103 GB at batch 64, 512 tokens,
whatever the chunk), and their recurrence over (batch, chunks+1, chunks+1, heads, head_dim, d_state). The baseline
runs with the power-of-two mamba_chunk_size (at most the model's) that minimises the chunk-dependent ones: the
chunked scan's result does not depend on the chunk length, only those temporaries do (the report says which chunk
ran, and the largest temporary). At the model's own chunk (256) batch 64 would need 206 GB for C x B alone.

    python bench/gpu/hf_generate.py --batch 32 --batch 64 --isl 512 --osl 256 --out hf.json
    python bench/gpu/hf_generate.py --dry-run --out hf.json      # tiny preset on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to fetch, and no network to wait on
os.environ.setdefault("USE_HUB_KERNELS", "0")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # the scan's 100 GB temporaries

import torch  # noqa: E402

from trtfalcon.config import preset_dict  # noqa: E402


def scan_chunk(raw: dict, batch: int, isl: int) -> tuple[int, float]:
    """(chunk, bytes of the largest fp32 temporary of transformers' torch scan) for the power-of-two chunk in
    [16, the model's] that makes its chunk-dependent temporaries smallest (see above)."""
    h, p, n = raw["mamba_n_heads"], raw["mamba_d_head"], raw["mamba_d_state"]
    fixed = batch * isl * h * p * n * 4  # the chunk states, before their sum

    def peak(chunk: int) -> float:
        chunks = -(-isl // chunk)
        cb = batch * chunks * chunk * chunk * h * n * 4
        recurrence = batch * (chunks + 1) ** 2 * h * p * n * 4
        return max(cb, recurrence, fixed)

    options = [c for c in (16, 32, 64, 128, 256, 512) if c <= raw["mamba_chunk_size"]] or [raw["mamba_chunk_size"]]
    best = min(options, key=lambda c: (peak(c), -c))
    return best, peak(best)


def build_model(name: str, dtype: torch.dtype, device: torch.device, chunk: int):
    from transformers import FalconH1Config, FalconH1ForCausalLM

    cfg = FalconH1Config(**{**preset_dict(name), "mamba_chunk_size": chunk})
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in bf16: no fp32 copy of 7B parameters
    try:
        with torch.device(device):
            model = FalconH1ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to(device=device, dtype=dtype).eval(), cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--preset", default=None, help="default: 7b (tiny with --dry-run)")
    ap.add_argument("--batch", type=int, action="append", help="repeatable [default: 32 and 64]")
    ap.add_argument("--isl", type=int, default=None, help="default: 512 (32 with --dry-run)")
    ap.add_argument("--osl", type=int, default=None, help="default: 256 (8 with --dry-run)")
    ap.add_argument("--budget-s", type=float, default=60.0, help="time budget of each batch's generate")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import StoppingCriteria, StoppingCriteriaList

    dry = args.dry_run
    name = args.preset or ("tiny" if dry else "7b")
    isl, osl = args.isl or (32 if dry else 512), args.osl or (8 if dry else 256)
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    if device.type == "cpu":
        torch.set_num_threads(1)
    batches = sorted(args.batch or [32, 64])
    raw = preset_dict(name)
    chunk, scan_bytes = scan_chunk(raw, max(batches), isl)
    t0 = time.perf_counter()
    model, cfg = build_model(name, dtype, device, chunk)
    _sync(device)
    import transformers

    meta = {"preset": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "isl": isl, "osl": osl,
            "mamba_chunk_size": chunk, "model_mamba_chunk_size": raw["mamba_chunk_size"],
            "largest_scan_temporary_gb": round(scan_bytes / 1e9, 1), "build_s": round(time.perf_counter() - t0, 2),
            "transformers": transformers.__version__, "torch": torch.__version__}
    print(json.dumps(meta), flush=True)

    class Deadline(StoppingCriteria):
        def __init__(self, at: float):
            self.at = at

        def __call__(self, input_ids, scores, **kwargs):  # noqa: ANN001, ANN003, ANN204
            return torch.full((input_ids.shape[0],), time.perf_counter() > self.at, dtype=torch.bool,
                              device=input_ids.device)

    def generate(ids: torch.Tensor, n: int, budget: float) -> tuple[int, float]:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0,
                                 stopping_criteria=StoppingCriteriaList([Deadline(start + budget)]))
        _sync(device)
        return int(out.shape[1] - ids.shape[1]), time.perf_counter() - start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    runs = []
    for b in batches:
        run: dict = {"batch": b}
        try:
            ids = torch.randint(cfg.vocab_size, (b, isl), generator=gen).to(device)
            generate(ids[:, :16], 2, args.budget_s)  # warm-up: cuBLAS handles, allocator
            _, prefill_s = generate(ids, 1, args.budget_s)
            made, seconds = generate(ids, osl, args.budget_s)
            run.update(generated_per_row=made, seconds=round(seconds, 3), prefill_s=round(prefill_s, 3),
                       output_tokens_per_s_per_gpu=round(b * made / seconds, 1),
                       decode_tokens_per_s=round(b * (made - 1) / (seconds - prefill_s), 1)
                       if made > 1 and seconds > prefill_s else None,
                       complete=made == osl)
        except torch.cuda.OutOfMemoryError as exc:
            run["error"] = f"out of GPU memory: {str(exc)[:300]}"
        except Exception as exc:  # noqa: BLE001 - one batch's failure still reports the others
            run["error"] = f"{type(exc).__name__}: {exc}"[:500]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        runs.append(run)
        print(json.dumps(run), flush=True)
        args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")  # kept if a later one dies


if __name__ == "__main__":
    main()
