"""Peak memory and wall time of `trtfalcon convert` on a 7B-shaped checkpoint, beside a naive baseline.

    python bench/convert_memory.py --preset 7b --workdir /path/with/50GB/free

Each measured step runs in its own process; its peak RSS comes from the kernel (os.wait4's ru_maxrss), so the
figures include everything the process touched (torch, safetensors' mappings, Python). The baseline is what a
plain script does: load every tensor with safetensors.torch.load_file, fold the multipliers, save_file shards.
Goal (issue 2): trtfalcon's peak RSS under 15% of the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from trtfalcon.bench.process import measure

NAIVE = r"""
import sys, json, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from trtfalcon.checkpoint.deploy import deploy_sources, deploy_dtype_of
from trtfalcon.config import FalconH1Config
src, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = FalconH1Config.from_json_file(src)
hf = {}
for f in sorted(src.glob('*.safetensors')):
    hf.update(load_file(f))                      # everything in memory
deploy = {}
for name, sources in deploy_sources(cfg).items():
    parts = []
    for s in sources:
        t = hf.pop(s.name) if not (cfg.tie_word_embeddings and s.name.endswith('embed_tokens.weight')) else hf[s.name]
        t = t.float() * s.scale
        if s.row_scale is not None:
            t = t * s.row_scale.view(-1, *([1] * (t.dim() - 1)))
        parts.append(t.squeeze(1) if t.dim() == 3 else t)
    deploy[name] = torch.cat(parts).to(deploy_dtype_of(name, torch.bfloat16))
out.mkdir(parents=True)
shard, size, n = {}, 0, 0
for name, t in deploy.items():                    # save_file shards of ~2 GB
    shard[name] = t; size += t.numel() * t.element_size()
    if size > 2e9:
        save_file(shard, out / f'model-{n:05d}.safetensors'); shard, size, n = {}, 0, n + 1
if shard:
    save_file(shard, out / f'model-{n:05d}.safetensors')
"""


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "convert_memory_7b.json")
    args = ap.parse_args()
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    hf, dep, naive = w / f"{args.preset}-hf", w / f"{args.preset}-deploy", w / f"{args.preset}-naive"
    for d in (dep, naive):
        shutil.rmtree(d, ignore_errors=True)
    py = sys.executable
    results: dict = {"preset": args.preset, "cpus": os.cpu_count()}
    if not (hf / "config.json").is_file():
        results["synth"] = measure(f"trtfalcon synth --preset {args.preset}",
                                   [py, "-m", "trtfalcon.cli", "synth", "--preset", args.preset, "--out", str(hf)])
    size = dir_bytes(hf)
    results["checkpoint_bytes"] = size
    results["trtfalcon_convert"] = measure("trtfalcon convert --dtype bf16",
                                           [py, "-m", "trtfalcon.cli", "convert", str(hf), str(dep), "--dtype", "bf16"])
    if not args.skip_naive:
        results["naive_load_all_then_save"] = measure("load_file all shards, fold, save_file 2 GB shards",
                                                      [py, "-c", NAIVE, str(hf), str(naive)])
    for key in ("synth", "trtfalcon_convert", "naive_load_all_then_save"):
        if key in results:
            results[key]["peak_rss_fraction_of_checkpoint"] = round(results[key]["peak_rss_bytes"] / size, 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"checkpoint: {size / 1e9:.2f} GB ({args.preset})")
    print(f"{'step':<28}{'wall s':>9}{'peak RSS GB':>13}{'of ckpt':>9}{'exit':>6}")
    for key in ("synth", "trtfalcon_convert", "naive_load_all_then_save"):
        if key in results:
            r = results[key]
            print(f"{key:<28}{r['wall_s']:>9}{r['peak_rss_bytes'] / 1e9:>13.2f}"
                  f"{r['peak_rss_fraction_of_checkpoint']:>9.1%}{r['exit_code']:>6}")
    if "naive_load_all_then_save" in results and results["naive_load_all_then_save"]["exit_code"] == 0:
        ratio = results["naive_load_all_then_save"]["peak_rss_bytes"] / results["trtfalcon_convert"]["peak_rss_bytes"]
        print(f"naive / trtfalcon peak RSS: {ratio:.1f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
