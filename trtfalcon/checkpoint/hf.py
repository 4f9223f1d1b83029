"""The Hugging Face Falcon-H1 checkpoint format: tensor names and shapes, as transformers' FalconH1ForCausalLM
saves them (`modeling_falcon_h1.py`), and the quantization a checkpoint declares (ModelOpt's unified HF format).
One place knows these names; synth writes them and convert reads them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trtfalcon.checkpoint.safetensors_io import SafetensorsReader
from trtfalcon.config import FalconH1Config
from trtfalcon.errors import CheckpointError


def hf_layer_shapes(cfg: FalconH1Config, i: int) -> dict[str, tuple[int, ...]]:
    h, p = cfg.hidden_size, f"model.layers.{i}"
    s: dict[str, tuple[int, ...]] = {
        f"{p}.input_layernorm.weight": (h,),
        f"{p}.pre_ff_layernorm.weight": (h,),
        f"{p}.self_attn.q_proj.weight": (cfg.q_size, h),
        f"{p}.self_attn.k_proj.weight": (cfg.kv_size, h),
        f"{p}.self_attn.v_proj.weight": (cfg.kv_size, h),
        f"{p}.self_attn.o_proj.weight": (h, cfg.q_size),
        f"{p}.mamba.in_proj.weight": (cfg.in_proj_size, h),
        f"{p}.mamba.conv1d.weight": (cfg.conv_dim, 1, cfg.mamba_d_conv),
        f"{p}.mamba.dt_bias": (cfg.mamba_n_heads,),
        f"{p}.mamba.A_log": (cfg.mamba_n_heads,),
        f"{p}.mamba.D": (cfg.mamba_n_heads,),
        f"{p}.mamba.out_proj.weight": (h, cfg.mamba_d_ssm),
        f"{p}.feed_forward.gate_proj.weight": (cfg.intermediate_size, h),
        f"{p}.feed_forward.up_proj.weight": (cfg.intermediate_size, h),
        f"{p}.feed_forward.down_proj.weight": (h, cfg.intermediate_size),
    }
    if cfg.attention_bias:
        s.update({
            f"{p}.self_attn.q_proj.bias": (cfg.q_size,), f"{p}.self_attn.k_proj.bias": (cfg.kv_size,),
            f"{p}.self_attn.v_proj.bias": (cfg.kv_size,), f"{p}.self_attn.o_proj.bias": (h,),
        })
    if cfg.mamba_proj_bias:
        s[f"{p}.mamba.in_proj.bias"] = (cfg.in_proj_size,)
    if cfg.mamba_conv_bias:
        s[f"{p}.mamba.conv1d.bias"] = (cfg.conv_dim,)
    if cfg.mamba_rms_norm:
        s[f"{p}.mamba.norm.weight"] = (cfg.mamba_d_ssm,)
    if cfg.projectors_bias:
        s[f"{p}.mamba.out_proj.bias"] = (h,)
    if cfg.mlp_bias:
        s.update({
            f"{p}.feed_forward.gate_proj.bias": (cfg.intermediate_size,),
            f"{p}.feed_forward.up_proj.bias": (cfg.intermediate_size,),
            f"{p}.feed_forward.down_proj.bias": (h,),
        })
    return s


def hf_tensor_shapes(cfg: FalconH1Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF Falcon-H1 checkpoint, in a streaming-friendly order (embeddings, layers, head)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_hidden_layers):
        shapes.update(hf_layer_shapes(cfg, i))
    shapes["model.final_layernorm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


class HFCheckpoint:
    """A Hugging Face Falcon-H1 checkpoint directory: validated config + lazily read, validated tensors."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.config = FalconH1Config.from_json_file(self.directory / "config.json")
        self.reader = SafetensorsReader(self.directory)
        self.reader.check_index()

    def validate(self) -> None:
        """Every expected tensor present with its shape; fails before any output is written."""
        expected = hf_tensor_shapes(self.config)
        for name, shape in expected.items():
            info = self.reader.info(name)
            if info.shape != shape:
                raise CheckpointError(
                    f"{info.file}: tensor '{name}' has shape {list(info.shape)}, expected {list(shape)} "
                    f"from {self.config.source}"
                )
            if not info.dtype.is_floating_point:
                raise CheckpointError(f"{info.file}: tensor '{name}' has dtype {info.dtype}, expected a float type")
        unexpected = sorted(set(self.reader.tensors) - set(expected))
        # A tied checkpoint may still carry lm_head.weight; anything else unknown means a different architecture.
        unexpected = [n for n in unexpected if n != "lm_head.weight"]
        if unexpected:
            raise CheckpointError(
                f"{self.directory}: unexpected tensors for this config ({', '.join(unexpected[:5])}"
                f"{' ...' if len(unexpected) > 5 else ''}); is config.json from this checkpoint?"
            )


# ------------------------------------------------------------------------------------------------------------------
# Quantized HF checkpoints: what `trtfalcon quantize` and ModelOpt's export_hf_checkpoint write, and what vLLM /
# SGLang / TensorRT-LLM read: hf_quant_config.json, and config.json["quantization_config"] (quant_method "modelopt").

HF_QUANT_CONFIG = "hf_quant_config.json"


@dataclass(frozen=True)
class HFQuantConfig:
    quant_algo: str | None  # as declared ("FP8", "NVFP4", ...): convert.py chooses the planner by it
    kv_cache_fp8: bool
    exclude_modules: tuple[str, ...]
    source: str  # where it was read, for messages


def is_quantized_hf_checkpoint(directory: str | Path) -> bool:
    """An HF checkpoint that declares a quantization (hf_quant_config.json or config.json quantization_config)."""
    d = Path(directory)
    if (d / HF_QUANT_CONFIG).is_file():
        return True
    try:
        raw = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("quantization_config"), dict)


def read_quant_config(directory: str | Path) -> HFQuantConfig:
    """ModelOpt's hf_quant_config.json, else config.json["quantization_config"] (quant_method "modelopt"); the KV
    cache is FP8 or not quantized. Which quant_algo trtfalcon reads is convert.py's planner table."""
    d = Path(directory)
    path = d / HF_QUANT_CONFIG
    if path.is_file():
        try:
            q = json.loads(path.read_text())["quantization"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: expected {{\"quantization\": {{\"quant_algo\": ...}}}} ({e})") from e
        algo, kv, exclude = q.get("quant_algo"), q.get("kv_cache_quant_algo"), q.get("exclude_modules") or []
        where = str(path)
    else:
        where = f"{d / 'config.json'}: quantization_config"
        q = json.loads((d / "config.json").read_text())["quantization_config"]
        method = q.get("quant_method")
        if method != "modelopt":
            raise CheckpointError(
                f"{where}.quant_method is {method!r}; trtfalcon reads ModelOpt FP8 checkpoints (quant_method "
                "'modelopt', as `trtfalcon quantize` and ModelOpt's export_hf_checkpoint write them)"
            )
        algo, exclude = q.get("quant_algo"), q.get("ignore") or q.get("exclude_modules") or []
        kv = q.get("kv_cache_quant_algo") or ("FP8" if q.get("kv_cache_scheme") else None)
    if kv not in (None, "FP8"):
        raise CheckpointError(f"{where}: kv_cache_quant_algo is {kv!r}; expected 'FP8' or null")
    return HFQuantConfig(algo, kv == "FP8", tuple(exclude), where)
