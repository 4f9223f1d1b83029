"""Kernel tests run in Triton's interpreter on the CPU: TRITON_INTERPRET must be set before triton is imported.

On a GPU (bench/gpu/check.sh) TRTFALCON_TEST_DEVICE=cuda with TRITON_INTERPRET=0 runs the same tests on the
compiled kernels: CUDA becomes torch's default device, so the tensors the tests make are on the GPU."""

import os

ON_GPU = os.environ.get("TRTFALCON_TEST_DEVICE") == "cuda"
os.environ.setdefault("TRITON_INTERPRET", "0" if ON_GPU else "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if ON_GPU:
    torch.set_default_device("cuda")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    from trtfalcon.plugins import conv1d

    interpreted = type(conv1d.causal_conv1d_kernel).__name__.startswith("Interpreted")
    if not ON_GPU:
        if not interpreted:
            raise pytest.UsageError("tests/plugins: triton was imported before TRITON_INTERPRET=1 was set; "
                                    "run with TRITON_INTERPRET=1 in the environment")
        return
    if interpreted:
        raise pytest.UsageError("TRTFALCON_TEST_DEVICE=cuda runs the compiled kernels: set TRITON_INTERPRET=0")
    # generation through the executor on CPU tensors needs the interpreter; tests/gpu/ runs it on the GPU
    cpu_only = pytest.mark.skip(reason="runs the kernels on CPU tensors (Triton's interpreter); tests/gpu/ covers "
                                       "generation with the compiled kernels")
    for item in items:
        if item.path.name == "test_generate_triton.py":
            item.add_marker(cpu_only)
