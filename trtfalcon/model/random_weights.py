"""Random deploy weights made directly on a device: a 7B-shaped model on a GPU without a 15 GB checkpoint file.

For benchmarks and GPU checks only (the values are random, not a trained model): each tensor is drawn on the
target device with synth.py's initialisation (fan-in scaled linears, Mamba2's A_log / dt_bias / D), so a random
model's activations stay O(1) through its layers, as they do in `trtfalcon synth` checkpoints. The config's muP
multipliers are dropped (a deploy checkpoint has them folded in, and random values have nothing to fold).

FP8 (the deploy format of checkpoint/deploy_fp8.py): every quantized linear gets its E4M3 weight with a per-row
weight_scale (row amax / 448) and a per-tensor input_scale; the FP8 KV cache gets per-layer k/v scales. Those input
and KV scales are not calibrated: ACTIVATION_AMAX is the |x| they are sized for, a round figure above what the
random model's normed activations reach (about 5), so nothing saturates.
"""

from __future__ import annotations

import torch

from trtfalcon.checkpoint.deploy import deploy_dtype_of, deploy_tensor_shapes
from trtfalcon.checkpoint.synth import init_rows, tensor_generator
from trtfalcon.config import FalconH1Config
from trtfalcon.model.weights import DeployWeights
from trtfalcon.checkpoint.deploy_fp8 import FP8_MAX, KV_SCALES, quantization_meta, quantize_fp8, quantized_linears

ACTIVATION_AMAX = 8.0


def random_deploy_weights(cfg: FalconH1Config, *, dtype: torch.dtype = torch.bfloat16,
                          device: torch.device | str = "cpu", seed: int = 0, fp8: bool = False,
                          kv_cache_fp8: bool = False) -> DeployWeights:
    """Deploy weights of `cfg`'s shape, drawn on `device`; each tensor depends only on (seed, name, device type).

    fp8: the six linears of every layer in E4M3 with their scales; kv_cache_fp8: k_scale/v_scale for an FP8 KV
    cache (needs fp8). Peak memory beyond the result: one tensor in fp32.
    """
    if kv_cache_fp8 and not fp8:
        raise ValueError("kv_cache_fp8 needs fp8=True: the FP8 KV scales belong to the FP8 deploy format")
    cfg = cfg.without_multipliers()
    device = torch.device(device)
    quantized = set(quantized_linears(cfg.num_hidden_layers, quantization_meta(kv_cache_fp8))) if fp8 else set()
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in deploy_tensor_shapes(cfg).items():
        # synth's rules read the HF-style module path ("model.final_layernorm.weight" is a norm)
        gen = tensor_generator(seed, name, device)
        values = init_rows(f"model.{name}", shape, gen, (0, shape[0]))
        linear = name.removesuffix(".weight")
        if linear in quantized:
            weight_scale = (values.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
            tensors[name] = quantize_fp8(values, weight_scale[:, None])
            tensors[f"{linear}.weight_scale"] = weight_scale
            tensors[f"{linear}.input_scale"] = torch.tensor(ACTIVATION_AMAX / FP8_MAX, device=device)
        else:
            tensors[name] = values.to(deploy_dtype_of(name, dtype))
        del values
    if kv_cache_fp8:
        for i in range(cfg.num_hidden_layers):
            for leaf in KV_SCALES:
                tensors[f"layers.{i}.{leaf}"] = torch.tensor(ACTIVATION_AMAX / FP8_MAX, device=device)
    return DeployWeights(cfg, tensors, dtype)
