"""The one deploy-checkpoint reader (checkpoint/deploy_reader.py): the model loader and the exporter refuse the same
checkpoints with the same message. Each case below is one the loader used to accept (it cast whatever it found to
the compute dtype, and checked the stored dtype's name only when no dtype was asked) while the exporter refused it."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from trtfalcon.checkpoint.convert import convert_checkpoint
from trtfalcon.checkpoint.deploy_reader import open_deploy_checkpoint, read_deploy_config
from trtfalcon.errors import CheckpointError
from trtfalcon.export import export_onnx
from trtfalcon.model.weights import load_weights


@pytest.fixture(scope="module")
def deploy_fp32(tiny_hf, tmp_path_factory):
    return convert_checkpoint(tiny_hf, tmp_path_factory.mktemp("deploy") / "deploy", dtype="fp32")


def _edited(src, dst, retype=None, record=None):
    shutil.copytree(src, dst)
    if retype:
        tensors = load_file(dst / "model.safetensors")
        tensors.update({name: f(tensors[name]) for name, f in retype.items()})
        save_file(tensors, dst / "model.safetensors")
    if record:
        raw = json.loads((dst / "config.json").read_text())
        raw["trtfalcon"].update(record)
        (dst / "config.json").write_text(json.dumps(raw))
    return dst


CASES = {
    # an FP8 tensor outside the FP8 linears (no quantization declared): its values were read as if unscaled
    "fp8 lm_head": (dict(retype={"lm_head.weight": lambda t: t.to(torch.float8_e4m3fn)}),
                    r"'lm_head\.weight' is float8_e4m3fn, but config\.json's trtfalcon\.quantization does not"),
    # an integer tensor where a float one belongs
    "int embeddings": (dict(retype={"embed_tokens.weight": lambda t: t.to(torch.int32)}),
                       r"'embed_tokens\.weight' has dtype torch\.int32, expected bf16, fp16 or fp32"),
    # A_log / D / dt_bias are fp32 in every deploy checkpoint (deploy.FP32_TENSORS): bf16 ones lost their bits
    "bf16 A_log": (dict(retype={"layers.0.mamba.A_log": lambda t: t.to(torch.bfloat16)}),
                   r"'layers\.0\.mamba\.A_log' has dtype torch\.bfloat16, expected float32"),
    # a stored dtype outside the vocabulary was read only when no dtype was asked
    "bad stored dtype": (dict(record={"dtype": "int4"}), r"config\.json: trtfalcon\.dtype: expected one of bf16, fp16, fp32, found 'int4'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loader_refuses_what_the_exporter_refuses(deploy_fp32, tmp_path, case):
    edit, message = CASES[case]
    bad = _edited(deploy_fp32, tmp_path / "bad", **edit)
    with pytest.raises(CheckpointError, match=message):
        load_weights(bad, "fp32")  # a compute dtype given: the old loader's most lenient path
    with pytest.raises(CheckpointError, match=message):
        export_onnx(bad, tmp_path / "onnx", dtype="fp32")
    assert not (tmp_path / "onnx").exists()


def test_loader_and_exporter_read_the_same_tensors(deploy_fp32):
    """What the loader holds is what the exporter streams: the same names, order and dtypes (A_log/D/dt_bias fp32)."""
    ckpt = open_deploy_checkpoint(deploy_fp32)
    weights = load_weights(deploy_fp32, "bf16")
    assert list(weights.tensors) == list(ckpt.names)
    for name, t in weights.tensors.items():
        assert t.dtype == ckpt.dtype_at(name, torch.bfloat16)
        assert torch.equal(t, torch.cat(list(ckpt.chunks(name, t.dtype, budget=64))) if t.dim() else
                           next(ckpt.chunks(name, t.dtype))), name
    assert weights["layers.0.mamba.A_log"].dtype == torch.float32 and weights["lm_head.weight"].dtype == torch.bfloat16


def test_not_a_deploy_checkpoint_says_what_to_run(tiny_hf, tmp_path):
    with pytest.raises(CheckpointError, match=r"not a deploy checkpoint \(has no \"trtfalcon\".*`trtfalcon convert"):
        read_deploy_config(tiny_hf)
    with pytest.raises(CheckpointError, match=r"missing: not a directory"):
        open_deploy_checkpoint(tmp_path / "missing")
