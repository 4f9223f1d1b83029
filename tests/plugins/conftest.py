"""Kernel tests run in Triton's interpreter on the CPU: TRITON_INTERPRET must be set before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    from trtfalcon.plugins import conv1d

    if not type(conv1d.causal_conv1d_kernel).__name__.startswith("Interpreted"):
        raise pytest.UsageError("tests/plugins: triton was imported before TRITON_INTERPRET=1 was set; "
                                "run with TRITON_INTERPRET=1 in the environment")
