"""Wall time and peak memory of `trtfalcon export` on a 7B-shaped deploy checkpoint; onnxruntime vs torch executor
throughput on the tiny model, in the same run.

    python bench/export_memory.py --hf /work/bench-tmp/7b-hf --workdir /work/bench-tmp

Each measured command runs in its own process; its peak RSS comes from the kernel (os.wait4's ru_maxrss), as in
bench/convert_memory.py, so the figure includes everything the process touched (torch, onnx, safetensors' reads,
the graph proto). The deploy checkpoint is converted first when absent; the export (and a deploy checkpoint this
run made) are deleted afterwards unless --keep: each is as large as the checkpoint.
Goal (issue 5): the 7B shape exports on a 24 GB machine; aim at about one tensor chunk plus the graph (~1-2 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from trtfalcon.bench.process import measure

CHECK = r"""
import sys, onnx
from pathlib import Path
d = Path(sys.argv[1])
onnx.checker.check_model(str(d / "model.onnx"))            # path form: the graph, not the 15 GB of data
m = onnx.load(str(d / "model.onnx"), load_external_data=False)
ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
print(len(m.graph.node), len(ext), sum(n.domain == "trtfalcon" for n in m.graph.node))
"""


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def throughput(isl: int, osl: int, concurrencies: list[int]) -> dict:
    """Tiny model: synth -> convert (fp32) -> export (fp32), then the same requests through both executors."""
    from trtfalcon.bench.dataset import token_norm_dist
    from trtfalcon.bench.throughput import run_concurrency
    from trtfalcon.checkpoint.convert import convert_checkpoint
    from trtfalcon.checkpoint.synth import synth_checkpoint
    from trtfalcon.config import preset_dict
    from trtfalcon.export import export_onnx
    from trtfalcon.runtime.llm import LLMEngine
    from trtfalcon.runtime.options import RuntimeOptions

    work = Path(tempfile.mkdtemp(prefix="export-bench-"))
    try:
        hf = synth_checkpoint(preset_dict("tiny"), work / "hf", dtype="fp32")
        dep = convert_checkpoint(hf, work / "deploy", dtype="fp32")
        exp = export_onnx(dep, work / "onnx")
        max_seq_len = isl + osl + 16
        rows = {}
        for backend, path in (("torch", dep), ("onnxruntime", exp)):
            opts = RuntimeOptions(max_batch_size=max(concurrencies), max_num_tokens=256, max_seq_len=max_seq_len)
            engine = LLMEngine.from_options(backend, path, opts)
            for c in concurrencies:
                warm = min(c, 8)
                reqs = token_norm_dist(warm + 2 * c, isl, osl, vocab_size=engine.config.vocab_size, seed=c,
                                       max_seq_len=max_seq_len)
                r = run_concurrency(engine, reqs, concurrency=c, warmup=warm)
                rows[f"{backend}@{c}"] = {"backend": backend, "concurrency": c,
                                          "output_tok_s": round(r.output_tokens_per_s, 1),
                                          "requests": r.num_requests, "errors": len(r.errors)}
        for c in concurrencies:
            t, o = rows[f"torch@{c}"], rows[f"onnxruntime@{c}"]
            rows[f"ratio@{c}"] = {"onnxruntime_over_torch": round(o["output_tok_s"] / t["output_tok_s"], 3)}
        return {"model": "tiny", "isl": isl, "osl": osl, "dtype": "fp32", "threads": 1, "results": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, default=Path("/work/bench-tmp/7b-hf"), help="7B-shaped HF checkpoint.")
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-tmp"), help="Where deploy + export go.")
    ap.add_argument("--keep", action="store_true", help="Keep the deploy checkpoint and the export.")
    ap.add_argument("--skip-7b", action="store_true", help="Only the tiny-model throughput comparison.")
    ap.add_argument("--isl", type=int, default=32)
    ap.add_argument("--osl", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_memory_7b.json")
    args = ap.parse_args()
    py = sys.executable
    results: dict = {"cpus": os.cpu_count()}
    if not args.skip_7b:
        dep, exp = args.workdir / "7b-deploy", args.workdir / "7b-onnx"
        made_deploy = not (dep / "config.json").is_file()
        if made_deploy:
            results["convert"] = measure("trtfalcon convert --dtype bf16",
                                         [py, "-m", "trtfalcon.cli", "convert", str(args.hf), str(dep)])
        shutil.rmtree(exp, ignore_errors=True)
        ckpt = sum(f.stat().st_size for f in dep.glob("*.safetensors"))
        results["deploy_checkpoint_bytes"] = ckpt
        results["export"] = measure("trtfalcon export (bf16, opset 21)",
                                    [py, "-m", "trtfalcon.cli", "export", str(dep), str(exp)])
        results["export"]["peak_rss_fraction_of_checkpoint"] = round(results["export"]["peak_rss_bytes"] / ckpt, 4)
        if results["export"]["exit_code"] == 0:
            results["export_dir_bytes"] = dir_bytes(exp)
            results["graph_bytes"] = (exp / "model.onnx").stat().st_size
            results["check"] = measure("onnx.checker.check_model(model.onnx) + node counts",
                                       [py, "-c", CHECK, str(exp)])
            nodes, external, plugins = (results["check"]["stdout_tail"].split() + ["?"] * 3)[:3]
            results["graph"] = {"nodes": nodes, "external_initializers": external, "plugin_nodes": plugins}
        if not args.keep:
            shutil.rmtree(exp, ignore_errors=True)
            if made_deploy:
                shutil.rmtree(dep, ignore_errors=True)
    results["throughput_tiny"] = throughput(args.isl, args.osl, [32, 64])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if "export" in results:
        e = results["export"]
        print(f"deploy checkpoint: {results['deploy_checkpoint_bytes'] / 1e9:.2f} GB")
        print(f"export: {e['wall_s']} s, peak RSS {e['peak_rss_bytes'] / 1e9:.2f} GB "
              f"({e['peak_rss_fraction_of_checkpoint']:.1%} of the checkpoint), exit {e['exit_code']}")
        if "graph" in results:
            print(f"graph: {results['graph']}, model.onnx {results['graph_bytes'] / 1e6:.2f} MB, check exit "
                  f"{results['check']['exit_code']}")
    for key, row in results["throughput_tiny"]["results"].items():
        print(f"{key:<18} {row}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
