import json
import math

import pytest

from trtfalcon.checkpoint.hf import hf_tensor_shapes
from trtfalcon.config import PRESETS, FalconH1Config, preset, preset_dict
from trtfalcon.errors import ConfigError
from helpers import VARIANTS, variant_config


def test_7b_derived_sizes_match_the_published_shapes():
    cfg = preset("7b")
    assert cfg.in_proj_size == 6680 and cfg.conv_dim == 3584
    assert cfg.kv_cache_bytes_per_token("bf16") == 44 * 1024
    assert cfg.kv_cache_bytes_per_token("fp8") == 22 * 1024
    assert cfg.ssm_state_elements_per_seq() == 44 * 24 * 128 * 256  # 34.6 M
    assert cfg.conv_state_elements_per_seq() == 44 * 3584 * 3
    shapes = hf_tensor_shapes(cfg)
    assert len(shapes) == 751  # 17 per layer + embed + final norm + lm_head
    assert shapes["model.layers.0.mamba.in_proj.weight"] == (6680, 3072)
    assert shapes["model.layers.0.mamba.conv1d.weight"] == (3584, 1, 4)
    assert cfg.head_dim * cfg.num_attention_heads == 1536 != cfg.hidden_size
    assert cfg.mamba_n_heads == 24 and cfg.mamba_d_head == 128  # never from the attention head_dim
    assert 15.0e9 < sum(math.prod(s) for s in shapes.values()) * 2 < 15.4e9  # ~15.2 GB in bf16


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses_and_round_trips(name):
    cfg = preset(name)
    again = FalconH1Config.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert again == cfg


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_our_config_agrees_with_transformers(name):
    from transformers import FalconH1Config as HFConfig

    d = variant_config(name)
    ours = FalconH1Config.from_hf_dict(d)
    hf = HFConfig(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    assert ours.head_dim == getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
    assert ours.mamba_d_head == hf.mamba_d_head and ours.mamba_d_ssm == hf.mamba_d_ssm
    assert tuple(ours.time_step_limit) == tuple(hf.time_step_limit)
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]


def test_missing_head_dim_derives_from_hidden_size():
    d = preset_dict("tiny")
    d.pop("head_dim")
    assert FalconH1Config.from_hf_dict(d).head_dim == d["hidden_size"] // d["num_attention_heads"]


def test_absent_fields_take_transformers_defaults():
    from transformers import FalconH1Config as HFConfig

    d = preset_dict("tiny")
    for k in ("mamba_d_ssm", "mamba_d_head", "eos_token_id", "bos_token_id", "pad_token_id"):
        d.pop(k)
    d["mamba_n_heads"] = 8
    ours = FalconH1Config.from_hf_dict(d)
    hf = HFConfig(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    assert ours.mamba_d_ssm == hf.mamba_d_ssm == 1024 and ours.mamba_d_head == hf.mamba_d_head == 128
    assert ours.eos_token_id == (hf.eos_token_id,) and ours.bos_token_id == hf.bos_token_id
    assert ours.pad_token_id == hf.pad_token_id


def test_mamba_d_head_auto_and_expand():
    d = preset_dict("tiny")
    d["mamba_d_ssm"] = None  # explicit null: mamba_expand * hidden_size
    d["mamba_expand"] = 2
    d["mamba_d_head"] = "auto"
    cfg = FalconH1Config.from_hf_dict(d)
    assert cfg.mamba_d_ssm == 128 and cfg.mamba_d_head == 128 // d["mamba_n_heads"]


@pytest.mark.parametrize(
    "override, field, found",
    [
        ({"model_type": "llama"}, "model_type", "llama"),
        ({"hidden_act": "gelu"}, "hidden_act", "gelu"),
        ({"num_key_value_heads": 3}, "num_key_value_heads", "3"),
        ({"mamba_n_groups": 3}, "mamba_n_groups", "3"),
        ({"mamba_d_head": 5}, "mamba_d_head", "5"),
        ({"hidden_size": -64}, "hidden_size", "-64"),
        ({"hidden_size": "64"}, "hidden_size", "'64'"),
        ({"time_step_limit": [0.5, 0.1]}, "time_step_limit", "[0.5, 0.1]"),
        ({"mlp_multipliers": [1.0]}, "mlp_multipliers", "[1.0]"),
        ({"ssm_multipliers": [1, 1, 1, 1, "x"]}, "ssm_multipliers", "'x'"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings", "'yes'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type", "yarn"),
        ({"head_dim": 15}, "head_dim", "15"),
        ({"eos_token_id": 100000}, "eos_token_id", "100000"),
    ],
)
def test_invalid_config_names_field_expected_and_found(override, field, found):
    d = {**preset_dict("tiny"), **override}
    with pytest.raises(ConfigError) as e:
        FalconH1Config.from_hf_dict(d, source="x/config.json")
    msg = str(e.value)
    assert "x/config.json" in msg and field in msg and "expected" in msg and found in msg


def test_missing_required_field():
    d = preset_dict("tiny")
    del d["vocab_size"]
    with pytest.raises(ConfigError, match="'vocab_size' is missing"):
        FalconH1Config.from_hf_dict(d)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        FalconH1Config.from_json_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        FalconH1Config.from_json_file(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        FalconH1Config.from_json_file(tmp_path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
