from __future__ import annotations

import os
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
