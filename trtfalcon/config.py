"""The one validated Falcon-H1 config: parsed once from Hugging Face config.json, every derived size computed here.

Everything else in trtfalcon (converter, model, kernels, runtime, export, build configs) reads sizes from
`FalconH1Config`, never from the raw JSON. Field names follow transformers' `FalconH1Config` so that a reader can
check each one against `configuration_falcon_h1.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from trtfalcon.dtypes import lookup
from trtfalcon.errors import ConfigError

# Bumped whenever the deploy checkpoint's tensor layout changes; readers refuse other versions.
DEPLOY_FORMAT_VERSION = 1


@dataclass(frozen=True)
class FalconH1Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # attention head size; NOT hidden_size // heads for the 7B (12 x 128 = 1536 != 3072)
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    projectors_bias: bool  # Mamba out_proj bias (transformers' name)
    mamba_d_ssm: int
    mamba_n_heads: int
    mamba_d_head: int  # Mamba head size P; independent of the attention head_dim
    mamba_n_groups: int
    mamba_d_state: int
    mamba_d_conv: int
    mamba_chunk_size: int
    mamba_conv_bias: bool
    mamba_proj_bias: bool  # Mamba in_proj bias
    mamba_rms_norm: bool
    mamba_norm_before_gate: bool
    time_step_limit: tuple[float, float]
    # muP multipliers; all 1.0 in a deploy checkpoint, where they are folded into the weights.
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    key_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    mlp_multipliers: tuple[float, float] = (1.0, 1.0)
    ssm_multipliers: tuple[float, float, float, float, float] = (1.0, 1.0, 1.0, 1.0, 1.0)
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Where the numbers came from, for error messages.
    source: str = field(default="<dict>", compare=False)

    # ---- derived sizes (the only place they are computed) ----
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def gqa_group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def ssm_group_state_size(self) -> int:
        """G * N: the width of each of B and C."""
        return self.mamba_n_groups * self.mamba_d_state

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: xBC = [x | B | C]."""
        return self.mamba_d_ssm + 2 * self.ssm_group_state_size

    @property
    def in_proj_size(self) -> int:
        """in_proj output = [z | x | B | C | dt]."""
        return self.mamba_d_ssm + self.conv_dim + self.mamba_n_heads

    @property
    def in_proj_splits(self) -> tuple[int, int, int, int, int]:
        gn = self.ssm_group_state_size
        return (self.mamba_d_ssm, self.mamba_d_ssm, gn, gn, self.mamba_n_heads)

    @property
    def mamba_heads_per_group(self) -> int:
        return self.mamba_n_heads // self.mamba_n_groups

    @property
    def conv_state_len(self) -> int:
        """Past inputs per channel the conv keeps between steps (d_conv - 1)."""
        return self.mamba_d_conv - 1

    @property
    def has_multipliers(self) -> bool:
        ones = (
            self.embedding_multiplier, self.lm_head_multiplier, self.key_multiplier, self.attention_in_multiplier,
            self.attention_out_multiplier, self.ssm_in_multiplier, self.ssm_out_multiplier,
            *self.mlp_multipliers, *self.ssm_multipliers,
        )
        return any(m != 1.0 for m in ones)

    def kv_cache_bytes_per_token(self, dtype: str = "bf16") -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_hidden_layers * self.kv_size * lookup(dtype).itemsize

    def conv_state_elements_per_seq(self) -> int:
        return self.num_hidden_layers * self.conv_dim * self.conv_state_len

    def ssm_state_elements_per_seq(self) -> int:
        return self.num_hidden_layers * self.mamba_n_heads * self.mamba_d_head * self.mamba_d_state

    def state_bytes_per_seq(self, ssm_dtype: str = "fp32", conv_dtype: str = "bf16") -> int:
        """Mamba state one sequence holds for its whole life, independent of its length."""
        return (
            self.ssm_state_elements_per_seq() * lookup(ssm_dtype, what="ssm_dtype").itemsize
            + self.conv_state_elements_per_seq() * lookup(conv_dtype, what="conv_dtype").itemsize
        )

    def num_parameters(self) -> int:
        h, layers = self.hidden_size, self.num_hidden_layers
        per_layer = (
            h * self.qkv_size + self.q_size * h  # attention
            + h * self.in_proj_size + self.conv_dim * self.mamba_d_conv + self.mamba_d_ssm * h  # mamba
            + 3 * h * self.intermediate_size  # mlp
        )
        heads = 1 if self.tie_word_embeddings else 2
        return layers * per_layer + heads * self.vocab_size * h

    # ---- (de)serialization ----
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> FalconH1Config:
        return _parse(raw, source)

    @classmethod
    def from_json_file(cls, path: str | Path) -> FalconH1Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json found (expected a Hugging Face Falcon-H1 checkpoint directory)")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        return _parse(raw, str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' FalconH1Config reads back to the same model."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("source", "rope_theta")}
        d["time_step_limit"] = list(self.time_step_limit)
        d["mlp_multipliers"] = list(self.mlp_multipliers)
        d["ssm_multipliers"] = list(self.ssm_multipliers)
        eos = list(self.eos_token_id)
        d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d.update(model_type="falcon_h1", architectures=["FalconH1ForCausalLM"], hidden_act="silu")
        return d

    def without_multipliers(self) -> FalconH1Config:
        """The config of a deploy checkpoint: multipliers folded into the weights, embeddings untied."""
        import dataclasses

        return dataclasses.replace(
            self, embedding_multiplier=1.0, lm_head_multiplier=1.0, key_multiplier=1.0, attention_in_multiplier=1.0,
            attention_out_multiplier=1.0, ssm_in_multiplier=1.0, ssm_out_multiplier=1.0, mlp_multipliers=(1.0, 1.0),
            ssm_multipliers=(1.0,) * 5, tie_word_embeddings=False,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "layers": self.num_hidden_layers, "hidden": self.hidden_size, "vocab": self.vocab_size,
            "attn_heads": f"{self.num_attention_heads}/{self.num_key_value_heads} x {self.head_dim}",
            "mamba_heads": f"{self.mamba_n_heads} x {self.mamba_d_head}", "d_state": self.mamba_d_state,
            "groups": self.mamba_n_groups, "params": self.num_parameters(),
            "kv_bytes_per_token_bf16": self.kv_cache_bytes_per_token("bf16"),
            "state_bytes_per_seq": self.state_bytes_per_seq(),
        }

    def asdict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Parsing and validation


def _decode_special_floats(value: Any) -> Any:
    """transformers 5 writes non-finite floats as {"__float__": "Infinity"} (JSON has no inf); older files use the
    bare `Infinity` token, which json.loads already reads."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and isinstance(value["__float__"], str):
            try:
                return float(value["__float__"])
            except ValueError:
                return value
        return {k: _decode_special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_special_floats(v) for v in value]
    return value


def _parse(raw: dict[str, Any], source: str) -> FalconH1Config:
    raw = _decode_special_floats(raw)

    def err(key: str, expected: str, found: Any) -> ConfigError:
        return ConfigError(f"{source}: field '{key}': expected {expected}, found {found!r}")

    def get(key: str, default: Any = ..., *, required: bool = False) -> Any:
        if key in raw and raw[key] is not None:
            return raw[key]
        if required or default is ...:
            raise ConfigError(f"{source}: required field '{key}' is missing")
        return default

    def pos_int(key: str, default: Any = ...) -> int:
        v = get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise err(key, "a positive integer", v)
        return v

    def flag(key: str, default: bool) -> bool:
        v = get(key, default)
        if not isinstance(v, bool):
            raise err(key, "true or false", v)
        return v

    def num(key: str, default: float = 1.0) -> float:
        v = get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise err(key, "a finite number", v)
        return float(v)

    def num_list(key: str, n: int) -> tuple[float, ...]:
        v = get(key, [1.0] * n)
        if not isinstance(v, (list, tuple)) or len(v) != n:
            raise err(key, f"a list of {n} numbers", v)
        for x in v:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise err(key, f"a list of {n} finite numbers", v)
        return tuple(float(x) for x in v)

    model_type = raw.get("model_type")
    if model_type != "falcon_h1":
        raise err("model_type", "'falcon_h1'", model_type)
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise err("hidden_act", "'silu' (the only activation Falcon-H1 uses)", act)

    hidden = pos_int("hidden_size")
    heads = pos_int("num_attention_heads")
    kv_heads = pos_int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise err("num_key_value_heads", f"a divisor of num_attention_heads={heads}", kv_heads)
    # transformers: getattr(config, "head_dim", hidden_size // num_attention_heads)
    if raw.get("head_dim") is None and hidden % heads:
        raise err("head_dim", f"present, since hidden_size={hidden} is not a multiple of num_attention_heads={heads}", None)
    head_dim = pos_int("head_dim", hidden // heads)
    if head_dim % 2:
        raise err("head_dim", "an even number (RoPE rotates pairs)", head_dim)

    # transformers: an absent mamba_d_ssm means its default 1024; an explicit null means mamba_expand * hidden.
    if "mamba_d_ssm" not in raw:
        d_ssm = 1024
    elif raw["mamba_d_ssm"] is None:
        d_ssm = int(num("mamba_expand", 2) * hidden)
    else:
        d_ssm = pos_int("mamba_d_ssm")
    m_heads = pos_int("mamba_n_heads")
    d_head = raw.get("mamba_d_head", "auto")
    if d_head == "auto" or d_head is None:
        if d_ssm % m_heads:
            raise err("mamba_n_heads", f"a divisor of mamba_d_ssm={d_ssm}", m_heads)
        d_head = d_ssm // m_heads
    else:
        d_head = pos_int("mamba_d_head")
    if d_head * m_heads != d_ssm:
        raise err("mamba_d_head", f"mamba_d_ssm / mamba_n_heads = {d_ssm}/{m_heads}", d_head)
    groups = pos_int("mamba_n_groups", 1)
    if m_heads % groups:
        raise err("mamba_n_groups", f"a divisor of mamba_n_heads={m_heads}", groups)

    tsl = raw.get("time_step_limit", (0.0, float("inf")))
    if tsl is None:
        tsl = (0.0, float("inf"))
    if (
        not isinstance(tsl, (list, tuple)) or len(tsl) != 2
        or any(isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) for x in tsl)
        or not 0.0 <= tsl[0] <= tsl[1]
    ):
        raise err("time_step_limit", "[lo, hi] with 0 <= lo <= hi", tsl)

    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise err("rope_parameters", "an object", rope)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise err("rope_parameters.rope_type", "'default' (other RoPE scalings are not supported yet)", rope_type)
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise err("rope_theta", "a positive number", theta)

    eos = raw.get("eos_token_id", 2)  # transformers' FalconH1Config defaults: bos 1, eos 2, pad 0
    eos_ids: tuple[int, ...]
    if eos is None:
        eos_ids = ()
    elif isinstance(eos, int) and not isinstance(eos, bool):
        eos_ids = (eos,)
    elif isinstance(eos, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        eos_ids = tuple(eos)
    else:
        raise err("eos_token_id", "an integer or a list of integers", eos)

    vocab = pos_int("vocab_size")
    for key in ("bos_token_id", "pad_token_id"):
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise err(key, "an integer or null", v)
    for e in eos_ids:
        if not 0 <= e < vocab:
            raise err("eos_token_id", f"ids in [0, vocab_size={vocab})", eos)

    d_conv = pos_int("mamba_d_conv", 4)
    if d_conv < 2:
        raise err("mamba_d_conv", "at least 2", d_conv)

    return FalconH1Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=pos_int("intermediate_size"),
        num_hidden_layers=pos_int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=num("rms_norm_eps", 1e-5),
        max_position_embeddings=pos_int("max_position_embeddings", 8192),
        rope_theta=float(theta),
        tie_word_embeddings=flag("tie_word_embeddings", False),
        attention_bias=flag("attention_bias", False),
        mlp_bias=flag("mlp_bias", False),
        projectors_bias=flag("projectors_bias", False),
        mamba_d_ssm=d_ssm,
        mamba_n_heads=m_heads,
        mamba_d_head=d_head,
        mamba_n_groups=groups,
        mamba_d_state=pos_int("mamba_d_state", 256),
        mamba_d_conv=d_conv,
        mamba_chunk_size=pos_int("mamba_chunk_size", 256),
        mamba_conv_bias=flag("mamba_conv_bias", True),
        mamba_proj_bias=flag("mamba_proj_bias", False),
        mamba_rms_norm=flag("mamba_rms_norm", False),
        mamba_norm_before_gate=flag("mamba_norm_before_gate", True),
        time_step_limit=(float(tsl[0]), float(tsl[1])),
        embedding_multiplier=num("embedding_multiplier"),
        lm_head_multiplier=num("lm_head_multiplier"),
        key_multiplier=num("key_multiplier"),
        attention_in_multiplier=num("attention_in_multiplier"),
        attention_out_multiplier=num("attention_out_multiplier"),
        ssm_in_multiplier=num("ssm_in_multiplier"),
        ssm_out_multiplier=num("ssm_out_multiplier"),
        mlp_multipliers=num_list("mlp_multipliers", 2),  # type: ignore[arg-type]
        ssm_multipliers=num_list("ssm_multipliers", 5),  # type: ignore[arg-type]
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_id=eos_ids,
        pad_token_id=raw.get("pad_token_id", 0),
        source=source,
    )


# --------------------------------------------------------------------------------------------------------------
# Presets: the real family's shapes (../shared/reference/falcon-h1.md) as config.json dicts, plus `tiny` for tests.
# The 7B's multipliers are the published ones; the other sizes reuse them (their own values are not needed to
# exercise shapes, and synthetic checkpoints have random weights anyway).

_MULTIPLIERS_7B: dict[str, Any] = {
    "embedding_multiplier": 5.656854249492381,
    "lm_head_multiplier": 0.013020833333333334,
    "key_multiplier": 0.030690398488999456,
    "attention_in_multiplier": 1.0,
    "attention_out_multiplier": 0.10416666666666667,
    "ssm_in_multiplier": 0.4166666666666667,
    "ssm_out_multiplier": 0.11785113019775793,
    "mlp_multipliers": [0.2946278254943948, 0.032552083333333336],
    "ssm_multipliers": [0.3535533905932738, 0.25, 0.1767766952966369, 0.5, 0.3535533905932738],
}

_COMMON: dict[str, Any] = {
    "model_type": "falcon_h1",
    "architectures": ["FalconH1ForCausalLM"],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "mamba_d_conv": 4,
    "mamba_n_groups": 1,
    "mamba_d_state": 256,
    "mamba_chunk_size": 256,
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
    "mamba_rms_norm": True,
    "mamba_norm_before_gate": False,
    "attention_bias": False,
    "mlp_bias": False,
    "projectors_bias": False,
    "tie_word_embeddings": False,
    "time_step_limit": [0.0, float("inf")],
    "max_position_embeddings": 262144,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e11},
    "bos_token_id": 1,
    "eos_token_id": 11,
    "pad_token_id": 0,
    **_MULTIPLIERS_7B,
}


def _preset(**over: Any) -> dict[str, Any]:
    return {**_COMMON, **over}


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _preset(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2,
        mamba_d_state=16, mamba_chunk_size=8, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=2,
    ),
    "0.5b": _preset(
        vocab_size=32784, hidden_size=1024, intermediate_size=2048, num_hidden_layers=36, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64, mamba_d_state=128,
        mamba_chunk_size=128, mamba_rms_norm=False, max_position_embeddings=16384,
    ),
    "1.5b": _preset(
        vocab_size=65537, hidden_size=2048, intermediate_size=4608, num_hidden_layers=24, num_attention_heads=8,
        num_key_value_heads=2, head_dim=128, mamba_d_ssm=3072, mamba_n_heads=48, mamba_d_head=64,
    ),
    "1.5b-deep": _preset(
        vocab_size=65537, hidden_size=1280, intermediate_size=3072, num_hidden_layers=66, num_attention_heads=6,
        num_key_value_heads=2, head_dim=128, mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64,
    ),
    "3b": _preset(
        vocab_size=65537, hidden_size=2560, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=10,
        num_key_value_heads=2, head_dim=128, mamba_d_ssm=4096, mamba_n_heads=32, mamba_d_head=128,
    ),
    "7b": _preset(
        vocab_size=130048, hidden_size=3072, intermediate_size=12288, num_hidden_layers=44, num_attention_heads=12,
        num_key_value_heads=2, head_dim=128, mamba_d_ssm=3072, mamba_n_heads=24, mamba_d_head=128,
    ),
    "34b": _preset(
        vocab_size=261120, hidden_size=5120, intermediate_size=21504, num_hidden_layers=72, num_attention_heads=20,
        num_key_value_heads=4, head_dim=128, mamba_d_ssm=4096, mamba_n_heads=32, mamba_d_head=128, mamba_n_groups=2,
    ),
}


def preset(name: str) -> FalconH1Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return FalconH1Config.from_hf_dict(PRESETS[name], source=f"preset:{name}")


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[name]))
