"""Every plugin kernel compiles ahead of time for sm_90 on this CPU-only machine, without register spills."""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from trtfalcon.plugins.aot import REPORT_COLUMNS, report_rows, spilling  # noqa: E402
from trtfalcon.plugins.ops import OPS  # noqa: E402


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """compile_all in a subprocess: this test process runs Triton's interpreter (TRITON_INTERPRET=1, see
    conftest.py), and ahead-of-time compilation needs the real compiler."""
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys; from pathlib import Path; from trtfalcon.plugins.aot import compile_all; " \
           "compile_all(['sm_90'], Path(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    m["_dir"] = out
    return m


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_spills(manifest):
    plugins = {r["plugin"] for r in manifest["kernels"]}
    assert plugins == {op.plugin_name(k) for op in OPS.values() for k in op.kernels}
    assert not spilling(manifest), f"register spills: {spilling(manifest)}"
    for r in manifest["kernels"]:
        assert r["arch"] == "sm_90"
        assert 0 < r["resources"]["registers"] <= 255
        assert r["launch"]["block_x"] == r["launch"]["num_warps"] * 32
        assert r["launch"]["shared_mem"] <= 227 * 1024  # H100/H200 opt-in shared memory per block


@pytest.mark.slow
def test_artifacts_match_the_tensorrt_abi(manifest):
    out = manifest["_dir"]
    assert json.loads((out / "manifest.json").read_text())["archs"] == ["sm_90"]
    for r in manifest["kernels"]:
        ptx = (out / r["files"]["ptx"]).read_text()
        assert ".target sm_90a" in ptx
        entry = re.search(r"\.entry\s+" + re.escape(r["kernel_name"]) + r"\s*\((.*?)\)", ptx, re.S).group(1)
        n_params = len([p for p in entry.split(",") if p.strip()])
        n_expected = len([v for v in r["signature"].values() if v != "constexpr"])
        assert n_params == n_expected, f"{r['plugin']}: PTX takes {n_params} params, TensorRT passes {n_expected}"
        assert json.loads((out / r["files"]["ptx"].replace(".ptx", ".json")).read_text())["kernel_name"]


@pytest.mark.slow
def test_report_rows(manifest):
    rows = report_rows(manifest)
    assert rows and set(rows[0]) == set(REPORT_COLUMNS)


@pytest.mark.slow
def test_fp8_kv_cache_kernels_compile_for_sm90_without_spills(manifest):
    """The FP8 KV cache configurations (E4M3 cache, bf16 and fp32 activations, prefill and decode kernels) are
    built, take the cache as *fp8e4nv and the k/v scales as fp32 pointers, and do not spill."""
    fp8 = [r for r in manifest["kernels"] if r["config"].endswith("_cache-fp8")]
    assert {(r["plugin"], r["config"]) for r in fp8} == {
        (p, f"qkv-{a}_cache-fp8") for p in ("paged_attention", "paged_attention_decode") for a in ("fp32", "bf16")}
    for r in fp8:
        assert r["signature"]["kv_cache_ptr"] == r["signature"]["kv_cache_out_ptr"] == "*fp8e4nv"
        assert r["signature"]["k_scale_ptr"] == r["signature"]["v_scale_ptr"] == "*fp32"
        assert r["constexprs"]["KV_FP8"] is True and r["constexprs"]["HAS_KV_SCALE"] is True
        assert r["resources"]["spill_stores"] == r["resources"]["spill_loads"] == 0, r
        assert 0 < r["resources"]["registers"] <= 255
