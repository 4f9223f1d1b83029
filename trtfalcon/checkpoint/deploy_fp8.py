"""FP8 (E4M3) in a deploy checkpoint: the one definition the converter, the torch executor (fake-quantized),
the ONNX exporter (explicit Q/DQ) and the TensorRT build share. The rest of the deploy format is deploy.py; this
file adds what FP8 adds to it. (ModelOpt calibration, which writes FP8 *HF* checkpoints, is trtfalcon/quantize/.)

Deploy tensors of each quantized linear X (the fused names of a deploy checkpoint, QUANTIZED_LINEARS):
    X.weight        float8_e4m3fn (rows, cols)      = round(W / weight_scale[row])
    X.weight_scale  fp32 (rows,)                    per output row: a fused tensor (qkv, gate_up) keeps each
                                                    source's per-tensor scale on its own rows, so fusing is exact
    X.input_scale   fp32 ()                         per-tensor activation scale of X's input, as the deploy graph
                                                    feeds it (after folding: the HF scale / the folded input
                                                    multiplier); q/k/v and gate/up share one (the max)
FP8 KV cache: layers.{i}.attn.k_scale, layers.{i}.attn.v_scale fp32 () : cache = fp8(k / k_scale).
config.json: "trtfalcon": {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" | null,
                                            "exclude_modules": [...]}}
Everything else (embeddings, norms, Mamba conv1d, A_log/D/dt_bias, lm_head) stays in the deploy dtype.

Semantics (what TensorRT's explicit quantization computes, and what the torch executor fakes):
    y = (fake_quant(x, input_scale)) @ (weight.float() * weight_scale[:, None]).T + bias
    fake_quant(x, s) = fp8_e4m3(clamp(x / s, -448, 448)).float() * s      (round to nearest even, saturate)
"""

from __future__ import annotations

import torch

from trtfalcon.errors import ConfigError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value; scale = amax / FP8_MAX

# The linears of one layer that FP8 quantizes (deploy names, without "layers.{i}." and ".weight").
QUANTIZED_LINEARS = ("attn.qkv_proj", "attn.o_proj", "mamba.in_proj", "mamba.out_proj", "mlp.gate_up_proj",
                     "mlp.down_proj")


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to E4M3's range, cast to float8_e4m3fn (scale broadcasts: scalar or per row)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize: the value an FP8 GEMM sees, in x's dtype."""
    return (quantize_fp8(x, scale).float() * scale).to(x.dtype)


def dequantize_weight(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(rows, cols) fp8 and (rows,) or () scales -> (rows, cols) in dtype."""
    scale = weight_scale.float()
    if scale.dim() == 1:
        scale = scale[:, None]
    return (weight.float() * scale).to(dtype)


def weight_scale_per_tensor(w: torch.Tensor) -> torch.Tensor:
    """ModelOpt's "max" calibration for a weight: amax / 448 (at least a tiny positive number)."""
    return (w.float().abs().max() / FP8_MAX).clamp(min=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Which deploy tensors FP8 adds or retypes (read by the deploy loader and written by the FP8 converter, so that
# both agree on one list). Extension of the format above; nothing in it changes the semantics.
#
# config.json "trtfalcon.quantization.exclude_modules" lists deploy linears ("layers.3.mamba.in_proj") that stay
# in the deploy dtype although QUANTIZED_LINEARS names them: a conservative calibration (ModelOpt config that keeps
# the Mamba projections in bf16) or a fused linear whose HF sources were not all quantized. Embeddings, norms,
# conv1d, A_log/D/dt_bias and lm_head are never quantized and are never listed.

KV_SCALES = ("attn.k_scale", "attn.v_scale")


def quantization_meta(kv_cache_fp8: bool, exclude_modules: list[str] | tuple[str, ...] = ()) -> dict:
    """The "trtfalcon.quantization" object of a deploy config.json."""
    return {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if kv_cache_fp8 else None,
            "exclude_modules": sorted(exclude_modules)}


def kv_cache_fp8(quantization: dict | None) -> bool:
    """Whether a "trtfalcon.quantization" object (or None) declares an FP8 KV cache (and so the k/v scales)."""
    return (quantization or {}).get("kv_cache_quant_algo") == "FP8"


def quantized_linears(num_layers: int, quantization: dict, source: str = "config.json") -> list[str]:
    """Deploy names ("layers.{i}.attn.qkv_proj") of the FP8 linears a quantization object describes."""
    algo = quantization.get("quant_algo")
    if algo != "FP8":
        raise ConfigError(f"{source}: trtfalcon.quantization.quant_algo: expected 'FP8', found {algo!r}")
    kv = quantization.get("kv_cache_quant_algo")
    if kv not in (None, "FP8"):
        raise ConfigError(f"{source}: trtfalcon.quantization.kv_cache_quant_algo: expected 'FP8' or null, found {kv!r}")
    every = [f"layers.{i}.{leaf}" for i in range(num_layers) for leaf in QUANTIZED_LINEARS]
    exclude = quantization.get("exclude_modules") or []
    unknown = sorted(set(exclude) - set(every))
    if unknown:
        raise ConfigError(f"{source}: trtfalcon.quantization.exclude_modules names {unknown[:3]}, which are not "
                          f"quantizable deploy linears (expected names like 'layers.0.mamba.in_proj')")
    return [name for name in every if name not in set(exclude)]


def fp8_tensor_specs(
    weight_shapes: dict[str, tuple[int, ...]], num_layers: int, quantization: dict | None, source: str = "config.json",
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Deploy tensor -> (shape, dtype) for every tensor FP8 adds or retypes; empty without quantization.

    weight_shapes: the deploy tensor shapes (checkpoint.deploy.deploy_tensor_shapes)."""
    if not quantization:
        return {}
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name in quantized_linears(num_layers, quantization, source):
        rows = weight_shapes[f"{name}.weight"][0]
        specs[f"{name}.weight"] = (weight_shapes[f"{name}.weight"], FP8_DTYPE)
        specs[f"{name}.weight_scale"] = ((rows,), torch.float32)
        specs[f"{name}.input_scale"] = ((), torch.float32)
    if kv_cache_fp8(quantization):
        for i in range(num_layers):
            for leaf in KV_SCALES:
                specs[f"layers.{i}.{leaf}"] = ((), torch.float32)
    return specs
