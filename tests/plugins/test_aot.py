"""Every plugin kernel compiles ahead of time for sm_90 on this CPU-only machine, without register spills."""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from trtfalcon.plugins.aot import REPORT_COLUMNS, report_rows, spilling  # noqa: E402
from trtfalcon.plugins.spec import OPS  # noqa: E402


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
