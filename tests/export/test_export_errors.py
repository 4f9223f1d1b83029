"""Bad inputs fail before anything is written, with the file / tensor / field, what was expected and what to run;
a failure part-way leaves nothing at the output path."""

import json
import shutil

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from trtfalcon.checkpoint.convert import convert_checkpoint
from trtfalcon.errors import CheckpointError, ConfigError
from trtfalcon.export import MODEL_FILE, export_onnx, read_manifest
from trtfalcon.checkpoint.deploy_reader import DeployCheckpoint
from trtfalcon.runtime.backends import RuntimeOptions, create_executor
from trtfalcon.runtime.executors.onnxruntime import OnnxRuntimeExecutor
from export_helpers import make_fp8_deploy


def assert_nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temp directory was left behind"


@pytest.fixture(scope="module")
def fp8_dir(deploy_checkpoints, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8-bad") / "fp8"
    make_fp8_deploy(deploy_checkpoints("base"), d)
    return d


def edited_copy(src, dst, drop=(), retype=None, quantization=None):
    """A copy of a single-file deploy checkpoint with tensors dropped / replaced and config.json edited."""
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(retype or {})
    save_file(tensors, dst / "model.safetensors")
    raw = json.loads((src / "config.json").read_text())
    if quantization is not None:
        raw["trtfalcon"]["quantization"] = quantization
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def test_hf_checkpoint_says_run_convert(hf_checkpoints, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"not a deploy checkpoint .*run `trtfalcon convert "):
        export_onnx(hf_checkpoints("base"), out)
    assert_nothing_written(out)


def test_fp8_missing_scale_names_the_tensor(fp8_dir, tmp_path):
    bad = edited_copy(fp8_dir, tmp_path / "bad", drop=["layers.1.mlp.down_proj.input_scale"])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"FP8 linear 'layers.1.mlp.down_proj' has no "
                                              r"'layers.1.mlp.down_proj.input_scale'"):
        export_onnx(bad, out)
    assert_nothing_written(out)


def test_fp8_where_fp8_is_not_allowed(fp8_dir, tmp_path):
    head = load_file(fp8_dir / "model.safetensors")["lm_head.weight"]
    bad = edited_copy(fp8_dir, tmp_path / "bad", retype={"lm_head.weight": head.to(torch.float8_e4m3fn)})
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' is float8_e4m3fn, but .* lm_head stay"):
        export_onnx(bad, tmp_path / "out")


def test_fp8_kv_cache_without_its_scales_names_the_tensor(fp8_dir, tmp_path):
    """An FP8 KV cache declared without k/v scales, or asked of a checkpoint that has none: the tensor is named."""
    bad = edited_copy(fp8_dir, tmp_path / "bad", quantization={"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                                                               "exclude_modules": []})
    with pytest.raises(CheckpointError, match=r"no tensor 'layers\.0\.attn\.k_scale' .*declares an FP8 KV cache"):
        export_onnx(bad, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"kv_dtype fp8 needs tensor 'layers\.0\.attn\.k_scale'"):
        export_onnx(fp8_dir, tmp_path / "out", kv_dtype="fp8")
    assert_nothing_written(tmp_path / "out")


def test_unwritable_output(deploy_checkpoints, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"a-file/out: cannot create output directory"):
        export_onnx(deploy_checkpoints("base"), blocker / "out")
    with pytest.raises(CheckpointError, match=r"a-file: exists and is not a directory"):
        export_onnx(deploy_checkpoints("base"), blocker)
    assert blocker.read_text() == "not a directory"


def test_failure_part_way_leaves_nothing(deploy_checkpoints, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = DeployCheckpoint.chunks

    def failing(self, name, dtype, budget=64 * 2**20):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError(28, "No space left on device")
        yield from original(self, name, dtype, budget)

    monkeypatch.setattr(DeployCheckpoint, "chunks", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        export_onnx(deploy_checkpoints("base"), out)
    assert_nothing_written(out)


def test_existing_output_needs_overwrite(deploy_checkpoints, onnx_exports, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        export_onnx(deploy_checkpoints("base"), out)
    assert (out / "keep.txt").exists()
    export_onnx(deploy_checkpoints("base"), out, overwrite=True)
    assert not (out / "keep.txt").exists() and read_manifest(out)["dtype"] == "fp32"


def test_bad_options(deploy_checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="opset: expected an integer >= 21"):
        export_onnx(deploy_checkpoints("base"), tmp_path / "o", opset=20)
    with pytest.raises(ConfigError, match="kv_dtype: expected one of"):
        export_onnx(deploy_checkpoints("base"), tmp_path / "o", kv_dtype="int8")
    assert_nothing_written(tmp_path / "o")


def test_bf16_export_is_valid_but_onnxruntime_needs_fp32(hf_checkpoints, tmp_path):
    """The checkpoint's bf16 graph (what TensorRT builds) is valid ONNX; onnxruntime's CPU provider has no bf16
    Gemm, and the executor says what to run instead."""
    dep = convert_checkpoint(hf_checkpoints("base"), tmp_path / "dep", dtype="bf16")
    out = export_onnx(dep, tmp_path / "onnx")
    onnx.checker.check_model(str(out / MODEL_FILE))
    model = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["layers.0.attn.qkv_proj.weight"] == onnx.TensorProto.BFLOAT16
    assert types["layers.0.mamba.D"] == types["layers.0.mamba.A"] == onnx.TensorProto.FLOAT  # SSD params stay fp32
    manifest = read_manifest(out)
    assert manifest["dtype"] == "bf16" and manifest["cache_dtypes"] == {"kv_cache": "bf16", "conv_state": "bf16",
                                                                       "ssm_state": "fp32"}
    with pytest.raises(CheckpointError, match=r"exported in bf16.*--dtype fp32"):
        OnnxRuntimeExecutor(out, num_blocks=4, block_size=4, num_slots=2)


def test_manifest_cache_dtype_outside_the_vocabulary_is_named(onnx_exports, tmp_path):
    out = shutil.copytree(onnx_exports("base"), tmp_path / "onnx")
    manifest = json.loads((out / "export.json").read_text())
    manifest["cache_dtypes"]["ssm_state"] = "fp8"  # FP8 is for KV pools only
    (out / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"onnx: export\.json cache_dtypes: expected one of bf16, fp16, fp32, "
                                              r"found 'fp8'"):
        OnnxRuntimeExecutor(out, num_blocks=4, block_size=4, num_slots=2)


def test_onnxruntime_backend_on_a_deploy_checkpoint_says_export_first(deploy_checkpoints):
    with pytest.raises(CheckpointError, match=r"not an ONNX export directory .* export it first"):
        create_executor("onnxruntime", deploy_checkpoints("base"), RuntimeOptions(max_seq_len=32))
