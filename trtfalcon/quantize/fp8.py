"""FP8 post-training quantization with NVIDIA ModelOpt, written as a ModelOpt unified Hugging Face checkpoint.

What runs where (checked with nvidia-modelopt 0.47.0, transformers 5.23, torch 2.13 CPU):
- ModelOpt does the calibration: `mtq.quantize(model, cfg, forward_loop)` inserts per-tensor E4M3 weight and
  input quantizers (fake quantization in torch, so it runs on CPU) and collects "max" ranges: weight amax from the
  weight, input amax = running max |x| over the forward loop; scale = amax / 448.
- ModelOpt writes the checkpoint: `modelopt.torch.export.export_hf_checkpoint` works on CPU for Falcon-H1 and
  writes FP8 weights, weight_scale, input_scale, self_attn.{k,v}_proj.{k,v}_scale, hf_quant_config.json and
  config.json["quantization_config"] (quant_method "modelopt"): the format vLLM, SGLang and TensorRT-LLM read.
  We only add the tokenizer files, calibration.json (what the scales were calibrated on) and accuracy.json.
- The quantization config is ModelOpt's FP8_DEFAULT_CFG plus two Falcon-H1 fixes: its default exclusion
  `*mixer.conv1d*` does not match Falcon-H1's `mamba.conv1d` (a depthwise conv, not a GEMM: quantizing it would
  cost accuracy for no speed), so `*mamba.conv1d*` is disabled explicitly; `*lm_head*` stays excluded (the
  default). `conservative=True` also keeps `*mamba.in_proj*` / `*mamba.out_proj*` in bf16. With an FP8 KV cache,
  FP8_KV_CFG's `*[kv]_bmm_quantizer` entries are added; K is observed after key_multiplier and RoPE, as cached.

The model is calibrated in eval() on the transformers slow path (no mamba_ssm / causal_conv1d kernels on CPU), with
use_cache=False so every token of every sample runs through every quantizer. The output is written atomically;
it is read back and validated (checkpoint/fp8.py) before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trtfalcon.checkpoint.deploy import copy_side_files
from trtfalcon.checkpoint.fp8 import FP8HFCheckpoint
from trtfalcon.checkpoint.hf import HFCheckpoint, is_quantized_hf_checkpoint
from trtfalcon.checkpoint.safetensors_io import atomic_output_dir, check_output_differs
from trtfalcon.dtypes import FLOAT_NAMES, lookup
from trtfalcon.errors import CheckpointError, ConfigError, MissingDependencyError
from trtfalcon.quantize.calibration import load_calibration

if TYPE_CHECKING:
    from trtfalcon.quantize.accuracy import TaskEvaluator

MODELOPT_HINT = "pip install 'trtfalcon[quant]'  (nvidia-modelopt==0.47.0 and requests; not its [hf] extra)"
# ModelOpt quantizer patterns Falcon-H1 needs on top of FP8_DEFAULT_CFG (see the module docstring).
FALCON_H1_DISABLED = ("*mamba.conv1d*", "*lm_head*")
CONSERVATIVE_DISABLED = ("*mamba.in_proj*", "*mamba.out_proj*")


@dataclass
class QuantizeResult:
    out_dir: Path
    calibration: dict[str, Any]
    quantized_modules: int
    kv_cache_fp8: bool
    seconds: float
    accuracy: dict[str, Any] | None = None


def import_modelopt():
    """(modelopt.torch.quantization, export_hf_checkpoint), or a MissingDependencyError saying how to get them."""
    try:
        with warnings.catch_warnings():
            # "transformers X is not tested with modelopt": we test this combination ourselves (tests/quantize).
            warnings.simplefilter("ignore", UserWarning)
            import modelopt.torch.quantization as mtq
            from modelopt.torch.export import export_hf_checkpoint
    except ImportError as e:
        raise MissingDependencyError(f"FP8 calibration needs NVIDIA ModelOpt: {MODELOPT_HINT}; import failed: {e}") from e
    return mtq, export_hf_checkpoint


def modelopt_fp8_config(mtq: Any, *, kv_cache_fp8: bool, conservative: bool = False) -> dict[str, Any]:
    """ModelOpt's FP8_DEFAULT_CFG + the Falcon-H1 exclusions (+ FP8_KV_CFG's KV quantizers when asked)."""
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    entries = list(cfg["quant_cfg"])
    if kv_cache_fp8:
        entries += [e for e in copy.deepcopy(mtq.FP8_KV_CFG)["quant_cfg"] if e.get("quantizer_name") != "*"]
    disabled = FALCON_H1_DISABLED + (CONSERVATIVE_DISABLED if conservative else ())
    entries += [{"quantizer_name": p, "enable": False} for p in disabled]
    cfg["quant_cfg"] = entries
    return cfg


def quantize_fp8(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    kv_cache_dtype: str | None = None,
    calib_data: str | Path | None = None,
    calib_size: int = 32,
    calib_seq_len: int = 512,
    holdout: int = 8,
    seed: int = 0,
    conservative: bool = False,
    accuracy: bool = True,
    accuracy_dtype: str = "fp32",
    task: TaskEvaluator | None = None,
    device: str = "auto",
    overwrite: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> QuantizeResult:
    """Calibrate hf_dir (a bf16/fp32 HF Falcon-H1 checkpoint) and write the FP8 unified checkpoint to out_dir.

    device: where calibration runs ("auto": CUDA when torch sees a GPU, else CPU). A 7B model calibrates on CPU
    (about 16 GB of RAM in bf16) but slowly; on a GPU the same code runs in minutes.
    accuracy_dtype: the compute dtype both sides of the accuracy report run in (fp32: the quantization's cost
    alone; bf16: a bf16 deployment against an FP8 one). task: also score both checkpoints on a task
    (quantize/accuracy.py TaskEvaluator; needs accuracy)."""
    t0 = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output_differs(hf_dir, out_dir)
    if kv_cache_dtype not in (None, "fp8", "auto"):
        raise CheckpointError(f"--kv-cache-dtype: expected fp8 (or leave it unset), found {kv_cache_dtype!r}")
    kv_fp8 = kv_cache_dtype == "fp8"
    lookup(accuracy_dtype, among=FLOAT_NAMES, what="accuracy dtype")
    if task is not None and not accuracy:
        raise ConfigError(f"task {task.name!r}: task accuracy is part of the accuracy report; do not turn the report "
                          "off (--no-accuracy) when asking for a task")
    if is_quantized_hf_checkpoint(hf_dir):
        raise CheckpointError(f"{hf_dir}: is already quantized (hf_quant_config.json / quantization_config); "
                              "quantize its bf16 source instead")
    ckpt = HFCheckpoint(hf_dir)
    ckpt.validate()  # before any work: a broken source fails here
    cfg = ckpt.config
    if task is not None:
        task.check(cfg, hf_dir)
    # The data is read before the model: a calibration file that does not tokenize costs no model load.
    calib = load_calibration(Path(calib_data) if calib_data else None, hf_dir, cfg.vocab_size,
                             num_samples=calib_size, seq_len=calib_seq_len, holdout=holdout if accuracy else 0,
                             seed=seed)
    log(f"calibration data: {calib.source} ({len(calib.calib)} samples, {sum(map(len, calib.calib))} tokens)")
    mtq, export_hf_checkpoint = import_modelopt()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _load_hf_model(hf_dir).to(device)
    qcfg = modelopt_fp8_config(mtq, kv_cache_fp8=kv_fp8, conservative=conservative)

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad(), _quiet_transformers():
            for ids in calib.calib:
                m(torch.tensor([ids], device=device), use_cache=False)

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as chatter:
        warnings.simplefilter("ignore", UserWarning)
        model = mtq.quantize(model, qcfg, forward_loop)  # prints "Inserted N quantizers" etc. to stdout
    log("ModelOpt: " + (" ".join(chatter.getvalue().split())[:200] or "(no output)"))
    n_quant = _check_calibrated(model, hf_dir)
    log(f"ModelOpt calibrated {n_quant} linears (FP8 E4M3 per tensor){' + FP8 KV cache' if kv_fp8 else ''} on {device}")

    result = QuantizeResult(out_dir, calib.describe(), n_quant, kv_fp8, 0.0)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        with warnings.catch_warnings(), _quiet_transformers():
            warnings.simplefilter("ignore")
            export_hf_checkpoint(model, export_dir=str(tmp))
        copy_side_files(hf_dir, tmp)
        record = {"producer": "trtfalcon quantize", "source": str(hf_dir), "format": "fp8", "device": device,
                  "kv_cache_dtype": "fp8" if kv_fp8 else None, "conservative": conservative,
                  "modelopt_config": qcfg, "calibration": calib.describe(), "holdout": calib.holdout}
        (tmp / "calibration.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        written = FP8HFCheckpoint(tmp)  # read back what ModelOpt wrote: the same checks `convert` makes
        written.validate()
        if written.quant.kv_cache_fp8 != kv_fp8:
            raise CheckpointError(f"{tmp}: ModelOpt wrote kv_cache_quant_algo={written.quant.kv_cache_fp8}, asked {kv_fp8}")
        del model
        if device != "cpu":
            torch.cuda.empty_cache()
        if accuracy:
            from trtfalcon.quantize.accuracy import accuracy_report

            result.accuracy = accuracy_report(hf_dir, tmp, calib, compute_dtype=accuracy_dtype, task=task)
            (tmp / "accuracy.json").write_text(json.dumps(result.accuracy, indent=2) + "\n")
    result.seconds = time.perf_counter() - t0
    return result


def _load_hf_model(hf_dir: Path) -> torch.nn.Module:
    """transformers' FalconH1ForCausalLM in the checkpoint's own dtype, on CPU, eval()."""
    from transformers import FalconH1ForCausalLM

    with _quiet_transformers():
        return FalconH1ForCausalLM.from_pretrained(str(hf_dir), dtype="auto").eval()


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' progress bars and its "falling back to the reference PyTorch implementation" notes (expected
    on CPU) off while we load, calibrate and export; our own log says what happened."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_calibrated(model: torch.nn.Module, hf_dir: Path) -> int:
    """Every enabled quantizer saw data (an amax): a linear the forward loop never reached would export garbage."""
    n = 0
    for name, module in model.named_modules():
        if not name.endswith("input_quantizer") or not getattr(module, "is_enabled", False):
            continue
        amax = getattr(module, "amax", None)
        if amax is None or not bool(torch.isfinite(amax).all()) or float(amax.max()) <= 0:
            raise CheckpointError(f"{hf_dir}: ModelOpt calibration left '{name}' without a usable range "
                                  f"(amax {amax}); the calibration data never reached it")
        n += 1
    return n
