"""convert and synth: folding is exact, output is streamed and atomic, every bad input fails clearly."""

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trtfalcon.checkpoint.convert import QUANTIZED_PLANNERS, convert_checkpoint
from trtfalcon.checkpoint.dense import plan_dense_deploy
from trtfalcon.checkpoint.deploy import deploy_tensor_shapes
from trtfalcon.checkpoint.synth import synth_checkpoint
from trtfalcon.config import FalconH1Config, preset_dict
from trtfalcon.errors import CheckpointError, ConfigError
from trtfalcon.model.reference import ReferenceModel
from trtfalcon.model.weights import fold_hf, load_weights
from helpers import hf_logits, hf_model, read_safetensors


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_converted_checkpoint_matches_transformers_and_in_memory_fold(hf_checkpoints, variant, tmp_path):
    src = hf_checkpoints(variant)
    out = convert_checkpoint(src, tmp_path / "deploy", dtype="fp32", max_shard_bytes=20_000)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["trtfalcon"]["format"] == "deploy" and cfg["tie_word_embeddings"] is False
    assert all(cfg[k] == 1.0 for k in ("embedding_multiplier", "lm_head_multiplier", "key_multiplier"))
    assert cfg["ssm_multipliers"] == [1.0] * 5 and cfg["mlp_multipliers"] == [1.0, 1.0]
    assert (out / "model.safetensors.index.json").is_file()  # sharded: 20 kB shards
    written = read_safetensors(out)
    expected_shapes = deploy_tensor_shapes(FalconH1Config.from_json_file(src))
    assert {k: tuple(v.shape) for k, v in written.items()} == expected_shapes
    assert all(written[k].dtype == torch.float32 for k in written if k.endswith(("A_log", ".D", "dt_bias")))
    folded = fold_hf(src, "fp32").tensors
    for k, v in written.items():
        assert torch.equal(v, folded[k]), k
    ids = list(range(3, 20))
    got, _ = ReferenceModel(load_weights(out)).prefill(torch.tensor(ids))
    want = hf_logits(hf_model(src), ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_fold_formulas_on_one_layer(tiny_hf):
    """The folds of ../shared/reference/falcon-h1.md, checked tensor by tensor against the HF weights."""
    cfg = FalconH1Config.from_json_file(tiny_hf)
    hf = read_safetensors(tiny_hf)
    d = fold_hf(tiny_hf, "fp32").tensors
    p = "model.layers.1"
    q, k, v = d["layers.1.attn.qkv_proj.weight"].split([cfg.q_size, cfg.kv_size, cfg.kv_size])
    a_in = cfg.attention_in_multiplier
    torch.testing.assert_close(q, hf[f"{p}.self_attn.q_proj.weight"] * a_in)
    torch.testing.assert_close(k, hf[f"{p}.self_attn.k_proj.weight"] * a_in * cfg.key_multiplier)
    torch.testing.assert_close(v, hf[f"{p}.self_attn.v_proj.weight"] * a_in)
    z, x, b, c, dt = d["layers.1.mamba.in_proj.weight"].split(list(cfg.in_proj_splits))
    w = hf[f"{p}.mamba.in_proj.weight"].split(list(cfg.in_proj_splits))
    for got, src, m in zip((z, x, b, c, dt), w, cfg.ssm_multipliers):
        torch.testing.assert_close(got, src * cfg.ssm_in_multiplier * m)
    gate, up = d["layers.1.mlp.gate_up_proj.weight"].chunk(2)
    torch.testing.assert_close(gate, hf[f"{p}.feed_forward.gate_proj.weight"] * cfg.mlp_multipliers[0])
    torch.testing.assert_close(up, hf[f"{p}.feed_forward.up_proj.weight"])
    torch.testing.assert_close(d["lm_head.weight"], hf["lm_head.weight"] * cfg.lm_head_multiplier)
    torch.testing.assert_close(d["embed_tokens.weight"], hf["model.embed_tokens.weight"] * cfg.embedding_multiplier)
    assert d["layers.1.mamba.conv1d.weight"].shape == (cfg.conv_dim, cfg.mamba_d_conv)


def test_bf16_conversion_casts_once_after_folding_in_fp32(tiny_hf, tmp_path):
    out = convert_checkpoint(tiny_hf, tmp_path / "d", dtype="bf16")
    w = read_safetensors(out)
    ref = fold_hf(tiny_hf, "fp32").tensors
    assert w["layers.0.mamba.in_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(w["layers.0.mamba.in_proj.weight"], ref["layers.0.mamba.in_proj.weight"].to(torch.bfloat16))
    assert w["layers.0.mamba.A_log"].dtype == torch.float32


def test_single_file_and_sharded_inputs_give_identical_outputs(tmp_path):
    cfg = preset_dict("tiny")
    synth_checkpoint(cfg, tmp_path / "one", dtype="fp32", seed=3)
    synth_checkpoint(cfg, tmp_path / "many", dtype="fp32", seed=3, max_shard_bytes=30_000)
    assert (tmp_path / "one" / "model.safetensors").is_file()
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 3
    a = read_safetensors(convert_checkpoint(tmp_path / "one", tmp_path / "d1", dtype="fp32"))
    b = read_safetensors(convert_checkpoint(tmp_path / "many", tmp_path / "d2", dtype="fp32"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_synth_is_loadable_by_transformers_and_deterministic(tmp_path):
    cfg = preset_dict("tiny")
    synth_checkpoint(cfg, tmp_path / "a", dtype="bf16", seed=7)
    synth_checkpoint(cfg, tmp_path / "b", dtype="bf16", seed=7, max_shard_bytes=25_000)
    synth_checkpoint(cfg, tmp_path / "c", dtype="bf16", seed=8)
    a, b, c = (read_safetensors(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    model = hf_model(tmp_path / "a")  # transformers reads what synth writes, with no missing tensor
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.1.mamba.in_proj.weight"], a["model.layers.1.mamba.in_proj.weight"].float())
    assert torch.isfinite(hf_logits(model, [1, 2, 3])).all()


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.fixture
def src(tiny_hf, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(tiny_hf, dst)
    return dst


def _convert_fails(src, tmp_path, match):
    out = tmp_path / "out"
    with pytest.raises((CheckpointError, ConfigError), match=match):
        convert_checkpoint(src, out)
    assert not out.exists() and not _leftovers(tmp_path, "out")


def _tensors(src):
    with safe_open(src / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_truncated_safetensors(src, tmp_path):
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    _convert_fails(src, tmp_path, "truncated")


def test_corrupt_header(src, tmp_path):
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\x00garbage!!"
    f.write_bytes(bytes(data))
    _convert_fails(src, tmp_path, "corrupt safetensors header")


def test_absurd_header_length(src, tmp_path):
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    _convert_fails(src, tmp_path, "corrupt safetensors header")


def test_header_dtype_outside_the_vocabulary_is_named(src, tmp_path):
    t = _tensors(src)
    t["model.layers.1.mamba.A_log"] = t["model.layers.1.mamba.A_log"].double()
    save_file(t, src / "model.safetensors")
    _convert_fails(src, tmp_path, r"tensor 'model\.layers\.1\.mamba\.A_log' dtype: expected one of BF16, .*found 'F64'")


def test_missing_tensor(src, tmp_path):
    t = _tensors(src)
    del t["model.layers.1.mamba.A_log"]
    save_file(t, src / "model.safetensors")
    _convert_fails(src, tmp_path, r"tensor 'model.layers.1.mamba.A_log' is missing")


def test_wrong_shape(src, tmp_path):
    t = _tensors(src)
    t["model.layers.0.mamba.in_proj.weight"] = t["model.layers.0.mamba.in_proj.weight"][:-1].contiguous()
    save_file(t, src / "model.safetensors")
    _convert_fails(src, tmp_path, r"in_proj.weight' has shape \[195, 64\], expected \[196, 64\]")


def test_tensors_from_another_architecture(src, tmp_path):
    t = _tensors(src)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    save_file(t, src / "model.safetensors")
    _convert_fails(src, tmp_path, "unexpected tensors")


def test_bad_config_json(src, tmp_path):
    (src / "config.json").write_text('{"model_type": "falcon_h1", "hidden_size": 64')
    _convert_fails(src, tmp_path, "not valid JSON")
    cfg = preset_dict("tiny")
    cfg["mamba_n_heads"] = 5
    (src / "config.json").write_text(json.dumps(cfg))
    _convert_fails(src, tmp_path, "mamba_n_heads")


def test_pickle_only_checkpoint_is_refused(src, tmp_path):
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _convert_fails(src, tmp_path, "only pickle weights.*arbitrary code")


def test_index_naming_a_missing_shard(tmp_path):
    synth_checkpoint(preset_dict("tiny"), tmp_path / "s", dtype="fp32", max_shard_bytes=30_000)
    shards = sorted((tmp_path / "s").glob("model-*.safetensors"))
    shards[1].unlink()
    _convert_fails(tmp_path / "s", tmp_path, "names shard .* which is missing")


def test_planner_table_refuses_an_unknown_quantization_and_one_entry_adds_a_format(src, tmp_path, monkeypatch):
    """A quantized checkpoint is planned by the quant_algo it declares (QUANTIZED_PLANNERS): one with no planner is
    refused by name before any output; one entry makes convert write it and load_weights fold it, the same bytes."""
    (src / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    _convert_fails(src, tmp_path, r"hf_quant_config\.json: quant_algo is 'NVFP4'; trtfalcon reads FP8 only")
    with pytest.raises(CheckpointError, match="quant_algo is 'NVFP4'; trtfalcon reads FP8 only"):
        load_weights(src)

    def plan_nvfp4(hf_dir, dtype):  # what a new planner module returns: a plan plus its config records
        plan = plan_dense_deploy(hf_dir, dtype)
        plan.records["quantization"] = {"quant_algo": "NVFP4"}
        plan.metadata["quantization"] = "NVFP4"
        return plan

    monkeypatch.setitem(QUANTIZED_PLANNERS, "NVFP4", plan_nvfp4)
    out = convert_checkpoint(src, tmp_path / "out", dtype="fp32")
    assert json.loads((out / "config.json").read_text())["trtfalcon"]["quantization"] == {"quant_algo": "NVFP4"}
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata()["quantization"] == "NVFP4"
    written, in_memory = read_safetensors(out), load_weights(src).tensors
    assert written.keys() == in_memory.keys() and all(torch.equal(written[k], in_memory[k]) for k in written)


def test_unwritable_output_leaves_nothing(tiny_hf, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot create output directory"):
        convert_checkpoint(tiny_hf, blocker / "out")


def test_failure_midway_leaves_nothing(tiny_hf, tmp_path):
    calls = []

    def boom(spec):
        calls.append(spec.name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        convert_checkpoint(tiny_hf, tmp_path / "out", on_tensor=boom)
    assert len(calls) == 5
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_existing_output_needs_overwrite(tiny_hf, tmp_path):
    out = convert_checkpoint(tiny_hf, tmp_path / "out", dtype="fp32")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(tiny_hf, out)
    before = read_safetensors(out)["lm_head.weight"]
    convert_checkpoint(tiny_hf, out, dtype="bf16", overwrite=True)
    assert read_safetensors(out)["lm_head.weight"].dtype == torch.bfloat16 != before.dtype


def test_synth_bad_preset_and_dtype(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        from trtfalcon.config import preset_dict as pd

        pd("nope")
    with pytest.raises(CheckpointError, match="dtype"):
        synth_checkpoint(preset_dict("tiny"), tmp_path / "x", dtype="int4")
    assert not (tmp_path / "x").exists()


def test_deploy_checkpoint_with_wrong_version_is_refused(tiny_hf, tmp_path):
    out = convert_checkpoint(tiny_hf, tmp_path / "d", dtype="fp32")
    cfg = json.loads((out / "config.json").read_text())
    cfg["trtfalcon"]["version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="trtfalcon.version is 99"):
        load_weights(out)


def test_deploy_checkpoint_with_multipliers_is_refused(tiny_hf, tmp_path):
    out = convert_checkpoint(tiny_hf, tmp_path / "d", dtype="fp32")
    cfg = json.loads((out / "config.json").read_text())
    cfg["lm_head_multiplier"] = 2.0
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="every multiplier at 1.0"):
        load_weights(out)
