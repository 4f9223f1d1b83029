"""`trtfalcon build`: on a machine without TensorRT it writes every stage up to the engine, then fails naming what
is missing; bad configs and checkpoints fail before any work; the TensorRT executor's errors; and, where TensorRT
and a GPU exist, the engine itself."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from trtfalcon.checkpoint.synth import synth_checkpoint
from trtfalcon.cli import main
from trtfalcon.config import preset_dict
from trtfalcon.engine.build import run_build
from trtfalcon.errors import CheckpointError, ConfigError, MissingDependencyError
from engine_helpers import tensorrt_available

ROOT = Path(__file__).parents[2]
TINY = ROOT / "build_configs" / "tiny-demo.yaml"


def _cli(*args, env=None):
    """The CLI in a subprocess: the plugin kernels compile with Triton's real compiler, which a test process that
    already runs Triton's interpreter (TRITON_INTERPRET=1, tests/plugins) cannot switch back to."""
    env = {k: v for k, v in (env or os.environ).items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "trtfalcon.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def _tiny(tmp_path, **over):
    raw = yaml.safe_load(TINY.read_text())
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    p = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.slow
def test_build_on_cpu_writes_every_stage_then_names_what_is_missing(tiny_hf, tmp_path):
    if tensorrt_available() is None:
        pytest.skip("TensorRT and a GPU are here: test_engine_builds_and_generates covers the full build")
    out = tmp_path / "build"
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf, src)
    r = _cli("build", "--config", TINY, "--checkpoint", src, "--out", out)
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr
    assert "Traceback" not in err
    assert "engine not built: TensorRT is not installed" in err and "pypi.nvidia.com" in err and "NGC" in err
    assert "Written to" in err and "fp8-hf/, deploy/, onnx/, kernels/" in err
    record = json.loads((out / "build.json").read_text())
    assert {k: v["status"] for k, v in record["stages"].items()} == {
        "quantize": "done", "convert": "done", "export": "done", "kernels": "done", "engine": "missing"}
    assert record["memory_plan"]["fits"] and record["checkpoint_kind"] == "hf"
    assert (out / "fp8-hf" / "hf_quant_config.json").is_file()
    assert json.loads((out / "deploy" / "config.json").read_text())["trtfalcon"]["quantization"]["quant_algo"] == "FP8"
    export = json.loads((out / "onnx" / "export.json").read_text())
    assert export["fp8"] and export["dtype"] == "bf16" and (out / "onnx" / "model.onnx").is_file()
    kernels = json.loads((out / "kernels" / "manifest.json").read_text())
    assert kernels["archs"] == ["sm_90"] and kernels["kernels"]
    assert not (out / "engine").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    # the same command again reuses every finished stage and stops at the same place
    r2 = _cli("build", "--config", TINY, "--checkpoint", src, "--out", out)
    assert r2.returncode == 1 and "quantize: reusing" in r2.stderr and "kernels: reusing" in r2.stderr
    # new weights at the same path are a different build: refused without --overwrite, never silently reused
    synth_checkpoint(preset_dict("tiny"), src, dtype="fp32", seed=7, overwrite=True)
    r3 = _cli("build", "--config", TINY, "--checkpoint", src, "--out", out)
    assert r3.returncode == 1 and "built from a different config or checkpoint" in r3.stderr
    assert "reusing" not in r3.stderr
    # the TensorRT backend on this directory says the engine is missing and why
    from trtfalcon.runtime.executors.tensorrt import engine_dir_of

    with pytest.raises(CheckpointError, match="stopped before the engine.*TensorRT is not installed"):
        engine_dir_of(out)


@pytest.mark.slow
def test_h100_fp8_kv_config_builds_up_to_the_engine_on_cpu(tiny_hf, tmp_path):
    """build_configs/h100-fp8-fp8kv-b64-isl512-osl32k.yaml on the tiny checkpoint (calibration shortened to keep
    the test fast) gets as far as the other configs: FP8 KV scales calibrated and converted, float8 KV pools in the
    export, the fp8-cache attention kernels compiled for sm_90; it stops only for the missing TensorRT."""
    if tensorrt_available() is None:
        pytest.skip("TensorRT and a GPU are here: test_engine_builds_and_generates covers the full build")
    raw = yaml.safe_load((ROOT / "build_configs" / "h100-fp8-fp8kv-b64-isl512-osl32k.yaml").read_text())
    assert raw["precision"]["kv_cache"] == "fp8"
    raw["quantize"] = {**raw["quantize"], "calib_size": 8, "calib_seq_len": 64, "holdout": 4}  # as tiny-demo.yaml
    cfg = tmp_path / "h100-fp8kv.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "build"
    r = _cli("build", "--config", cfg, "--checkpoint", tiny_hf, "--out", out)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "engine not built: TensorRT is not installed" in r.stderr, r.stderr
    record = json.loads((out / "build.json").read_text())
    assert {k: v["status"] for k, v in record["stages"].items()} == {
        "quantize": "done", "convert": "done", "export": "done", "kernels": "done", "engine": "missing"}
    deploy = json.loads((out / "deploy" / "config.json").read_text())["trtfalcon"]["quantization"]
    assert deploy["kv_cache_quant_algo"] == "FP8"
    export = json.loads((out / "onnx" / "export.json").read_text())
    assert export["cache_dtypes"]["kv_cache"] == "fp8"
    assert export["inputs"]["kv_cache.0"]["dtype"] == export["outputs"]["kv_cache_out.0"]["dtype"] == "fp8"
    import onnx

    model = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    kv_in = next(i for i in model.graph.input if i.name == "kv_cache.0")
    assert kv_in.type.tensor_type.elem_type == onnx.TensorProto.FLOAT8E4M3FN
    attn = next(n for n in model.graph.node if n.op_type == "paged_attention")
    assert list(attn.input[-2:]) == ["layers.0.attn.k_scale", "layers.0.attn.v_scale"]
    kernels = json.loads((out / "kernels" / "manifest.json").read_text())
    # the engine's kernels only (each op's, in the config's precision): the FP8-cache attention, no bf16-cache one
    assert sorted((k["plugin"], k["config"]) for k in kernels["kernels"]) == [
        ("causal_conv1d", "x-bf16_state-bf16"), ("gated_rms_norm", "y-bf16_gate-then-norm"),
        ("paged_attention", "qkv-bf16_cache-fp8"), ("ssd", "x-bf16_state-fp32")]
    assert record["stages"]["kernels"]["selection"] == kernels["selection"] == {
        "kernels": "engine", "dtype": ["bf16"], "kv_cache": ["fp8"], "ssm_state": ["fp32"], "conv_state": ["bf16"]}
    assert all(k["resources"]["spill_stores"] == k["resources"]["spill_loads"] == 0 for k in kernels["kernels"])


def test_plan_only(tmp_path):
    cfg = ROOT / "build_configs" / "h100-fp8-fp8kv-b64-isl512-osl32k.yaml"
    r = CliRunner().invoke(main, ["build", "--config", str(cfg), "--plan-only"])
    assert r.exit_code == 0 and "fits: weights 7.82 GiB" in r.output, r.output
    raw = yaml.safe_load(cfg.read_text())
    raw["precision"]["kv_cache"] = "bf16"
    bad = tmp_path / "h100-bf16kv.yaml"
    bad.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(main, ["build", "--config", str(bad), "--plan-only"])
    assert r.exit_code == 1 and "does not fit" in r.output and "KV cache 89.38 GiB" in r.output, r.output


def test_config_that_cannot_fit_fails_before_any_work(tiny_hf, tmp_path):
    cfg = _tiny(tmp_path, target={"memory_gib": 0.5})  # 0.45 GiB usable < 0.5 GiB reserve alone
    r = CliRunner().invoke(main, ["build", "--config", str(cfg), "--checkpoint", str(tiny_hf), "--out",
                                  str(tmp_path / "o")])
    assert r.exit_code == 1 and "does not fit" in r.output and "0.45 GiB usable" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_bad_key_in_build_config_cli(tiny_hf, tmp_path):
    cfg = _tiny(tmp_path, runtime={"max_batch": 8})
    r = CliRunner().invoke(main, ["build", "--config", str(cfg), "--checkpoint", str(tiny_hf), "--out",
                                  str(tmp_path / "o")])
    assert r.exit_code == 1 and "runtime.max_batch: unknown key" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_precision_mismatch_and_fp8_kv_without_scales(tiny_hf, tmp_path):
    from trtfalcon.quantize.fp8 import quantize_fp8

    pytest.importorskip("modelopt", reason="FP8 calibration needs nvidia-modelopt")
    fp8 = quantize_fp8(tiny_hf, tmp_path / "fp8", calib_size=2, calib_seq_len=16, accuracy=False).out_dir
    with pytest.raises(ConfigError, match=r"asks precision.kv_cache: fp8, which needs each layer's k_scale / v_scale"):
        run_build(_tiny(tmp_path, precision={"kv_cache": "fp8"}), fp8, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    from trtfalcon.checkpoint.convert import convert_checkpoint

    dep = convert_checkpoint(tiny_hf, tmp_path / "dep")  # a bf16 deploy checkpoint cannot feed an FP8 build
    with pytest.raises(ConfigError, match="bf16 deploy checkpoint but the build config asks precision.weights: fp8"):
        run_build(TINY, dep, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_out_dir_from_another_build_is_refused(tiny_hf, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "build.json").write_text(json.dumps({"fingerprint": "other"}))
    with pytest.raises(CheckpointError, match="built from a different config or checkpoint .*--overwrite"):
        run_build(TINY, tiny_hf, out)


def test_tensorrt_backend_errors_without_an_engine_or_gpu(tmp_path):
    from trtfalcon.runtime.backends import RuntimeOptions, create_executor

    with pytest.raises(CheckpointError, match="no model.engine"):
        create_executor("tensorrt", tmp_path, RuntimeOptions())
    if tensorrt_available() is not None:  # a fake engine directory: the GPU / TensorRT check comes first
        from trtfalcon.engine.build import ENGINE_FORMAT_VERSION

        (tmp_path / "model.engine").write_bytes(b"x")
        (tmp_path / "manifest.json").write_text(json.dumps({"version": ENGINE_FORMAT_VERSION}))
        (tmp_path / "config.json").write_text(json.dumps(__import__("trtfalcon.config").config.preset_dict("tiny")))
        from trtfalcon.runtime.executors.tensorrt import TensorRTExecutor

        with pytest.raises(MissingDependencyError, match="CUDA GPU|TensorRT"):
            TensorRTExecutor(tmp_path)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_builds_and_generates(tiny_hf, tmp_path):
    reason = tensorrt_available()
    if reason:
        pytest.skip(reason)
    cfg = _tiny(tmp_path, precision={"weights": "bf16"})
    out = tmp_path / "build"
    r = _cli("build", "--config", cfg, "--checkpoint", tiny_hf, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "engine" / "manifest.json").read_text())
    assert manifest["versions"]["tensorrt"].startswith("11") and manifest["io"]["aliases"]
    args = ["generate", "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "6", "--json", "--max-batch-size", "4",
            "--max-num-tokens", "64"]
    trt_out = _cli(*args[:1], out / "engine", *args[1:], "--backend", "tensorrt", "--device", "cuda")
    ref_out = _cli(*args[:1], out / "deploy", *args[1:], "--backend", "torch", "--device", "cuda", "--dtype", "bf16")
    assert trt_out.returncode == 0, trt_out.stderr[-2000:]
    assert json.loads(trt_out.stdout.splitlines()[-1])["token_ids"] == json.loads(ref_out.stdout.splitlines()[-1])["token_ids"]
