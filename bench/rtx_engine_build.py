"""Wall time and peak memory of a TensorRT for RTX engine build (bf16 and FP8) for sm_120, on a CPU-only machine.

    python bench/rtx_engine_build.py --preset 7b --workdir /work/bench-tmp/rtx      # ~45 GB of disk, see below
    python bench/rtx_engine_build.py --preset 1.5b --workdir /tmp/rtx-bench

For each precision: a random checkpoint of the preset's shape (trtfalcon synth), [FP8: ModelOpt quantization with a
one-sample calibration: the scales are meaningless, the engine's size and build cost are not], convert, export, then
the engine build alone, timed, in its own process: its peak RSS comes from the kernel (os.wait4's ru_maxrss, as in
bench/convert_memory.py), so it includes the ONNX parser's copy of the weights, the builder and the serialized
engine. The build config is build_configs/rtxpro6000-fp8-b32-isl512-osl32k.yaml (RTX PRO 6000 Blackwell, sm_120,
batch 32, 8192 tokens a step, 512 -> 32k) with precision.weights set per run.

Disk: the HF checkpoint, the deploy checkpoint and the export are each about the size of the weights (7B: 15 GB in
bf16, 8 GB in FP8); everything but the results is deleted at the end unless --keep. Memory: the builder holds the
weights (parsed initializers) and the engine it writes; measure a small preset first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from trtfalcon.bench.process import measure

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "build_configs" / "rtxpro6000-fp8-b32-isl512-osl32k.yaml"

BUILD = r"""
import json, sys, yaml
from pathlib import Path
from trtfalcon.engine.build import build_tensorrt_engine
from trtfalcon.engine.config import parse_build_config
raw = yaml.safe_load(Path(sys.argv[1]).read_text())
raw["precision"]["weights"] = sys.argv[2]
out = build_tensorrt_engine(parse_build_config(raw), Path(sys.argv[3]), Path(sys.argv[4]), overwrite=True)
m = json.loads((out / "manifest.json").read_text())
print(json.dumps({"engine_bytes": m["engine_bytes"], "build_seconds": m["build_seconds"],
                  "plugin_layers": len(m["plugin_layers"]), "network_layers": sum(m["network_layers"].values())}))
"""


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def run(preset: str, precision: str, work: Path, config: Path) -> dict:
    py = [sys.executable, "-m", "trtfalcon.cli"]
    hf, res = work / f"{preset}-hf", {"preset": preset, "precision": precision}
    if not (hf / "config.json").is_file():
        res["synth"] = measure("trtfalcon synth", py + ["synth", "--preset", preset, "--out", str(hf)])
    source = hf
    if precision == "fp8":
        source = work / f"{preset}-fp8-hf"
        if not (source / "config.json").is_file():
            res["quantize"] = measure("trtfalcon quantize (1 x 16-token calibration, no accuracy report)",
                                      py + ["quantize", str(hf), str(source), "--calib-size", "1", "--calib-seq-len",
                                            "16", "--holdout", "0", "--no-accuracy"])
    deploy, export, engine = (work / f"{preset}-{precision}-{k}" for k in ("deploy", "onnx", "engine"))
    for label, cmd, out in (("convert", ["convert", str(source), str(deploy), "--dtype", "bf16"], deploy),
                            ("export", ["export", str(deploy), str(export), "--dtype", "bf16"], export)):
        if not (out / "config.json").is_file():
            res[label] = measure(f"trtfalcon {label}", py + cmd)
            if res[label]["exit_code"]:
                return res
    res["export_bytes"] = dir_bytes(export)
    res["build"] = measure(f"build_tensorrt_engine ({precision}, sm_120)",
                           [sys.executable, "-c", BUILD, str(config), precision, str(export), str(engine)])
    if res["build"]["exit_code"] == 0:
        res["engine"] = json.loads(res["build"]["stdout_tail"].strip().splitlines()[-1])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--precision", action="append", choices=["bf16", "fp8"], help="default: both")
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-tmp/rtx"))
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoints, exports and engines.")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/rtx_engine_build_<preset>.json")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the plugin kernels compile with Triton's compiler")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {"cpus": os.cpu_count(), "config": str(args.config.relative_to(ROOT)), "runs": []}
    try:
        for precision in args.precision or ["bf16", "fp8"]:
            r = run(args.preset, precision, args.workdir, args.config)
            results["runs"].append(r)
            b, e = r.get("build", {}), r.get("engine", {})
            print(f"{args.preset} {precision}: build {b.get('wall_s')} s wall (builder {e.get('build_seconds')} s), "
                  f"peak RSS {b.get('peak_rss_bytes', 0) / 1e9:.2f} GB, engine {e.get('engine_bytes', 0) / 1e9:.2f} GB "
                  f"(export {r.get('export_bytes', 0) / 1e9:.2f} GB), exit {b.get('exit_code')}"
                  + (f"\n{b.get('stderr_tail')}" if b.get("exit_code") else ""))
    finally:
        if not args.keep:
            for p in args.workdir.glob(f"{args.preset}-*"):
                shutil.rmtree(p, ignore_errors=True)
    out = args.out or Path(__file__).parent / "results" / f"rtx_engine_build_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
