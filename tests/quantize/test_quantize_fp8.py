"""FP8: ModelOpt calibration -> unified HF checkpoint -> deploy checkpoint -> torch executor, each step checked."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from trtfalcon.checkpoint.convert import convert_checkpoint
from trtfalcon.cli import main
from trtfalcon.config import FalconH1Config
from trtfalcon.errors import CheckpointError
from trtfalcon.model.weights import load_weights
from trtfalcon.quantize.calibration import CalibrationDataError, load_calibration
from trtfalcon.quantize.fp8 import quantize_fp8
from trtfalcon.runtime.contract import StepBatch
from trtfalcon.runtime.executors.torch import TorchExecutor
from helpers import HF_LINEARS, hf_fake_quant_model, hf_model, read_accuracy_report, read_safetensors

def _prefill_batch(prompts, max_blocks, block_size):
    ids = [t for p in prompts for t in p]
    cu = [0]
    for p in prompts:
        cu.append(cu[-1] + len(p))
    tables = torch.zeros(len(prompts), max_blocks, dtype=torch.int32)
    for b in range(len(prompts)):
        tables[b] = torch.arange(b * max_blocks, (b + 1) * max_blocks)
    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.int32),
        positions=torch.tensor([i for p in prompts for i in range(len(p))], dtype=torch.int32),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32), context_lens=torch.zeros(len(prompts), dtype=torch.int32),
        state_slots=torch.arange(len(prompts), dtype=torch.int32), block_tables=tables,
    )


# ------------------------------------------------------------------------------------------- the unified checkpoint
def test_unified_checkpoint_tensors_dtypes_and_files(fp8_hf, tok_hf):
    hq = json.loads((fp8_hf / "hf_quant_config.json").read_text())
    assert hq["producer"]["name"] == "modelopt"
    q = hq["quantization"]
    assert q["quant_algo"] == "FP8" and q["kv_cache_quant_algo"] is None
    assert "lm_head" in q["exclude_modules"] and "model.layers.0.mamba.conv1d" in q["exclude_modules"]
    cfg = json.loads((fp8_hf / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    assert (fp8_hf / "tokenizer.json").is_file()
    t = read_safetensors(fp8_hf)
    for i in range(2):
        for lin in HF_LINEARS:
            m = f"model.layers.{i}.{lin}"
            assert t[f"{m}.weight"].dtype == torch.float8_e4m3fn, m
            assert t[f"{m}.weight_scale"].dtype == torch.float32 and t[f"{m}.weight_scale"].numel() == 1
            assert t[f"{m}.input_scale"].dtype == torch.float32 and t[f"{m}.input_scale"].numel() == 1
        a = f"model.layers.{i}.self_attn"
        assert t[f"{a}.q_proj.input_scale"] == t[f"{a}.k_proj.input_scale"] == t[f"{a}.v_proj.input_scale"]
        f = f"model.layers.{i}.feed_forward"
        assert t[f"{f}.gate_proj.input_scale"] == t[f"{f}.up_proj.input_scale"]
        assert not any("k_scale" in k or "v_scale" in k for k in t)
    unquantized = [k for k in t if k.startswith(("lm_head", "model.embed_tokens", "model.final_layernorm"))
                   or "conv1d" in k or "norm" in k or k.endswith(("A_log", ".D", "dt_bias"))]
    assert len(unquantized) == 3 + 2 * 8
    assert all(t[k].dtype == torch.float32 for k in unquantized)  # the source's dtype (fp32 here)
    assert not any(k.endswith("_scale") and k.rsplit(".", 1)[0] + ".weight" in unquantized for k in t)
    calib = json.loads((fp8_hf / "calibration.json").read_text())["calibration"]
    assert calib["synthetic"] is False and calib["source"].startswith("file ")
    assert calib["calib_samples"] == 12 and calib["holdout_samples"] == 4 and calib["tokenizer"]


def test_accuracy_report_is_sane(fp8_hf):
    r = read_accuracy_report(fp8_hf, 4)
    assert r["top1_agreement"] >= 0.95
    assert 0 < r["logit_rel_rms_err"] < 0.05 and r["logit_max_abs_err"] > 0  # FP8 changes something, a little
    assert 0.98 < r["perplexity_ratio"] < 1.02


def test_fp8_kv_cache_scales(fp8_kv_hf):
    t = read_safetensors(fp8_kv_hf)
    assert json.loads((fp8_kv_hf / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
    for i in range(2):
        k, v = t[f"model.layers.{i}.self_attn.k_proj.k_scale"], t[f"model.layers.{i}.self_attn.v_proj.v_scale"]
        assert k.dtype == v.dtype == torch.float32 and float(k) > 0 and float(v) > 0
    assert json.loads((fp8_kv_hf / "calibration.json").read_text())["calibration"]["synthetic"] is True
    assert not (fp8_kv_hf / "accuracy.json").exists()
    w = load_weights(fp8_kv_hf, "fp32")
    assert w["layers.1.attn.k_scale"] == t["model.layers.1.self_attn.k_proj.k_scale"]


# --------------------------------------------------------------------------------------------------- convert
def test_convert_folds_scales_exactly(fp8_hf, tmp_path):
    out = convert_checkpoint(fp8_hf, tmp_path / "dep", dtype="bf16")
    meta = json.loads((out / "config.json").read_text())["trtfalcon"]
    assert meta["quantization"]["quant_algo"] == "FP8" and meta["quantization"]["exclude_modules"] == []
    cfg = FalconH1Config.from_json_file(fp8_hf)
    hf, d = read_safetensors(fp8_hf), read_safetensors(out)
    a, s = cfg.attention_in_multiplier, cfg.ssm_in_multiplier
    p = "model.layers.1"
    # fp8 bytes unchanged, fused in order
    qkv = torch.cat([hf[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"]).view(torch.uint8)
    assert torch.equal(d["layers.1.attn.qkv_proj.weight"].view(torch.uint8), qkv)
    # weight_scale per row = HF per-tensor scale x every multiplier convert folds into W
    ws = d["layers.1.attn.qkv_proj.weight_scale"]
    assert ws.shape == (cfg.qkv_size,)
    assert torch.allclose(ws[: cfg.q_size], hf[f"{p}.self_attn.q_proj.weight_scale"] * a, rtol=1e-6)
    assert torch.allclose(ws[cfg.q_size: cfg.q_size + cfg.kv_size],
                          hf[f"{p}.self_attn.k_proj.weight_scale"] * a * cfg.key_multiplier, rtol=1e-6)
    mup = torch.cat([torch.full((n,), m) for n, m in zip(cfg.in_proj_splits, cfg.ssm_multipliers)])
    assert torch.allclose(d["layers.1.mamba.in_proj.weight_scale"], hf[f"{p}.mamba.in_proj.weight_scale"] * s * mup,
                          rtol=1e-6)
    g0, g1 = cfg.mlp_multipliers
    gu = d["layers.1.mlp.gate_up_proj.weight_scale"]
    assert torch.allclose(gu[: cfg.intermediate_size], hf[f"{p}.feed_forward.gate_proj.weight_scale"] * g0, rtol=1e-6)
    assert torch.allclose(gu[cfg.intermediate_size:], hf[f"{p}.feed_forward.up_proj.weight_scale"].expand(cfg.intermediate_size))
    assert torch.allclose(d["layers.1.mlp.down_proj.weight_scale"], hf[f"{p}.feed_forward.down_proj.weight_scale"] * g1)
    # input-side multipliers move into the input scale
    assert torch.isclose(d["layers.1.attn.qkv_proj.input_scale"], hf[f"{p}.self_attn.q_proj.input_scale"] / a)
    assert torch.isclose(d["layers.1.mamba.in_proj.input_scale"], hf[f"{p}.mamba.in_proj.input_scale"] / s)
    assert torch.equal(d["layers.1.mamba.out_proj.input_scale"], hf[f"{p}.mamba.out_proj.input_scale"])
    # conv1d, lm_head, embeddings and norms stay unquantized (deploy dtype), A_log/D/dt_bias fp32
    for k in ("layers.1.mamba.conv1d.weight", "lm_head.weight", "embed_tokens.weight", "final_layernorm.weight",
              "layers.1.input_layernorm.weight", "layers.1.mamba.norm.weight"):
        assert d[k].dtype == torch.bfloat16 and f"{k.removesuffix('.weight')}.weight_scale" not in d, k
    assert d["layers.1.mamba.A_log"].dtype == torch.float32
    # the converted checkpoint loads to exactly what the in-memory FP8 fold gives
    w_disk, w_mem = load_weights(out), load_weights(fp8_hf, "bf16")
    assert set(w_disk.tensors) == set(w_mem.tensors)
    for k in w_disk.tensors:
        assert torch.equal(w_disk[k].reshape(-1).view(torch.uint8), w_mem[k].reshape(-1).view(torch.uint8)), k


def test_torch_executor_equals_independent_fake_quant(fp8_hf, tok_hf, tmp_path):
    """Ragged prefill of 3 prompts on the FP8 deploy checkpoint vs transformers with fake-quantized Linears."""
    dep = convert_checkpoint(fp8_hf, tmp_path / "dep", dtype="fp32")
    w = load_weights(dep)
    ex = TorchExecutor(w, num_blocks=12, block_size=8, num_slots=3)
    prompts = [list(range(5, 22)), [7, 3, 9], list(range(40, 80, 3))]
    got = ex.execute(_prefill_batch(prompts, 4, 8))
    oracle = hf_fake_quant_model(tok_hf, fp8_hf)
    plain = hf_model(tok_hf)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            want = oracle(torch.tensor([p]), use_cache=False).logits[0, -1].float()
            unquant = plain(torch.tensor([p]), use_cache=False).logits[0, -1].float()
            err, fp8_effect = (got[b] - want).abs().max(), (unquant - want).abs().max()
            assert err <= 2e-3 * want.abs().max(), (b, err)
            assert fp8_effect > 20 * err, "FP8 must change the logits far more than the fold's rounding does"


def test_conservative_keeps_mamba_projections_dense(tok_hf, calib_jsonl, tmp_path):
    out = quantize_fp8(tok_hf, tmp_path / "c", calib_data=calib_jsonl, calib_size=2, calib_seq_len=16,
                       conservative=True, accuracy=False).out_dir
    t = read_safetensors(out)
    assert t["model.layers.0.mamba.in_proj.weight"].dtype == torch.float32
    assert t["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    dep = convert_checkpoint(out, tmp_path / "d", dtype="fp32")
    q = json.loads((dep / "config.json").read_text())["trtfalcon"]["quantization"]
    assert q["exclude_modules"] == sorted(f"layers.{i}.mamba.{x}_proj" for i in range(2) for x in ("in", "out"))
    w = load_weights(dep)
    assert w["layers.0.mamba.in_proj.weight"].dtype == torch.float32 and w.get("layers.0.mamba.in_proj.input_scale") is None


# ------------------------------------------------------------------------------------------------- bad inputs
def _without(src, dst, drop):
    shutil.copytree(src, dst)
    t = {k: v for k, v in read_safetensors(dst).items() if k != drop}
    (dst / "model.safetensors").unlink()
    save_file(t, dst / "model.safetensors")
    return dst


def test_missing_weight_scale_names_the_tensor_and_writes_nothing(fp8_hf, tmp_path):
    bad = _without(fp8_hf, tmp_path / "bad", "model.layers.1.mamba.in_proj.weight_scale")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mamba\.in_proj\.weight_scale' is missing"):
        convert_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    with pytest.raises(CheckpointError, match="in_proj.weight_scale"):
        load_weights(bad)


def test_missing_kv_scale_and_deploy_input_scale(fp8_kv_hf, fp8_hf, tmp_path):
    bad = _without(fp8_kv_hf, tmp_path / "bad", "model.layers.0.self_attn.v_proj.v_scale")
    with pytest.raises(CheckpointError, match=r"v_proj\.v_scale' is missing.*FP8 KV cache"):
        convert_checkpoint(bad, tmp_path / "out")
    dep = convert_checkpoint(fp8_hf, tmp_path / "dep", dtype="fp32")
    t = {k: v for k, v in read_safetensors(dep).items() if k != "layers.0.mlp.down_proj.input_scale"}
    save_file(t, dep / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"FP8 linear 'layers\.0\.mlp\.down_proj' has no "
                                              r"'layers\.0\.mlp\.down_proj\.input_scale'"):
        load_weights(dep)


def test_bad_scale_values_and_unsupported_quantization(fp8_hf, tmp_path):
    bad = tmp_path / "neg"
    shutil.copytree(fp8_hf, bad)
    t = read_safetensors(bad)
    t["model.layers.0.self_attn.o_proj.input_scale"] = torch.tensor(-1.0)
    save_file(t, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"o_proj\.input_scale' must be positive"):
        convert_checkpoint(bad, tmp_path / "o1")
    nv = tmp_path / "nvfp4"
    shutil.copytree(fp8_hf, nv)
    hq = json.loads((nv / "hf_quant_config.json").read_text())
    hq["quantization"]["quant_algo"] = "NVFP4"
    (nv / "hf_quant_config.json").write_text(json.dumps(hq))
    with pytest.raises(CheckpointError, match="quant_algo is 'NVFP4'; trtfalcon reads FP8"):
        convert_checkpoint(nv, tmp_path / "o2")


@pytest.mark.parametrize("content, match", [
    (b"\xff\xfe\x00binary", r"not UTF-8 text \(invalid byte at offset 0\)"),
    (b"", "no sample of at least 2 tokens"),
])
def test_calibration_text_that_does_not_tokenize(tok_hf, tmp_path, content, match):
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    with pytest.raises(CalibrationDataError, match=match):
        load_calibration(f, tok_hf, 256, num_samples=4, seq_len=16)


@pytest.mark.parametrize("line, match", [
    ('{"txt": "hello"}', r"calib\.jsonl:2: expected a string field 'text'"),
    ("not json", r"calib\.jsonl:2: not valid JSON"),
    ('{"input_ids": [1, 2, 999]}', "token id 999 outside the model's vocabulary"),
])
def test_calibration_jsonl_errors_name_the_line(tok_hf, tmp_path, line, match):
    f = tmp_path / "calib.jsonl"
    f.write_text('{"text": "the model reads a state"}\n' + line + "\n")
    with pytest.raises(CalibrationDataError, match=match):
        load_calibration(f, tok_hf, 256, num_samples=4, seq_len=16)


def test_text_without_tokenizer_and_pretokenized_jsonl(tiny_hf, tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("some text")
    with pytest.raises(CalibrationDataError, match="needs a tokenizer, but .* has none"):
        load_calibration(f, tiny_hf, 256, num_samples=4, seq_len=16)
    j = tmp_path / "c.jsonl"
    j.write_text("\n".join(json.dumps({"input_ids": list(range(i, i + 10))}) for i in range(6)))
    cs = load_calibration(j, tiny_hf, 256, num_samples=4, seq_len=8, holdout=2)
    assert len(cs.calib) == 4 and len(cs.holdout) == 2 and all(len(s) == 8 for s in cs.calib) and not cs.synthetic


def test_cli_quantize_bad_calibration_fails_cleanly(tok_hf, tmp_path):
    f = tmp_path / "calib.bin"
    f.write_bytes(bytes(range(256)) * 4)
    r = CliRunner().invoke(main, ["quantize", str(tok_hf), str(tmp_path / "out"), "--calib-data", str(f)])
    assert r.exit_code == 1 and "Traceback" not in r.output and "calib.bin: not UTF-8" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_cli_quantize_then_generate(tok_hf, calib_jsonl, tmp_path):
    out = tmp_path / "fp8"
    r = CliRunner().invoke(main, ["quantize", str(tok_hf), str(out), "--calib-data", str(calib_jsonl),
                                  "--calib-size", "4", "--calib-seq-len", "32", "--holdout", "2"])
    assert r.exit_code == 0, r.output
    assert "top-1 agreement" in r.output and "SYNTHETIC" not in r.output
    assert json.loads((out / "accuracy.json").read_text())["eval"]["samples"] == 2
    r = CliRunner().invoke(main, ["generate", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output.strip().splitlines()[-1])["token_ids"]) == 4


def test_fp8_kv_cache_from_quantize_through_convert_to_the_runtime(fp8_kv_hf, fp8_hf, tmp_path):
    """`quantize --kv-cache-dtype fp8` -> convert -> `generate --kv-cache-dtype fp8`: the ModelOpt k/v scales reach
    the FP8 KV pools; the pool holds fp8(k / k_scale); a checkpoint without them is refused, naming the tensor."""
    dep = convert_checkpoint(fp8_kv_hf, tmp_path / "dep", dtype="fp32")
    w = load_weights(dep)
    hf = load_weights(fp8_kv_hf, "fp32")
    assert torch.equal(w["layers.1.attn.v_scale"], hf["layers.1.attn.v_scale"])
    r = CliRunner().invoke(main, ["generate", str(dep), "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "4",
                                  "--kv-cache-dtype", "fp8", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output.strip().splitlines()[-1])["token_ids"]) == 4
    ex = TorchExecutor(w, num_blocks=4, block_size=4, num_slots=1, kv_dtype="fp8")
    ids = torch.tensor([7, 8, 9], dtype=torch.int32)
    ex.execute(StepBatch(ids, torch.arange(3, dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32),
                         torch.tensor([0], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                         torch.tensor([[2, 0, 1, 3]], dtype=torch.int32)))
    pool = ex.pools["kv_cache.0"]
    assert pool.dtype == torch.float8_e4m3fn and pool[:, 2, :3].float().abs().sum() > 0
    assert pool[:, [0, 1, 3]].float().abs().sum() == 0 and pool[:, 2, 3].float().abs().sum() == 0
    r = CliRunner().invoke(main, ["generate", str(fp8_hf), "--prompt-ids", "1,2,3", "--kv-cache-dtype", "fp8"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "no tensor 'layers.0.attn.k_scale'" in r.output, r.output


def test_cli_convert_fp8_and_help(fp8_hf, tmp_path):
    r = CliRunner().invoke(main, ["convert", str(fp8_hf), str(tmp_path / "dep"), "--dtype", "bf16"])
    assert r.exit_code == 0, r.output
    assert load_weights(tmp_path / "dep")["layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    for cmd in ("quantize", "build"):
        out = CliRunner().invoke(main, [cmd, "--help"]).output
        assert "Usage:" in out and "Example" in out, cmd


def test_demo_quantize_step(tmp_path):
    from trtfalcon.demo import DemoState, step_build, step_quantize, step_synth

    st = DemoState(tmp_path, 8, 4, compile_kernels=False)
    step_synth(st)
    msg = step_quantize(st)
    assert "calibrated on SYNTHETIC token ids" in msg and "top-1 agreement" in msg, msg
    assert json.loads((st.artifacts["FP8 accuracy report"]).read_text())["eval"]["synthetic"] is True
    assert step_build(st).startswith("skipped (--skip-kernels")


@pytest.mark.parametrize("variant", ["all_biases", "tied_embeddings", "mamba_head_ne_attn_head"])
def test_fp8_fold_on_config_variants(hf_checkpoints, variant, tmp_path):
    """Biases (folded with output-side multipliers only), tied embeddings (lm_head stays dense), mamba heads unlike
    attention heads: the FP8 deploy checkpoint still equals transformers with fake-quantized Linears."""
    src = hf_checkpoints(variant)
    fp8 = quantize_fp8(src, tmp_path / "fp8", calib_size=3, calib_seq_len=24, accuracy=False).out_dir
    w = load_weights(convert_checkpoint(fp8, tmp_path / "dep", dtype="fp32"))
    prompt = list(range(3, 30, 2))
    got = TorchExecutor(w, num_blocks=4, block_size=8, num_slots=1).execute(_prefill_batch([prompt], 4, 8))[0]
    with torch.no_grad():
        want = hf_fake_quant_model(src, fp8)(torch.tensor([prompt]), use_cache=False).logits[0, -1].float()
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()
