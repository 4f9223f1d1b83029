"""Build configs: every shipped YAML validates, every bad key is named, the planner's verdicts and numbers."""

import re
from pathlib import Path

import pytest
import yaml

from trtfalcon.config import preset
from trtfalcon.engine.config import (
    GiB, check_fits, contract_inputs, load_build_config, optimization_profile, parse_build_config, plan_memory,
)
from trtfalcon.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[2] / "build_configs").glob("*.yaml"))


def _cfg(**over):
    base = {"name": "t", "precision": {"weights": "fp8", "kv_cache": "bf16"},
            "runtime": {"max_batch_size": 64, "max_num_tokens": 8192, "max_seq_len": 33280, "kv_block_size": 64},
            "target": {"gpu": "H100"}, "workload": {"isl": 512, "osl": 32768}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def test_required_configs_ship_and_validate():
    names = {p.stem for p in CONFIGS}
    assert {"h200-fp8-b32-isl512-osl32k", "h200-fp8-b64-isl512-osl32k", "h100-fp8-fp8kv-b64-isl512-osl32k",
            "h200-bf16-b64-isl512-osl32k", "tiny-demo"} <= names
    for p in CONFIGS:
        bc = load_build_config(p)
        assert bc.name == p.stem
        assert plan_memory(bc).fits, p.name  # every shipped config fits its GPU


def test_h100_fp8_kv_batch64_fits_80gb_and_bf16_kv_does_not():
    bc = load_build_config(next(p for p in CONFIGS if p.stem == "h100-fp8-fp8kv-b64-isl512-osl32k"))
    plan = plan_memory(bc)
    assert plan.fits and plan.kv_cache_bytes == 64 * 33280 * 22 * 1024  # 22 KiB/token in FP8, 7B
    assert 60 * GiB < plan.required_bytes < 72 * GiB and plan.max_batch_that_fits >= 64
    bf16 = parse_build_config(_cfg(precision={"kv_cache": "bf16"}))
    with pytest.raises(ConfigError) as e:
        check_fits(bf16, source="h100-bf16kv")
    msg = str(e.value)
    assert "does not fit" in msg and "KV cache 89.38 GiB" in msg and "64 seq x 33,280 tokens x 44.0 KiB/token bf16" in msg
    assert "71.68 GiB usable" in msg and "FP8 KV cache halves" in msg
    assert 30 <= int(re.search(r"at most max_batch_size=(\d+) fits", msg).group(1)) < 64


def test_planner_numbers_for_the_7b():
    bc = parse_build_config(_cfg(precision={"weights": "bf16"}, target={"gpu": "H200"}))
    plan = plan_memory(bc, preset("7b"))
    assert abs(plan.weights_bytes / 1e9 - 15.17) < 0.05  # ~15.2 GB of bf16 weights (reference/falcon-h1.md)
    assert plan.state_bytes_per_seq == 44 * 24 * 128 * 256 * 4 + 44 * 3584 * 3 * 2  # 138 MB fp32 SSM + conv
    assert plan.num_kv_blocks == 64 * 520


@pytest.mark.parametrize("over, key", [
    ({"runtime": {"max_batch_sise": 8}}, "runtime.max_batch_sise: unknown key"),
    ({"precision": {"weights": "int4"}}, "precision.weights: Input should be 'fp8' or 'bf16'"),
    ({"target": {"gpu": "V100"}}, "target.gpu: expected one of H100, H200, B200, A100"),
    ({"target": {"archs": ["sm_80"]}}, "target: archs: sm_80: the TensorRT 11 path targets sm_90 or newer"),
    # TensorRT for RTX: its compute capabilities only, one per engine, the GPU's own; FP8 only where the GPU has it
    ({"target": {"gpu": "H100", "builder": "tensorrt-rtx"}},
     "target: archs: sm_90: TensorRT for RTX builds for sm_75, sm_80, sm_86, sm_89, sm_120, sm_121, not sm_90"),
    ({"target": {"gpu": "RTX4090", "archs": ["sm_89", "sm_120"]}},
     "target: archs: a TensorRT for RTX engine is built for one compute capability"),
    ({"target": {"gpu": "RTX4090", "archs": ["sm_120"]}}, "target: archs: sm_120 is not the RTX4090's compute "
                                                          "capability (sm_89)"),
    ({"target": {"gpu": "A100", "archs": ["sm_80"]}},
     "precision.weights fp8 needs FP8 tensor cores (sm_89 or newer); target.archs has sm_80 (A100): use bf16"),
    ({"target": {"builder": "tensorrt-llm"}}, "target.builder: Input should be 'tensorrt' or 'tensorrt-rtx'"),
    ({"runtime": {"kv_block_size": 48}}, "runtime.kv_block_size: must be a power of two"),
    ({"runtime": {"max_num_tokens": 16}}, "runtime.max_num_tokens (16) must be at least runtime.max_batch_size (64)"),
    ({"workload": {"osl": 65536}}, "runtime.max_seq_len (33280) must hold workload.isl + workload.osl"),
    ({"precision": {"weights": "bf16", "kv_cache": "fp8"}}, "precision.kv_cache fp8 needs k/v scales"),
    ({"profile": {"opt_num_seqs": 100}}, "profile.opt_num_seqs (100) exceeds runtime.max_batch_size (64)"),
    ({"bogus": 1}, "bogus: unknown key"),
])
def test_bad_config_names_the_key(over, key):
    with pytest.raises(ConfigError) as e:
        parse_build_config(_cfg(**over), "bad.yaml")
    assert str(e.value).startswith("bad.yaml: ") and key in str(e.value), str(e.value)


def test_every_bad_key_is_reported_at_once(tmp_path):
    raw = _cfg(runtime={"max_batch_size": 0, "kv_blok_size": 64}, target={"memory_utilization": 1.5})
    del raw["name"]
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_build_config(f)
    msg = str(e.value)
    for key in ("name: required key is missing", "runtime.max_batch_size", "runtime.kv_blok_size: unknown key",
                "target.memory_utilization"):
        assert key in msg, msg
    f.write_text("runtime: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_build_config(f)


def test_optimization_profile_covers_the_contract():
    bc = load_build_config(next(p for p in CONFIGS if p.stem == "tiny-demo"))
    cfg = preset("tiny")
    prof = optimization_profile(bc, contract_inputs(cfg))
    assert prof["input_ids"] == ((1,), (8,), (128,))
    assert prof["cu_seqlens"] == ((2,), (9,), (9,))
    assert prof["block_tables"] == ((1, 1), (8, 16), (8, 16))
    assert prof["kv_cache.0"] == ((2, 1, 16, 2, 16), (2, 128, 16, 2, 16), (2, 128, 16, 2, 16))
    assert prof["ssm_state.1"][2] == (8, cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state)
    with pytest.raises(ConfigError, match="symbolic dimension 'weird'"):
        optimization_profile(bc, {"x": ["weird"]})


def test_rtx_target_defaults_to_its_gpus_compute_capability():
    bc = parse_build_config(_cfg(target={"gpu": "RTX5090"}))
    assert bc.target.builder_name == "tensorrt-rtx" and bc.target.archs == ["sm_120"]
    assert parse_build_config(_cfg(target={"gpu": "H200"})).target.archs == ["sm_90"]  # unchanged for TensorRT 11
