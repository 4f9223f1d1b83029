"""Small random Falcon-H1 checkpoints built with transformers itself (the oracle), for every config variant."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from trtfalcon.config import preset_dict

# Every switch of the family (../shared/reference/falcon-h1.md). Each variant is the tiny preset plus overrides.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},  # head_dim present, 2 groups, gated RMSNorm with norm_before_gate=False (the 7B's choice)
    "no_head_dim": {"head_dim": None, "num_attention_heads": 4, "hidden_size": 64},  # head_dim = 64 / 4
    "mamba_head_ne_attn_head": {"mamba_d_head": 8, "mamba_n_heads": 8, "head_dim": 32, "num_attention_heads": 2,
                                "num_key_value_heads": 1},
    "one_group": {"mamba_n_groups": 1},
    "no_mamba_rms_norm": {"mamba_rms_norm": False},
    "norm_before_gate": {"mamba_norm_before_gate": True},
    "tied_embeddings": {"tie_word_embeddings": True},
    "all_biases": {"attention_bias": True, "mlp_bias": True, "projectors_bias": True, "mamba_proj_bias": True},
    "no_conv_bias": {"mamba_conv_bias": False},
    "time_step_limit": {"time_step_limit": [0.02, 0.08]},
    "unit_multipliers": {k: 1.0 for k in ("embedding_multiplier", "lm_head_multiplier", "key_multiplier",
                                          "attention_out_multiplier", "ssm_in_multiplier", "ssm_out_multiplier")},
}


def variant_config(name: str) -> dict[str, Any]:
    cfg = preset_dict("tiny")
    for k, v in VARIANTS[name].items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


def build_hf_checkpoint(config_dict: dict[str, Any], out: Path, seed: int = 0) -> Path:
    """FalconH1ForCausalLM(config) with every parameter re-drawn so each one matters, saved with save_pretrained."""
    from transformers import FalconH1Config as HFConfig
    from transformers import FalconH1ForCausalLM

    d = dict(config_dict)
    d.pop("model_type", None)
    d.pop("architectures", None)
    torch.manual_seed(seed)
    model = FalconH1ForCausalLM(HFConfig(**d)).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif leaf == "A_log":
                p.copy_(torch.log(torch.empty(p.shape).uniform_(1.0, 8.0, generator=gen)))
            elif leaf in ("D", "dt_bias") or leaf == "bias":
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    model.save_pretrained(out, safe_serialization=True)
    return out


def hf_model(path: Path):
    from transformers import FalconH1ForCausalLM

    return FalconH1ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """transformers' full-sequence forward without cache: the oracle (its cached generate() differs, see
    ../shared/reference/falcon-h1.md)."""
    return model(torch.tensor([ids]), use_cache=False).logits[0].float()


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens, each from a full-sequence no-cache forward over the prompt and the tokens so far."""
    seq = list(ids)
    out = []
    for _ in range(n):
        tok = int(hf_logits(model, seq)[-1].argmax())
        out.append(tok)
        seq.append(tok)
    return out


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in a directory, by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


# The Linears of one HF Falcon-H1 layer that ModelOpt's FP8 config quantizes (conv1d and lm_head stay dense).
HF_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mamba.in_proj",
              "mamba.out_proj", "feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj")


def fake_quant_e4m3(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E4M3 quantize-dequantize, written here independently of trtfalcon.checkpoint.deploy_fp8."""
    return (x / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32) * s


def hf_fake_quant_model(src: Path, fp8_dir: Path):
    """transformers' FalconH1 (multipliers NOT folded) whose Linears compute fq(x, input_scale) @ (W8 * ws).T with
    the FP8 checkpoint's tensors: the computation the folded FP8 deploy graph must reproduce. Every Linear of
    HF_LINEARS in every layer must be quantized in fp8_dir."""
    import torch.nn.functional as F

    model, t = hf_model(src), read_safetensors(fp8_dir)
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"{name}.input_scale" in t:
            mod.weight.data = t[f"{name}.weight"].float() * t[f"{name}.weight_scale"].float()
            mod.forward = lambda x, m=mod, s=t[f"{name}.input_scale"].float(): F.linear(fake_quant_e4m3(x, s), m.weight,
                                                                                        m.bias)
            n += 1
    assert n == model.config.num_hidden_layers * len(HF_LINEARS), n
    return model


def read_accuracy_report(quant_dir: Path, holdout_samples: int) -> dict:
    """quantize's accuracy.json, checked for what every report has: measured on `holdout_samples` held-out samples
    of real text, every figure a finite number."""
    import json

    r = json.loads((Path(quant_dir) / "accuracy.json").read_text())
    assert r["eval"] == {**r["eval"], "split": "holdout", "samples": holdout_samples, "synthetic": False}, r["eval"]
    for k in ("logit_max_abs_err", "logit_mean_abs_err", "logit_rel_rms_err", "top1_agreement", "kl_mean",
              "perplexity_source", "perplexity_quantized", "perplexity_ratio"):
        assert math.isfinite(r[k]), k
    return r


def run_cli(*args, ok: bool = True):
    """Invoke the trtfalcon CLI in-process; ok=False expects a failure with a clean message, no traceback."""
    from click.testing import CliRunner

    from trtfalcon.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    return r


class _CompiledStandInMeta(type):
    def __getattr__(cls, name):  # trt.Logger.WARNING, trt.PluginFieldType.INT32, ...
        return compiled_stand_in_class(name)


class _CompiledStandIn(metaclass=_CompiledStandInMeta):
    """Any class or enum of TensorRT's compiled bindings: constructible with anything, every attribute and call
    another stand-in. Only what the pure-Python plugin package touches at import and registration goes through it."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return _CompiledStandIn()

    def __call__(self, *args, **kwargs):
        return _CompiledStandIn()


_STAND_INS: dict[str, type] = {}


def compiled_stand_in_class(name: str) -> type:
    if name not in _STAND_INS:
        _STAND_INS[name] = type(name, (_CompiledStandIn,), {})
    return _STAND_INS[name]


def tensorrt_plugin_api(wheel, dest):
    """TensorRT 11.4's real `tensorrt.plugin` package (pure Python: register / aot_impl and their validators in
    _validate.py, TensorDesc, KernelLaunchParams, SymIntExprs, ...) from the bindings wheel, imported as
    `tensorrt.plugin` over a stand-in for the compiled `tensorrt` module (tensorrt.so needs libnvinfer, which does
    not install from PyPI). A context manager: sys.modules is restored on exit, so `import tensorrt` fails again."""
    import contextlib
    import sys
    import types
    import zipfile
    from pathlib import Path

    @contextlib.contextmanager
    def loaded():
        root = Path(dest) / "tensorrt"
        with zipfile.ZipFile(wheel) as z:
            for f in z.namelist():
                if f.startswith("tensorrt_bindings/plugin/") and f.endswith(".py"):
                    out = root / "plugin" / f.rsplit("/", 1)[1]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(f))
        compiled = types.ModuleType("tensorrt")
        compiled.__path__ = [str(root)]
        compiled.__version__ = "11.4.0.106"
        compiled.__getattr__ = compiled_stand_in_class  # PEP 562: every other name is a stand-in class
        compiled_stand_in_class("Dims").MAX_DIMS = 8  # read as a number by ShapeExprs
        saved = {k: v for k, v in sys.modules.items() if k == "tensorrt" or k.startswith("tensorrt.")}
        sys.modules["tensorrt"] = compiled
        try:
            import importlib
            import warnings

            with warnings.catch_warnings():  # NVIDIA's docstrings hold invalid escapes like '\\s'
                warnings.simplefilter("ignore", SyntaxWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                yield importlib.import_module("tensorrt.plugin")
        finally:
            for k in [k for k in sys.modules if k == "tensorrt" or k.startswith("tensorrt.")]:
                del sys.modules[k]
            sys.modules.update(saved)

    return loaded()
