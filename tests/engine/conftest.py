"""The TensorRT 11.4 Python bindings wheel, obtained once (pip download, never imported) for API-name checks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

WHEEL_SPEC = "tensorrt-cu13-bindings==11.4.0.106"


def _cache_dir() -> Path:
    return Path(os.environ.get("TRTFALCON_WHEEL_CACHE", Path.home() / ".cache" / "trtfalcon" / "wheels"))


@pytest.fixture(scope="session")
def trt_bindings_wheel() -> Path:
    """The wheel file; downloaded into TRTFALCON_WHEEL_CACHE (default ~/.cache/trtfalcon/wheels) on first use.
    Pinned to its published tags (cp311, manylinux_2_28_x86_64) so any CI Python can fetch it; skipped, with the
    reason, only when no index is reachable."""
    for d in (_cache_dir(), Path("/tmp/trtb")):
        found = sorted(d.glob("tensorrt_cu13_bindings-11.4.0.106-*.whl")) if d.is_dir() else []
        if found:
            return found[0]
    d = _cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(d), "-q", "--only-binary=:all:",
           "--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    found = sorted(d.glob("tensorrt_cu13_bindings-11.4.0.106-*.whl"))
    if r.returncode != 0 or not found:
        pytest.skip(f"cannot obtain {WHEEL_SPEC} to read TensorRT's API: {r.stderr.strip()[-300:]}")
    return found[0]
