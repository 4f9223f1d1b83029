"""The lent-GPU check's steps (bench/gpu/check.sh runs this): each part a time-boxed process, a summary at the end.

Parts, in order (headline figures before the long test suite, so a short lease still yields them):
    env              versions, the GPU, its clocks
    gpu_path_tests   tests/gpu: CUDA graphs = eager, FP8 GEMMs at the 7B shapes, the sampler's single copy
    kernel_timings   bench/gpu/kernel_timings.py: each kernel at the 7B shapes vs bench/results/kernel_roofline.md
    e2e_bf16         bench/gpu/e2e.py: trtfalcon's runtime, 7B random weights on the GPU, bf16, batch 32 and 64
    e2e_fp8          the same with FP8 weights (FP8 GEMMs)
    transformers     bench/gpu/hf_generate.py: transformers' generate, same shape and batches, same GPU
    kernel_tests     tests/plugins with the interpreter off (the compiled kernels against their references)
    e2e_fp8_fp8kv_bf16state, e2e_bf16_eager   extras while time remains: the cache options through the graph
                     path; the decode step without CUDA graphs (what the graphs buy)
Every part gets min(its box, the time left before the deadline); a part that fails or runs out of time is recorded
as such and the next one runs. summary.json and summary.md are rewritten after every part, so even a lease that
ends mid-way leaves the parts done so far. OUT holds at most 8 files (the device tool's limit): summary.json,
summary.md, check.log (every part's output), kernel_tests.log, gpu_path_tests.log.

--dry-run: the same parts on the tiny preset on the CPU (Triton's interpreter for the kernels, EagerReplay for the
graphs, the CPU's _scaled_mm), so the script is known to run before a GPU is lent (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GPU_BUDGET_S = 465.0  # check.sh's install takes ~15 s more: under 8 minutes in all
DRY_BUDGET_S = 600.0
RESERVE_S = 5.0  # for the last summary
# Not on the GPU: AOT builds are CI's (pinned triton 3.9); TensorRT is not in the image, and its API-name test would
# wait on a wheel download the machine cannot make.
AOT_TESTS, TRT_TESTS = "tests/plugins/test_aot.py", "tests/plugins/test_tensorrt.py"

ENV_CODE = r"""
import json, platform, subprocess, sys
import numpy, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available()}
for mod in ("triton", "transformers", "onnx", "onnxruntime", "pydantic"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:
        info[mod] = f"missing: {type(e).__name__}"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(0)), memory_gb=round(p.total_memory / 1e9, 1),
                multiprocessors=p.multi_processor_count)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                             "clocks.max.sm,clocks.mem,power.limit", "--format=csv"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        info["nvidia_smi"] = f"{type(e).__name__}: {e}"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
"""


@dataclass
class Part:
    name: str
    argv: list[str]  # "{result}" is replaced by the path the part writes its JSON to
    box_s: float
    min_s: float = 20.0  # skipped when less than this is left
    env: dict[str, str] = field(default_factory=dict)
    log: str | None = None  # a file of its own in OUT for its output (else only check.log)
    tests: bool = False  # a pytest run: its counts are read from its output


def parts(py: str, dry: bool, osl: int) -> list[Part]:
    e2e = [py, "bench/gpu/e2e.py", "--out", "{result}"] + (["--dry-run"] if dry else ["--osl", str(osl)])
    hf = [py, "bench/gpu/hf_generate.py", "--out", "{result}"] + (["--dry-run"] if dry else ["--osl", str(osl)])
    pytest = [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    if not dry and importlib.util.find_spec("xdist") is not None:
        pytest += ["-n", "8"]  # Triton compiles each test's kernels: 8 processes compile in parallel
    if dry:  # the interpreter on the CPU: one quick kernel test file, the same mechanics
        kernel_tests = Part("kernel_tests", pytest + ["tests/plugins/test_gated_norm.py"], 120, tests=True,
                            log="kernel_tests.log")
    else:
        kernel_tests = Part("kernel_tests", pytest + ["tests/plugins", "--ignore", AOT_TESTS, "--ignore", TRT_TESTS],
                            150, min_s=45,
                            env={"TRITON_INTERPRET": "0", "TRTFALCON_TEST_DEVICE": "cuda"}, tests=True,
                            log="kernel_tests.log")
    gpu_env = {} if dry else {"TRITON_INTERPRET": "0"}
    return [
        Part("env", [py, "-c", ENV_CODE, "{result}"], 30, min_s=5),
        Part("gpu_path_tests", pytest + ["tests/gpu"], 75, env=gpu_env, tests=True, log="gpu_path_tests.log"),
        Part("kernel_timings", [py, "bench/gpu/kernel_timings.py", "--out", "{result}"] + (["--dry-run"] if dry else []),
             75, env={"TRITON_INTERPRET": "1"} if dry else gpu_env),
        Part("e2e_bf16", e2e + ["--weights", "bf16"], 90, min_s=40, env=gpu_env),
        Part("e2e_fp8", e2e + ["--weights", "fp8"], 80, min_s=40, env=gpu_env),
        Part("transformers", hf + ["--budget-s", "12" if dry else "30"], 100, min_s=40),
        kernel_tests,
        Part("e2e_fp8_fp8kv_bf16state", e2e + ["--weights", "fp8", "--kv-cache-dtype", "fp8", "--ssm-state-dtype",
                                               "bf16", "--batch", "64"], 60, min_s=40, env=gpu_env),
        Part("e2e_bf16_eager", e2e + ["--weights", "bf16", "--cuda-graphs", "off", "--batch", "64"], 60, min_s=40,
             env=gpu_env),
    ]


def count_tests(text: str) -> dict[str, int]:
    """pytest's closing counts; from the per-test lines (-v) when it was stopped before closing."""
    final = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", text.splitlines()[-1]
                       if text.strip() else "")
    if final and "=" in text.splitlines()[-1]:
        return {("error" if k.startswith("error") else k): int(n) for n, k in final}
    counts: dict[str, int] = {}
    for word, key in (("PASSED", "passed"), ("FAILED", "failed"), ("SKIPPED", "skipped"), ("ERROR", "error")):
        n = len(re.findall(rf"\b{word}\b", text))
        if n:
            counts[key] = n
    counts["incomplete"] = 1
    return counts


def run_part(part: Part, box: float, out: Path, work: Path, log) -> dict:  # noqa: ANN001
    result = work / f"{part.name}.json"
    argv = [a.replace("{result}", str(result)) for a in part.argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **part.env}  # no network to wait on
    capture = work / f"{part.name}.out"
    log.write(f"\n===== {part.name}: {' '.join(argv)}  (box {box:.0f} s)\n")
    log.flush()
    t0 = time.monotonic()
    with open(capture, "w") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=box)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part's whole process group (pytest workers included)
            proc.wait()
            rc, status = None, "timeout"
    seconds = time.monotonic() - t0
    text = capture.read_text(errors="replace")
    log.write(text)
    log.write(f"===== {part.name}: {status} in {seconds:.1f} s\n")
    log.flush()
    if part.log:
        (out / part.log).write_text(text)
    entry: dict = {"status": status, "seconds": round(seconds, 1), "box_s": round(box), "returncode": rc}
    if part.tests:
        entry["counts"] = count_tests(text)
        if status == "failed" and not entry["counts"].get("failed") and not entry["counts"].get("error"):
            entry["status"] = "ok" if entry["counts"].get("passed") or entry["counts"].get("skipped") else status
    if result.exists():
        try:
            entry["result"] = json.loads(result.read_text())
        except json.JSONDecodeError as exc:
            entry["result_error"] = str(exc)
    if entry["status"] != "ok":
        entry["tail"] = text[-3000:]
    return entry


# ---------------------------------------------------------------------------------------------------------- summary
def figures(summary: dict) -> dict:
    """The headline numbers: tok/s per GPU by (weights, batch), the ratio to transformers, kernel fractions."""
    p = summary["parts"]
    hf = {r["batch"]: r.get("output_tokens_per_s_per_gpu") for r in p.get("transformers", {}).get("result", {})
          .get("runs", [])}
    tok, ratio = {}, {}
    for name in ("e2e_bf16", "e2e_fp8", "e2e_fp8_fp8kv_bf16state", "e2e_bf16_eager"):
        for r in p.get(name, {}).get("result", {}).get("runs", []):
            key = f"{name.removeprefix('e2e_')} b{r['batch']}"
            tok[key] = r["output_tokens_per_s_per_gpu"]
            if hf.get(r["batch"]):
                ratio[key] = round(r["output_tokens_per_s_per_gpu"] / hf[r["batch"]], 2)
    kernels = {f"{r['kernel']} {r['scenario']}": float(f"{r['fraction_of_roofline']:.3g}")
               for r in p.get("kernel_timings", {}).get("result", {}).get("rows", []) if "fraction_of_roofline" in r}
    decode = [v for k, v in kernels.items() if "decode" in k]
    measured = not summary["dry_run"]  # a dry run's figures are the tiny model's on a CPU: no goal applies
    return {"tokens_per_s_per_gpu": tok, "transformers_tokens_per_s": {f"bf16 b{b}": v for b, v in hf.items()},
            "ratio_to_transformers": ratio, "kernel_fraction_of_roofline": kernels,
            "goal_decode_kernels_at_60pct": (min(decode) >= 0.6) if decode and measured else None,
            "goal_fp8_b64_above_3000": (tok["fp8 b64"] > 3000) if "fp8 b64" in tok and measured else None}


def to_markdown(summary: dict) -> str:
    f = summary["figures"]
    lines = [f"# GPU check ({'dry run, CPU' if summary['dry_run'] else summary.get('device', '?')})", "",
             f"{summary['started']}, {summary['seconds']:.0f} s in all (budget {summary['budget_s']:.0f} s).", "",
             "| part | status | seconds | box |", "|---|---|---|---|"]
    for name, e in summary["parts"].items():
        extra = f" {e['counts']}" if "counts" in e else ""
        lines.append(f"| {name} | {e['status']}{extra} | {e.get('seconds', '')} | {e.get('box_s', '')} |")
    lines += ["", "## End to end (output tokens/s per GPU; ratio to transformers' generate, bf16, same batch)", "",
              "| run | tok/s/GPU | TPOT p50 ms | decode step vs roofline | ratio to transformers |", "|---|---|---|---|---|"]
    for name in ("e2e_bf16", "e2e_fp8", "e2e_fp8_fp8kv_bf16state", "e2e_bf16_eager"):
        for r in summary["parts"].get(name, {}).get("result", {}).get("runs", []):
            key = f"{name.removeprefix('e2e_')} b{r['batch']}"
            tpot = r["tpot_ms"]["p50"]
            lines.append(f"| {key} | {r['output_tokens_per_s_per_gpu']} | {tpot:.2f} | "
                         f"{r['decode_fraction_of_roofline']} | {f['ratio_to_transformers'].get(key, '')} |"
                         if tpot is not None else f"| {key} | {r['output_tokens_per_s_per_gpu']} | | | |")
    for b, v in f["transformers_tokens_per_s"].items():
        lines.append(f"| transformers {b} | {v} | | | 1.0 |")
    rows = summary["parts"].get("kernel_timings", {}).get("result", {}).get("rows", [])
    if rows:
        lines += ["", "## Kernels (bench/results/kernel_roofline.md's rows)", "",
                  "| kernel | scenario | us | GB/s | TFLOP/s | roofline us | fraction |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            if "us" in r:
                lines.append(f"| {r['kernel']} | {r['scenario']} | {r['us']:.1f} | {r['gb_per_s']:.0f} | "
                             f"{r['tflop_per_s']:.1f} | {r['roofline_us']:.2f} | {r['fraction_of_roofline']:.1%} |")
            else:
                lines.append(f"| {r['kernel']} | {r['scenario']} | {r.get('error', '')[:60]} | | | | |")
    lines += ["", "## Goals", "",
              f"- decode kernels at >= 60% of the memory roofline: {f['goal_decode_kernels_at_60pct']}",
              f"- FP8 batch 64 above 3,000 tok/s/GPU: {f['goal_fp8_b64_above_3000']}", ""]
    return "\n".join(lines)


def write_summary(out: Path, summary: dict) -> None:
    summary["figures"] = figures(summary)
    for name, text in (("summary.json", json.dumps(summary, indent=2) + "\n"), ("summary.md", to_markdown(summary))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--osl", type=int, default=256, help="output tokens per request of the end-to-end runs")
    ap.add_argument("--budget-s", type=float, default=None, help=f"default: {GPU_BUDGET_S:.0f} (GPU)")
    ap.add_argument("--only", action="append", help="run only these parts (repeatable)")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S)
    deadline = time.monotonic() + budget
    summary: dict = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget,
                     "osl": args.osl, "parts": {}, "seconds": 0.0}
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    with open(out / "check.log", "a") as log:
        for part in parts(sys.executable, args.dry_run, args.osl):
            if args.only and part.name not in args.only:
                continue
            left = deadline - time.monotonic() - RESERVE_S
            if left < part.min_s:
                summary["parts"][part.name] = {"status": "skipped", "why": f"{left:.0f} s left, needs {part.min_s:.0f}"}
            else:
                summary["parts"][part.name] = run_part(part, min(part.box_s, left), out, work, log)
            env = summary["parts"].get("env", {}).get("result", {})
            summary["device"] = env.get("gpu", "no GPU")
            summary["seconds"] = time.monotonic() - t0
            write_summary(out, summary)
            print(f"{part.name}: {summary['parts'][part.name]['status']}", flush=True)
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
