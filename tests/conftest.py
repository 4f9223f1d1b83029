from __future__ import annotations

import os
import subprocess
import sys

# No test machine has a GPU: Triton kernels run in Triton's interpreter, which must be switched on before triton
# is first imported (any test module importing trtfalcon.plugins imports it). Ahead-of-time compilation tests run
# the compiler in a subprocess without this variable.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import VARIANTS, build_hf_checkpoint, variant_config  # noqa: E402

# The test models are tiny: intra-op threads only add overhead (and thrash on a 2-core CI machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """variant name -> path of a small random HF checkpoint saved by transformers (built on first use)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_hf_checkpoint(variant_config(name), tmp_path_factory.mktemp(f"hf-{name}"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_hf(hf_checkpoints) -> Path:
    return hf_checkpoints("base")


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> str:
    return request.param


# ---- TensorRT 11.4's Python bindings wheel: read (never imported) by the API-name tests of engine/ and plugins/
WHEEL_SPEC = "tensorrt-cu13-bindings==11.4.0.106"


def _cache_dir() -> Path:
    return Path(os.environ.get("TRTFALCON_WHEEL_CACHE", Path.home() / ".cache" / "trtfalcon" / "wheels"))


@pytest.fixture(scope="session")
def trt_bindings_wheel() -> Path:
    """The wheel file; downloaded into TRTFALCON_WHEEL_CACHE (default ~/.cache/trtfalcon/wheels) on first use.
    Pinned to its published tags (cp311, manylinux_2_28_x86_64) so any CI Python can fetch it; skipped, with the
    reason, only when no index is reachable."""
    d = _cache_dir()
    found = sorted(d.glob("tensorrt_cu13_bindings-11.4.0.106-*.whl")) if d.is_dir() else []
    if found:
        return found[0]
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(d), "-q", "--only-binary=:all:",
           "--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    found = sorted(d.glob("tensorrt_cu13_bindings-11.4.0.106-*.whl"))
    if r.returncode != 0 or not found:
        pytest.skip(f"cannot obtain {WHEEL_SPEC} to read TensorRT's API: {r.stderr.strip()[-300:]}")
    return found[0]
