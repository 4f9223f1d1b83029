"""bench/gpu/check.sh --dry-run: every part of the GPU check runs on the tiny model on this CPU and lands in the
summary, so the script a lent GPU runs is known to work before one is lent."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu" / "check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # each part sets what it needs
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "check.sh"), "--dry-run", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    parts = summary["parts"]
    assert {n: p["status"] for n, p in parts.items()} == dict.fromkeys(
        ["env", "gpu_path_tests", "kernel_timings", "e2e_bf16", "e2e_fp8", "transformers", "kernel_tests",
         "e2e_fp8_fp8kv_bf16state", "e2e_bf16_eager"], "ok")
    assert parts["kernel_tests"]["counts"]["passed"] > 0 and not parts["kernel_tests"]["counts"].get("failed")
    assert parts["gpu_path_tests"]["counts"].get("skipped", 0) > 0  # no GPU here: skipped, and said so
    assert all("us" in row for row in parts["kernel_timings"]["result"]["rows"])
    for name in ("e2e_bf16", "e2e_fp8"):
        runs = parts[name]["result"]["runs"]
        assert [r["batch"] for r in runs] == [32, 64]
        assert all(r["output_tokens"] == r["batch"] * 8 and not r["errors"] and r["graph_replays"] > 0 for r in runs)
    assert parts["e2e_fp8"]["result"]["meta"]["fp8_gemm"] == "scaled_mm"
    assert parts["e2e_bf16_eager"]["result"]["runs"][0]["graph_replays"] == 0
    hf = parts["transformers"]["result"]["runs"]
    assert [r["batch"] for r in hf] == [32, 64] and all(r["complete"] for r in hf)
    fig = summary["figures"]
    assert set(fig["ratio_to_transformers"]) >= {"bf16 b32", "bf16 b64", "fp8 b32", "fp8 b64"}
    assert fig["goal_fp8_b64_above_3000"] is None  # no goal applies to a dry run
    md = (out / "summary.md").read_text()
    assert "| bf16 b64 |" in md and "| paged_attention_decode | decode b=8 |" in md
    files = sorted(p.name for p in out.iterdir())  # what the device tool brings back: <= 8 plain, simple names
    assert files == ["check.log", "gpu_path_tests.log", "kernel_tests.log", "summary.json", "summary.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)


def test_test_counts_from_a_finished_and_a_stopped_pytest():
    count = _check_module().count_tests
    assert count("...\n==== 3 passed, 1 failed, 2 skipped in 4.0s ====") == {"passed": 3, "failed": 1, "skipped": 2}
    stopped = "tests/a.py::x PASSED [ 10%]\n[gw1] [ 20%] FAILED tests/a.py::y\ntests/a.py::z PASSED"
    assert count(stopped) == {"passed": 2, "failed": 1, "incomplete": 1}
