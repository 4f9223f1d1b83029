"""Fixtures: deploy checkpoints (fp32) and their ONNX exports for every config variant, made once per session."""

import pytest

pytest.importorskip("onnxruntime", reason="these tests run the graph in onnxruntime: pip install 'trtfalcon[onnx]'")

from trtfalcon.checkpoint.convert import convert_checkpoint  # noqa: E402
from trtfalcon.export import export_onnx  # noqa: E402


@pytest.fixture(scope="session")
def deploy_checkpoints(hf_checkpoints, tmp_path_factory):
    """variant -> fp32 deploy checkpoint of its HF checkpoint."""
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"deploy-{name}") / "deploy"
            cache[name] = convert_checkpoint(hf_checkpoints(name), out, dtype="fp32")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def onnx_exports(deploy_checkpoints, tmp_path_factory):
    """variant -> fp32 ONNX export directory of its deploy checkpoint."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = export_onnx(deploy_checkpoints(name), tmp_path_factory.mktemp(f"onnx-{name}") / "onnx")
        return cache[name]

    return get
