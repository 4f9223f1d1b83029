"""The `trtfalcon` command line. Each command is a thin shell over one pipeline stage, imported lazily so that
`--help` stays fast and a missing optional dependency only affects the command that needs it."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from trtfalcon import __version__
from trtfalcon.dtypes import FLOAT_NAMES, KV_CACHE_NAMES, SSM_STATE_NAMES, lookup
from trtfalcon.progress import progress_bar, progress_messages
from trtfalcon.runtime.options import RuntimeOptions

DTYPE_CHOICE = click.Choice(FLOAT_NAMES)
EXTRACTOR_HELP = ("How a trace's final answer is read from its text: toy = the toy task's last A:<digits>; boxed = "
                  "the last \\boxed{...}; regex:PATTERN = the last match of PATTERN (its first group if it has one).")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print trtfalcon's own errors (and OS errors such as a full disk) as one clear line, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from trtfalcon.errors import TrtFalconError

        try:
            return fn(*args, **kwargs)
        except TrtFalconError as e:
            raise click.ClickException(str(e)) from e
        except OSError as e:
            raise click.ClickException(f"{e.filename or ''}: {e.strerror or e}") from e

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="trtfalcon")
def main() -> None:
    """Deploy Falcon-H1 / Falcon-H1R (hybrid attention + Mamba2) models on NVIDIA GPUs.

    \b
    The pipeline, one command per stage, one inspectable directory per artifact:
      synth     make a random HF-format checkpoint of a known shape (tests, benchmarks, demo)
      convert   HF checkpoint -> deploy checkpoint (muP multipliers folded, q/k/v and gate/up fused)
      quantize  HF checkpoint -> FP8 HF checkpoint (ModelOpt calibration) + accuracy report
      build     checkpoint -> TensorRT 11 engine as a build config says (runs the stages above as needed)
      export    deploy checkpoint -> ONNX graph (plugin nodes, FP8 Q/DQ, external weights) for TensorRT
      generate  run prompts through the model (in-flight-batching runtime, or the reference oracle)
      bench     throughput at fixed concurrencies (32 and 64 by default), JSON report + plot
      tts       test-time scaling: many traces of a prompt, DeepConf online/offline confidence vote
      plugins   compile the Triton kernels of the TensorRT plugins ahead of time (no GPU needed)
      serve     a Triton Inference Server model repository on the runtime (streaming, cancellation)
      demo      all of the above on a tiny model, on this machine

    Start with `trtfalcon demo` (no arguments) to run everything that runs on this machine.
    """


# ------------------------------------------------------------------------------------------------------ synth
@main.command()
@click.option("--preset", required=True, help="Model shape: tiny, 0.5b, 1.5b, 1.5b-deep, 3b, 7b or 34b.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory (created).")
@click.option("--seed", default=0, show_default=True, help="Random seed; each tensor depends only on (seed, name).")
@click.option("--dtype", type=DTYPE_CHOICE, default="bf16", show_default=True, help="Weight dtype (A_log/D/dt_bias stay fp32).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard, e.g. 500MB, 2GB.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only after the new one is complete).")
@handle_errors
def synth(preset: str, out_dir: Path, seed: int, dtype: str, max_shard_size: str, overwrite: bool) -> None:
    """Write a random Falcon-H1 checkpoint in Hugging Face format (config.json + sharded safetensors).

    Tensors are generated and written one chunk at a time, so a 7B-shaped checkpoint (~15 GB in bf16) needs
    well under 1 GB of memory. transformers' FalconH1ForCausalLM.from_pretrained loads the result.

    \b
    Example:  trtfalcon synth --preset tiny --out runs/tiny-hf --dtype fp32
    """
    from trtfalcon.checkpoint.hf import hf_tensor_shapes
    from trtfalcon.checkpoint.synth import synth_checkpoint
    from trtfalcon.config import FalconH1Config, preset_dict

    cfg_dict = preset_dict(preset)
    cfg = FalconH1Config.from_hf_dict(cfg_dict)
    elem = lookup(dtype).itemsize
    total = sum(_numel(s) * elem for s in hf_tensor_shapes(cfg).values())
    progress, task = progress_bar(total, f"synth {preset}")
    with progress:
        synth_checkpoint(
            cfg_dict, out_dir, seed=seed, dtype=dtype, max_shard_bytes=_parse_size(max_shard_size), overwrite=overwrite,
            on_tensor=lambda s: progress.update(task, advance=_numel(s.shape) * elem, tensor=s.name),
        )
    click.echo(f"wrote {out_dir} ({preset}: {cfg.num_parameters() / 1e9:.3f} B parameters, {dtype})")


# ------------------------------------------------------------------------------------------------------ convert
@main.command()
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=DTYPE_CHOICE, default="bf16", show_default=True, help="Dtype of the deploy weights.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists (only after the new one is complete).")
@handle_errors
def convert(hf_dir: Path, out_dir: Path, dtype: str, max_shard_size: str, overwrite: bool) -> None:
    """Convert a Hugging Face Falcon-H1 checkpoint into a deploy checkpoint.

    Every muP multiplier is folded into the weights in fp32 (the mup_vector is rebuilt from config.json; tied
    embeddings are untied), q/k/v and gate/up are fused, A_log/D/dt_bias stay fp32. The output's config.json needs
    no multiplier. Reads single-file and sharded (index.json) safetensors; refuses pickle weights (*.bin, *.pt).
    A ModelOpt FP8 checkpoint (from `quantize`, or published by others) keeps its FP8 weights: the multipliers go
    into the per-row weight scales and the input scales (checkpoint/fp8.py), and every scale is checked first.
    Streams one row chunk at a time (peak memory ~ a few hundred MB whatever the model size) and writes
    atomically: on any error nothing is left at OUT_DIR.

    \b
    Example:  trtfalcon convert runs/tiny-hf runs/tiny-deploy --dtype fp32
    """
    from trtfalcon.checkpoint.convert import convert_checkpoint

    state: dict[str, Any] = {}

    def start(total: int) -> None:
        state["progress"], state["task"] = progress_bar(total, "convert")
        state["progress"].start()

    try:
        convert_checkpoint(
            hf_dir, out_dir, dtype=dtype, max_shard_bytes=_parse_size(max_shard_size), overwrite=overwrite,
            on_start=start,
            on_tensor=lambda s: state["progress"].update(state["task"], advance=s.nbytes, tensor=s.name),
        )
    finally:
        if "progress" in state:
            state["progress"].stop()
    click.echo(f"wrote deploy checkpoint {out_dir} ({dtype})")


# ------------------------------------------------------------------------------------------------------ quantize
@main.command()
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["fp8"]), default="fp8", show_default=True,
              help="Quantization: FP8 E4M3, per-tensor weights and activations (ModelOpt 'max' calibration).")
@click.option("--kv-cache-dtype", type=click.Choice(["fp8"]), default=None,
              help="Also calibrate an FP8 KV cache (k_scale / v_scale per layer) [default: KV cache unquantized].")
@click.option("--calib-data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Text file, or JSONL with {"text": ...} or {"input_ids": [...]} per line, tokenized with the '
                   "checkpoint's tokenizer. Default: synthetic random token ids (said plainly in the output).")
@click.option("--calib-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Calibration samples (forward passes).")
@click.option("--calib-seq-len", default=512, show_default=True, type=click.IntRange(min=2),
              help="Tokens per calibration sample (longer lines are truncated, text is cut into windows).")
@click.option("--holdout", default=8, show_default=True, type=click.IntRange(min=0),
              help="Samples (the file's last ones) held out of calibration for the accuracy report's perplexity.")
@click.option("--conservative", is_flag=True, help="Keep the Mamba in_proj/out_proj in bf16 too (FP8 attention and MLP only).")
@click.option("--no-accuracy", is_flag=True, help="Skip the accuracy report against the source checkpoint.")
@click.option("--accuracy-dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Compute dtype of both sides of the accuracy report: fp32 measures the quantization alone, bf16 "
                   "a bf16 deployment against an FP8 one.")
@click.option("--task", type=click.Choice(["toy-multiplication"]), default=None,
              help="Also compare task accuracy, each checkpoint converted and run by the runtime: toy-multiplication "
                   "= greedy answers of a model trained on trtfalcon's toy task (tests/data/toy-reasoner).")
@click.option("--task-problems", default=200, show_default=True, type=click.IntRange(min=1),
              help="Held-out problems --task scores.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where calibration runs: auto = CUDA when a GPU is visible, else CPU.")
@click.option("--seed", default=0, show_default=True, help="Seed of the synthetic calibration ids.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists (only after the new one is complete).")
@handle_errors
def quantize(hf_dir: Path, out_dir: Path, fmt: str, kv_cache_dtype: str | None, calib_data: Path | None,
             calib_size: int, calib_seq_len: int, holdout: int, conservative: bool, no_accuracy: bool,
             accuracy_dtype: str, task: str | None, task_problems: int, device: str, seed: int,
             overwrite: bool) -> None:
    """Quantize a Hugging Face Falcon-H1 checkpoint to FP8 with NVIDIA ModelOpt (runs on CPU).

    Writes a ModelOpt unified HF checkpoint (FP8 weights + weight_scale + input_scale per Linear, k/v scales,
    hf_quant_config.json), the format vLLM, SGLang and TensorRT-LLM read, which `trtfalcon convert` turns into an
    FP8 deploy checkpoint. The Mamba conv1d, lm_head, embeddings and norms stay unquantized. Then compares the result
    with the source on held-out samples (top-1 agreement, logit error, KL, perplexity; with --task, task accuracy):
    printed and saved as OUT_DIR/accuracy.json. Needs `pip install 'trtfalcon[quant]'`. Written atomically.

    \b
    Examples:
      trtfalcon quantize runs/tiny-hf runs/tiny-fp8 --calib-size 16 --calib-seq-len 128
      trtfalcon quantize Falcon-H1R-7B runs/7b-fp8 --kv-cache-dtype fp8 --calib-data calib.jsonl --calib-size 256
      trtfalcon quantize tests/data/toy-reasoner runs/toy-fp8 --calib-data tests/data/toy-calib.jsonl \
          --calib-size 64 --holdout 16 --task toy-multiplication --accuracy-dtype bf16
    """
    from trtfalcon.quantize.accuracy import format_report
    from trtfalcon.quantize.fp8 import quantize_fp8

    task_eval = None
    if task == "toy-multiplication":
        from trtfalcon.tts.toy_eval import ToyTaskEvaluator

        task_eval = ToyTaskEvaluator(task_problems)
    r = quantize_fp8(hf_dir, out_dir, kv_cache_dtype=kv_cache_dtype, calib_data=calib_data, calib_size=calib_size,
                     calib_seq_len=calib_seq_len, holdout=holdout, seed=seed, conservative=conservative,
                     accuracy=not no_accuracy, accuracy_dtype=accuracy_dtype, task=task_eval, device=device,
                     overwrite=overwrite, log=lambda m: click.echo(m, err=True))
    if r.calibration["synthetic"]:
        click.secho("note: calibrated on SYNTHETIC token ids (no --calib-data): fine for a smoke test, "
                    "not for deployment", fg="yellow", err=True)
    if r.accuracy is not None:
        click.echo(format_report(r.accuracy))
        click.echo(f"accuracy report: {out_dir / 'accuracy.json'}")
    click.echo(f"wrote FP8 checkpoint {out_dir} ({r.quantized_modules} FP8 linears"
               f"{', FP8 KV cache' if r.kv_cache_fp8 else ''}; {r.seconds:.1f} s)")


# ------------------------------------------------------------------------------------------------------ export
@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=DTYPE_CHOICE, default=None,
              help="Compute dtype of the graph [default: the checkpoint's]. The onnxruntime backend needs fp32.")
@click.option("--opset", default=21, show_default=True, type=click.IntRange(min=21), help="ONNX opset (21 or newer).")
@click.option("--kv-cache-dtype", "kv_dtype", type=click.Choice(KV_CACHE_NAMES), default=None,
              help="Dtype of the KV cache pools the graph takes [default: the compute dtype]; fp8 needs the "
                   "checkpoint's k/v scales (`quantize --kv-cache-dtype fp8`).")
@click.option("--ssm-state-dtype", "ssm_dtype", type=click.Choice(SSM_STATE_NAMES), default="fp32", show_default=True,
              help="Dtype of the Mamba SSM state pools.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists (only after the new one is complete).")
@handle_errors
def export(checkpoint: Path, out_dir: Path, dtype: str | None, opset: int, kv_dtype: str | None, ssm_dtype: str,
           overwrite: bool) -> None:
    """Export a deploy checkpoint as the ONNX graph of one engine step (what TensorRT builds).

    The engine I/O contract as graph inputs and outputs (ragged step inputs, per-layer KV / conv / SSM pools and
    their aliased outputs), the Mamba conv, SSD scan, gated norm and paged attention as `trtfalcon` plugin nodes
    that TensorRT maps to the registered plugins, FP8 linears as explicit Q/DQ, weights as external data
    (model.onnx + model.onnx.data + export.json manifest + config.json). Streams one tensor at a time; written
    atomically. `generate` / `bench --backend onnxruntime` run an fp32 export on this machine.

    \b
    Example:  trtfalcon export runs/tiny-deploy runs/tiny-onnx --dtype fp32
    """
    from trtfalcon.export import export_onnx

    state: dict[str, Any] = {}

    def progress(name: str, done: int, total: int) -> None:
        if "progress" not in state:
            state["progress"], state["task"] = progress_bar(total, "export")
            state["progress"].start()
        state["progress"].update(state["task"], completed=done, tensor=name)

    try:
        export_onnx(checkpoint, out_dir, opset=opset, dtype=dtype, kv_dtype=kv_dtype, ssm_dtype=ssm_dtype,
                    overwrite=overwrite, progress=progress)
    finally:
        if "progress" in state:
            state["progress"].stop()
    click.echo(f"wrote ONNX export {out_dir} (model.onnx + model.onnx.data, opset {opset})")


# ------------------------------------------------------------------------------------------------------ generate
def runtime_option_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The runtime's sizing options (generate, bench, serve triton): one per RuntimeOptions field that has a flag,
    with the field's default and help (runtime/options.py)."""
    defaults = RuntimeOptions()
    for name, flag in reversed(RuntimeOptions.flags().items()):
        default = getattr(defaults, name)
        if default is None and flag.none is not None:
            default = flag.none
        kind = click.Choice(list(flag.choices)) if flag.choices else (
            click.IntRange(min=flag.min) if flag.min is not None else None)
        fn = click.option(flag.name, name, type=kind, default=default, show_default=default is not None,
                          help=flag.help)(fn)
    return fn


def _pop_runtime_options(kw: dict[str, Any]) -> RuntimeOptions:
    """Take runtime_option_flags' values out of a command's keyword arguments, as RuntimeOptions."""
    opts = RuntimeOptions.from_flags({name: kw.pop(name) for name in RuntimeOptions.flags()})
    if opts.kernels == "triton" and opts.device == "cpu":
        import os

        # Triton kernels on CPU tensors run in Triton's interpreter, chosen when triton is first imported (below).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if opts.max_num_tokens < opts.max_batch_size:
        raise click.BadParameter(
            f"must be at least --max-batch-size ({opts.max_batch_size}), found {opts.max_num_tokens}",
            param_hint="--max-num-tokens",
        )
    return opts


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt-ids", help="Comma-separated prompt token ids, e.g. 1,2,3.")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL, one {"prompt_ids": [...], "max_new_tokens": N} per line; all run in flight together.')
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(min=1),
              help="Default for prompts that do not set their own.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0.0, max=1.0, min_open=True))
@click.option("--seed", default=0, show_default=True, help="Sampling seed; prompt i uses seed + i.")
@click.option("--logprobs", default=0, show_default=True, type=click.IntRange(min=0),
              help="Return the top-k log-probs of each generated token.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at the model's EOS token.")
@click.option("--n", "n", default=1, show_default=True, type=click.IntRange(min=1),
              help="Samples per prompt, prefilled once (DeepConf's parallel traces); sample k of prompt i uses seed "
                   "seed + i*n + k. With --json one line per sample, with \"sample\": k.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt", "reference"]), default="torch", show_default=True,
              help="torch: the in-flight-batching runtime; onnxruntime: the same runtime over an fp32 export "
                   "directory (`trtfalcon export`); reference: the unbatched oracle model, one prompt at a time.")
@runtime_option_flags
@click.option("--json", "as_json", is_flag=True, help='One JSON object per prompt (per sample with --n): {"token_ids": [...], ...}.')
@handle_errors
def generate(checkpoint: Path, prompt_ids: str | None, prompts_file: Path | None, max_new_tokens: int,
             temperature: float, top_k: int, top_p: float, seed: int, logprobs: int, ignore_eos: bool, n: int,
             backend: str, as_json: bool, **kw: Any) -> None:
    """Generate tokens for one or many prompts.

    CHECKPOINT is a deploy checkpoint (from `convert`) or a Hugging Face checkpoint (converted in memory).
    With --prompts-file every prompt runs in flight together (in-flight batching, chunked prefill, paged KV
    cache); results print in input order. A prompt that cannot be served (ids outside the vocab, too long) gets
    its own error line while the others complete; the exit code is then 1.

    \b
    Examples:
      trtfalcon generate runs/tiny-deploy --prompt-ids 1,2,3 --max-new-tokens 8 --json
      trtfalcon generate runs/tiny-deploy --prompts-file prompts.jsonl --max-batch-size 8 --json
      trtfalcon generate runs/tiny-deploy --prompt-ids 1,2,3 --n 8 --temperature 0.6 --top-p 0.95 --json
    """
    from trtfalcon.runtime.prompts import load_prompts
    from trtfalcon.runtime.request import Request, SamplingParams

    opts = _pop_runtime_options(kw)
    prompts = load_prompts(prompt_ids, prompts_file, max_new_tokens)
    if backend == "reference":
        # the oracle is plain greedy / temperature sampling over dense caches: refuse what it would silently drop
        unused = [flag for flag, used in (("--top-k", top_k != 0), ("--top-p", top_p != 1.0),
                                          ("--logprobs", logprobs != 0), ("--kv-cache-dtype", opts.kv_dtype
                                                                            not in (None, "auto")), ("--n", n != 1))
                  if used]
        if unused:
            raise click.UsageError(f"{', '.join(unused)}: not supported by --backend reference (greedy or "
                                   "temperature sampling only); use --backend torch")
        outputs = _generate_reference(checkpoint, prompts, opts, temperature, seed, ignore_eos)
    else:
        from trtfalcon.runtime.llm import LLMEngine

        engine = LLMEngine.from_options(backend, checkpoint, opts, seed=seed)
        outputs = engine.generate(
            Request(str(i), p.prompt_ids, SamplingParams(
                max_new_tokens=p.max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed + i * n,
                ignore_eos=ignore_eos, logprobs=logprobs, n=n))
            for i, p in enumerate(prompts)
        )
    failed = 0
    for o in outputs:  # n per prompt, in order (1 if the prompt was rejected for its n); request ids are indices
        failed += bool(o.error)
        if as_json:
            sample = {} if o.parent_id is None else {"sample": o.sample_index}
            click.echo(json.dumps({"index": int(o.parent_id or o.request_id), **sample, **o.to_dict()}))
        elif o.error:
            click.echo(f"error: {o.error}", err=True)
        else:
            click.echo(",".join(map(str, o.token_ids)))
    if failed:
        raise click.exceptions.Exit(1)


def _generate_reference(checkpoint: Path, prompts, opts, temperature: float, seed: int, ignore_eos: bool):
    from trtfalcon.errors import RequestError
    from trtfalcon.model.generate import reference_generate
    from trtfalcon.model.reference import ReferenceModel
    from trtfalcon.model.weights import load_weights
    from trtfalcon.runtime.prompts import check_servable
    from trtfalcon.runtime.request import RequestOutput

    weights = load_weights(checkpoint, opts.dtype)
    cfg = weights.config
    model = ReferenceModel(weights)
    outputs = []
    for i, p in enumerate(prompts):
        out = RequestOutput(str(i), p.prompt_ids)
        try:
            check_servable(p, cfg.vocab_size, opts.resolved_max_seq_len(cfg), f"request {i}")
        except RequestError as e:
            out.finish_reason, out.error = "error", str(e)
        else:
            out.token_ids = reference_generate(model, p.prompt_ids, p.max_new_tokens, temperature=temperature,
                                               seed=seed + i, stop_token_ids=() if ignore_eos else cfg.eos_token_id)
            stopped = bool(out.token_ids) and out.token_ids[-1] in cfg.eos_token_id and not ignore_eos
            out.finish_reason = "stop" if stopped else "length"
        outputs.append(out)
    return outputs


# ------------------------------------------------------------------------------------------------------ bench
@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL of {"task_id", "input_ids", "output_tokens"} [default: synthetic token-norm-dist].')
@click.option("--isl", default=128, show_default=True, type=click.IntRange(min=1), help="Synthetic input length mean.")
@click.option("--osl", default=128, show_default=True, type=click.IntRange(min=1), help="Synthetic output length mean.")
@click.option("--isl-stdev", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--osl-stdev", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--num-requests", default=None, type=click.IntRange(min=1),
              help="Synthetic requests per concurrency level [default: 2 x concurrency].")
@click.option("--concurrency", "concurrencies", multiple=True, type=click.IntRange(min=1),
              help="Requests kept in flight; repeatable [default: 32 and 64, the mission's batch sizes].")
@click.option("--warmup", default=None, type=click.IntRange(min=0),
              help="Warm-up requests before each level, not counted [default: the concurrency, capped at 8].")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch", show_default=True,
              help="onnxruntime: CHECKPOINT is an fp32 export directory (`trtfalcon export --dtype fp32`).")
@click.option("--seed", default=0, show_default=True, help="Seed of the synthetic dataset.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/bench"), show_default=True,
              help="Where report.json and throughput.png go.")
@click.option("--tts", "tts_workload", is_flag=True,
              help="The DeepConf workload instead: per prompt, --tts-budget traces offline then online (same seeds); "
                   "reports output tokens/s of both and the tokens online saved.")
@click.option("--tts-budget", default=16, show_default=True, type=click.IntRange(min=1), help="With --tts: traces per prompt.")
@click.option("--tts-warmup", default=4, show_default=True, type=click.IntRange(min=1),
              help="With --tts: warm-up traces per prompt (online).")
@click.option("--tts-eta", default=10.0, show_default=True, type=click.FloatRange(0, 100, min_open=True, max_open=True),
              help="With --tts: percent of traces kept (10 = DeepConf-low, 90 = DeepConf-high).")
@click.option("--tts-window", default=32, show_default=True, type=click.IntRange(min=1),
              help="With --tts: tokens of the group confidence window (DeepConf's 2048 suits long traces).")
@click.option("--tts-extractor", default="toy", show_default=True, help="With --tts: " + EXTRACTOR_HELP)
@runtime_option_flags
@handle_errors
def bench(checkpoint: Path, dataset: Path | None, isl: int, osl: int, isl_stdev: float, osl_stdev: float,
          num_requests: int | None, concurrencies: tuple[int, ...], warmup: int | None, backend: str, seed: int,
          out_dir: Path, tts_workload: bool, tts_budget: int, tts_warmup: int, tts_eta: float, tts_window: int,
          tts_extractor: str, **kw: Any) -> None:
    """Measure throughput with in-flight batching at fixed concurrencies (the trtllm-bench method).

    EOS is ignored so every request produces exactly its output length; warm-up requests are not counted.
    Prints a table and writes OUT/report.json (request/s, output tokens/s, tokens/s per GPU or per process on
    CPU, TTFT and TPOT P50/P90/P99, mean live batch, host overhead, a per-step log) and OUT/throughput.png.

    With --tts, the DeepConf workload: each prompt of the dataset (or --num-requests synthetic prompts, default 4)
    gets --tts-budget traces of up to --osl tokens (EOS ends a trace), all prompts in flight in one engine of
    --max-batch-size; offline (every trace to its end) then online (--tts-warmup traces set the threshold, the
    rest stop below it), same seeds (--seed + k for trace k). report.json's "tts" section: tokens generated,
    seconds and output tokens/s of each, tokens saved = offline - online tokens (and %). On a random-weight model
    the confidences mean nothing, so which traces stop and the votes are arbitrary; the throughput and the
    tokens are still the engine's real work. Use a trained model (tests/data/toy-reasoner) for meaningful votes.

    \b
    Examples:
      trtfalcon bench runs/tiny-deploy --isl 64 --osl 64 --concurrency 32 --concurrency 64
      trtfalcon bench ENGINE_DIR --backend tensorrt --isl 512 --osl 32768 --num-requests 128   (on a GPU)
      trtfalcon bench runs/tiny-deploy --tts --isl 32 --osl 128 --num-requests 4 --tts-budget 16 --tts-warmup 4
      trtfalcon bench tests/data/toy-reasoner --tts --dataset toy.jsonl --tts-budget 32 --tts-window 16
    """
    if tts_workload:
        _bench_tts(checkpoint, dataset, isl, osl, isl_stdev, num_requests, concurrencies, backend, seed, out_dir,
                   _tts_config(budget=tts_budget, warmup=tts_warmup, mode="online", eta=tts_eta,
                               window=tts_window, max_new_tokens=osl, seed=seed),
                   _answer_extractor(tts_extractor), kw)
        return
    from rich.console import Console
    from rich.progress import Progress

    from trtfalcon.bench.dataset import load_jsonl, token_norm_dist
    from trtfalcon.bench.report import plot, print_table, write_report
    from trtfalcon.bench.throughput import run_concurrency
    from trtfalcon.runtime.llm import LLMEngine

    concurrencies = concurrencies or (32, 64)
    kw["max_batch_size"] = max(max(concurrencies), kw["max_batch_size"])
    kw["max_num_tokens"] = max(kw["max_num_tokens"], kw["max_batch_size"])
    opts = _pop_runtime_options(kw)
    console = Console(stderr=True)
    engine = LLMEngine.from_options(backend, checkpoint, opts)  # every level runs on it, its concurrency in flight
    executor, cfg, lim = engine.executor, engine.config, engine.limits
    too_many = [c for c in concurrencies if c > lim.max_batch_size]
    if too_many:  # reporting a level the executor cannot run as if it had run would mislabel the numbers
        raise click.UsageError(f"--concurrency {too_many[0]}: this {backend} executor runs at most "
                               f"{lim.max_batch_size} sequences per step (its engine profile or state slots)")
    max_seq_len = lim.max_seq_len
    device = str(getattr(executor, "device", opts.device))
    results = []
    with Progress(console=console, transient=True, disable=not sys.stderr.isatty()) as progress:
        for c in concurrencies:
            n = num_requests or 2 * c
            if dataset:
                requests = load_jsonl(dataset)
            else:
                requests = token_norm_dist(n, isl, osl, isl_stdev, osl_stdev, vocab_size=cfg.vocab_size,
                                           seed=seed, max_seq_len=max_seq_len)
            w = min(c, 8) if warmup is None else warmup
            warm = token_norm_dist(w, isl, osl, vocab_size=cfg.vocab_size, seed=seed + 1,
                                   max_seq_len=max_seq_len) if w and not dataset else requests[:w]
            task = progress.add_task(f"concurrency {c}", total=len(requests))
            r = run_concurrency(engine, warm + requests, concurrency=c, warmup=len(warm),
                                on_finish=lambda o, t=task: progress.advance(t))
            results.append(r)
            for err in r.errors[:3]:
                console.print(f"[red]error[/red] {err}")
    print_table(results, device, Console())
    meta = {"checkpoint": str(checkpoint), "backend": backend, "kernels": getattr(executor, "kernels", None),
            "device": device, "dataset": str(dataset) if dataset else
            {"type": "token-norm-dist", "isl": isl, "osl": osl, "isl_stdev": isl_stdev, "osl_stdev": osl_stdev,
             "seed": seed}, "max_num_tokens": lim.max_num_tokens, "max_seq_len": max_seq_len,
            "block_size": executor.cache_spec.block_size, "num_blocks": executor.cache_spec.num_blocks,
            "model": cfg.summary()}
    write_report(out_dir / "report.json", results, meta)
    workload = dataset.name if dataset else f"isl {isl} -> osl {osl}"
    plot(out_dir / "throughput.png", results, f"{backend} on {device}: {workload}")
    click.echo(f"report: {out_dir / 'report.json'}   plot: {out_dir / 'throughput.png'}")
    failed = sum(len(r.errors) for r in results)
    if failed:  # the figures above count only the requests that completed
        raise click.ClickException(f"{failed} request(s) failed; the report counts only the completed ones")


# ------------------------------------------------------------------------------------------------------ tts
def _answer_extractor(name: str) -> Any:
    from trtfalcon.tts.answers import EXTRACTORS, REGEX_PREFIX, get_extractor

    if name not in EXTRACTORS and not name.startswith(REGEX_PREFIX):
        raise click.BadParameter(f"expected {', '.join(EXTRACTORS)} or {REGEX_PREFIX}PATTERN, found {name!r}",
                                 param_hint="--extractor")
    try:
        return get_extractor(name)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--extractor") from None


def _trace_text(checkpoint: Path, tokenizer_dir: Path | None) -> tuple[Any, Callable[[list[int]], str]]:
    """(tokenizer or None, decode): the checkpoint's tokenizer (serve/text.py loads it as the server does), or, when
    there is none, token ids written as text ("12 7 9") for the extractor to read."""
    from trtfalcon.serve.text import has_tokenizer, load_tokenizer

    directory = tokenizer_dir or checkpoint
    if not has_tokenizer(directory):
        if tokenizer_dir is not None:
            raise click.BadParameter(f"{tokenizer_dir}: expected tokenizer.json or tokenizer.model, found neither",
                                     param_hint="--tokenizer")
        return None, lambda ids: " ".join(map(str, ids))
    tok = load_tokenizer(directory)
    return tok, lambda ids: tok.decode(ids, skip_special_tokens=True)


def tts_config_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    """DeepConf's settings (TTSConfig) as the `tts` command's options (`bench --tts` has its own --tts-* flags:
    a workload's few settings, with defaults sized for a benchmark)."""
    from trtfalcon.tts.deepconf import DEFAULT_TOP_K

    options = [
        click.option("--budget", default=64, show_default=True, type=click.IntRange(min=1),
                     help="Traces per prompt in all, warm-up included."),
        click.option("--warmup", default=16, show_default=True, type=click.IntRange(min=1),
                     help="online: warm-up traces that run to their end and set the stop threshold (at most "
                          "--budget; equal to it, no trace can be stopped)."),
        click.option("--mode", type=click.Choice(["online", "offline"]), default="online", show_default=True,
                     help="online: stop traces whose window confidence falls below the warm-up threshold; offline: "
                          "run every trace to its end, then vote over the top --eta%."),
        click.option("--eta", default=10.0, show_default=True, type=click.FloatRange(0, 100, min_open=True,
                                                                                       max_open=True),
                     help="Percent of traces kept: 10 = DeepConf-low, 90 = DeepConf-high."),
        click.option("--window", default=2048, show_default=True, type=click.IntRange(min=1),
                     help="Tokens of the sliding-window group confidence (shorter for short traces, e.g. 8 on "
                          "the toy reasoner)."),
        click.option("--top-k", default=DEFAULT_TOP_K, show_default=True, type=click.IntRange(min=1),
                     help="Log-probabilities averaged into each token's confidence (not a sampling filter)."),
        click.option("--temperature", default=0.6, show_default=True, type=click.FloatRange(min=0, min_open=True)),
        click.option("--top-p", default=0.95, show_default=True,
                     type=click.FloatRange(min=0.0, max=1.0, min_open=True)),
        click.option("--seed", default=0, show_default=True, help="Trace k of every prompt has seed + k."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _tts_config(**values: Any) -> Any:
    """TTSConfig from the options; click checked each range, the one rule across options is checked here so the
    message names the flag."""
    from trtfalcon.tts.run import TTSConfig

    if values["mode"] == "online" and values["warmup"] > values["budget"]:
        raise click.BadParameter(f"expected at most --budget ({values['budget']}) in online mode: the warm-up "
                                 f"traces are part of the budget, found {values['warmup']}", param_hint="--warmup")
    return TTSConfig(**values)


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", help="Prompt text, tokenized with the checkpoint's tokenizer (or --tokenizer's).")
@click.option("--prompt-ids", help="Comma-separated prompt token ids, e.g. 1,2,3.")
@tts_config_flags
@click.option("--max-new-tokens", default=None, type=click.IntRange(min=1),
              help="Tokens per trace at most [default: what --max-seq-len leaves after the prompt].")
@click.option("--extractor", default="toy", show_default=True, help=EXTRACTOR_HELP)
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Tokenizer directory [default: CHECKPOINT]. Without one, --prompt-ids only, and answers are read "
                   "from the token ids written as text.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True, help="onnxruntime: CHECKPOINT is an fp32 export directory (`trtfalcon export`).")
@runtime_option_flags
@click.option("--traces", "show_traces", is_flag=True, help="Also print one line per trace.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: answer, vote table, tokens, every trace.")
@handle_errors
def tts(checkpoint: Path, prompt: str | None, prompt_ids: str | None, budget: int, warmup: int, mode: str,
        eta: float, window: int, top_k: int, temperature: float, top_p: float, seed: int,
        max_new_tokens: int | None, extractor: str, tokenizer_dir: Path | None, backend: str, show_traces: bool,
        as_json: bool, **kw: Any) -> None:
    """Test-time scaling with DeepConf: many reasoning traces of one prompt, one confidence-voted answer.

    online (DeepConf-online): --warmup traces run to their end; the threshold is the (100 - eta) percentile of
    their lowest window confidences; the other traces are stopped in the step where their window confidence falls
    below it. Traces vote if not stopped and at or above the threshold, weighted by confidence. offline: --budget
    traces, the top --eta% by lowest window confidence vote. Prints the voted answer, the vote table (answer,
    votes, weight) and the tokens generated (every trace's, warm-up included). All traces run in flight in one
    engine, sharing the prompt's prefill.

    \b
    Examples:
      trtfalcon tts tests/data/toy-reasoner --prompt 'Q:376*82;' --budget 32 --warmup 8 --window 8 --temperature 1
      trtfalcon tts tests/data/toy-reasoner --prompt 'Q:376*82;' --budget 32 --mode offline --eta 90 --window 8
      trtfalcon tts MODEL --prompt "$(cat question.txt)" --budget 256 --extractor boxed --max-batch-size 256
      trtfalcon tts runs/tiny-deploy --prompt-ids 1,2,3 --budget 8 --warmup 2 --extractor 'regex:(\\d+)$' --json
    """
    from trtfalcon.runtime.llm import LLMEngine
    from trtfalcon.runtime.prompts import parse_ids
    from trtfalcon.tts.run import run_tts

    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt or --prompt-ids")
    answer_of = _answer_extractor(extractor)
    config = _tts_config(budget=budget, warmup=warmup, mode=mode, eta=eta, top_k=top_k, window=window,
                         temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    tok, decode = _trace_text(checkpoint, tokenizer_dir)
    if prompt is not None:
        if tok is None:
            raise click.UsageError(f"--prompt needs a tokenizer: {checkpoint} has no tokenizer.json or "
                                   "tokenizer.model; give --tokenizer DIR or --prompt-ids")
        ids = list(tok.encode(prompt))
    else:
        ids = parse_ids(prompt_ids, "--prompt-ids")
        if tok is None and not as_json:
            click.echo("note: no tokenizer, answers are read from the token ids written as text", err=True)
    opts = _pop_runtime_options(kw)
    engine = LLMEngine.from_options(backend, checkpoint, opts, log_steps=False)
    result = run_tts(engine, ids, config, answer_of, decode=decode, progress=not as_json)
    if as_json:
        click.echo(json.dumps(result.as_dict(traces=True)))
        return
    click.echo(f"answer: {result.answer if result.answer is not None else '(none)'}")
    how = (f"online, threshold {result.threshold:.4f}, {result.num_stopped} of {budget} traces stopped"
           if mode == "online" else f"offline, top {eta:g}% by lowest window confidence")
    click.echo(f"vote ({how}):")
    click.echo(f"  {'answer':<24} {'votes':>5} {'weight':>10}")
    for answer, votes, weight in result.vote.table:
        click.echo(f"  {answer:<24} {votes:>5} {weight:>10.4f}")
    if show_traces:
        for t in result.traces:
            click.echo(f"  trace {t.index:>3} seed {t.seed:<6} {'warm-up' if t.warmup else '       '} "
                       f"{t.finish_reason:<10} {t.num_tokens:>6} tokens  lowest window {t.scores.lowest_window:.4f}"
                       f"  answer {t.answer}")
    click.echo(f"tokens generated: {result.tokens_generated:,} ({budget} traces, {result.num_answered} with an "
               f"answer)")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)


def _bench_tts(checkpoint: Path, dataset: Path | None, isl: int, osl: int, isl_stdev: float,
               num_requests: int | None, concurrencies: tuple[int, ...], backend: str, seed: int, out_dir: Path,
               config: Any, extractor: Any, kw: dict[str, Any]) -> None:
    """`bench --tts`: the DeepConf workload (bench/tts.py), its table and report.json."""
    from rich.console import Console

    from trtfalcon.bench.dataset import load_jsonl, token_norm_dist
    from trtfalcon.bench.report import write_report
    from trtfalcon.bench.tts import print_tts_table, run_tts_bench
    from trtfalcon.runtime.llm import LLMEngine

    if concurrencies:
        raise click.UsageError("--concurrency: not used with --tts (every prompt's traces run in flight; size the "
                               "batch with --max-batch-size)")
    opts = _pop_runtime_options(kw)
    engine = LLMEngine.from_options(backend, checkpoint, opts, log_steps=False)
    cfg, lim = engine.config, engine.limits
    if dataset:
        prompts = [r.input_ids for r in load_jsonl(dataset)]
    else:
        prompts = [r.input_ids for r in token_norm_dist(num_requests or 4, isl, osl, isl_stdev, vocab_size=cfg.vocab_size,
                                                        seed=seed, max_seq_len=lim.max_seq_len)]
    _, decode = _trace_text(checkpoint, None)
    result = run_tts_bench(engine, prompts, config, extractor, decode, progress=True)
    device = str(getattr(engine.executor, "device", opts.device))
    print_tts_table(result, device, Console())
    meta = {"checkpoint": str(checkpoint), "backend": backend, "kernels": getattr(engine.executor, "kernels", None),
            "device": device, "workload": "tts", "dataset": str(dataset) if dataset else
            {"type": "token-norm-dist", "isl": isl, "isl_stdev": isl_stdev, "seed": seed},
            "max_batch_size": lim.max_batch_size, "max_num_tokens": lim.max_num_tokens, "max_seq_len": lim.max_seq_len,
            "model": cfg.summary()}
    write_report(out_dir / "report.json", [], meta, tts=result.as_dict())
    click.echo(f"report: {out_dir / 'report.json'}")


# ------------------------------------------------------------------------------------------------------ build
@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Build config YAML (build_configs/*.yaml): precision, batch, sequence lengths, GPU, profile.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Hugging Face (bf16 or ModelOpt FP8) or deploy checkpoint. Not needed with --plan-only.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Build directory (one subdirectory per stage).")
@click.option("--plan-only", is_flag=True, help="Validate the config and print the memory plan; exit 1 if it does not fit.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it holds another build (same config + checkpoint: reused).")
@handle_errors
def build(config_path: Path, checkpoint: Path | None, out_dir: Path | None, plan_only: bool, overwrite: bool) -> None:
    """Build a TensorRT engine from a checkpoint, as a build config says (TensorRT 11 for H100/H200/B200, TensorRT
    for RTX, which needs no GPU to build, for the configs' A100 / RTX GPUs).

    Runs the stages the config and checkpoint need: quantize (FP8 asked of a bf16 HF checkpoint), convert, export
    (ONNX with plugin nodes and FP8 Q/DQ), compile the plugin kernels for target.archs, then the strongly typed
    engine with the plugins registered and the config's optimization profile: OUT/engine/model.engine +
    manifest.json. First the memory planner checks that weights + KV cache + Mamba state + activations fit the
    GPU, and says why not. Where TensorRT or a GPU is missing, everything before the engine is written, and the
    command exits 1 saying what is missing and how to get it; re-running it there reuses the finished stages.

    \b
    Examples:
      trtfalcon build --config build_configs/h100-fp8-fp8kv-b64-isl512-osl32k.yaml --plan-only
      trtfalcon build --config build_configs/tiny-demo.yaml --checkpoint runs/tiny-hf --out runs/tiny-build
      trtfalcon build --config build_configs/rtxpro6000-fp8-b32-isl512-osl32k.yaml --checkpoint runs/hf --out runs/b
    """
    from trtfalcon.engine.config import load_build_config, plan_memory

    bc = load_build_config(config_path)
    if plan_only:
        from trtfalcon.config import FalconH1Config

        cfg = FalconH1Config.from_json_file(checkpoint) if checkpoint else None
        plan = plan_memory(bc, cfg)
        click.echo(f"{bc.name} ({'checkpoint ' + str(checkpoint) if checkpoint else 'preset ' + bc.model.preset}): "
                   f"{plan.verdict()}")
        if not plan.fits:
            raise click.exceptions.Exit(1)
        return
    if checkpoint is None or out_dir is None:
        raise click.UsageError("--checkpoint and --out are required (unless --plan-only)")
    from trtfalcon.engine.build import run_build

    result = run_build(bc, checkpoint, out_dir, overwrite=overwrite, log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote engine {result.engine_dir} (build record {out_dir / 'build.json'})")


# ------------------------------------------------------------------------------------------------------ plugins
@main.group()
def plugins() -> None:
    """The custom TensorRT plugins (Mamba2 conv + SSD scan, paged attention, gated RMSNorm): Triton kernels."""


@plugins.command("compile")
@click.option("--arch", "archs", multiple=True, default=("sm_90",), show_default=True,
              help="GPU architecture to compile for; repeatable (sm_90 = H100/H200, sm_100 = B200).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Output directory: PTX + cubin + JSON per kernel, manifest.json.")
@click.option("--preset", default="7b", show_default=True, help="Model shape the kernels are specialised for.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Take the model shape from this checkpoint's config.json instead of --preset.")
@click.option("--dtype", "dtypes", multiple=True, type=DTYPE_CHOICE,
              help="Only this activation (compute) dtype; repeatable [default: fp32 and bf16].")
@click.option("--kv-cache-dtype", "kv_cache", multiple=True, type=click.Choice(KV_CACHE_NAMES),
              help="Only this KV cache dtype; repeatable [default: each activation dtype, and fp8 on sm_89+].")
@click.option("--ssm-state-dtype", "ssm_state", multiple=True, type=click.Choice(SSM_STATE_NAMES),
              help="Only this SSM state dtype; repeatable [default: fp32 and bf16].")
@click.option("--conv-state-dtype", "conv_state", multiple=True, type=DTYPE_CHOICE,
              help="Only this conv state dtype; repeatable [default: each activation dtype, and fp32].")
@click.option("--engine-kernels", is_flag=True,
              help="Only the kernels an exported engine holds (each op's general kernel, the model's gated-norm "
                   "variant), not the decode/recurrent ones the torch executor also picks.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@handle_errors
def plugins_compile(archs: tuple[str, ...], out_dir: Path, preset: str, checkpoint: Path | None,
                    dtypes: tuple[str, ...], kv_cache: tuple[str, ...], ssm_state: tuple[str, ...],
                    conv_state: tuple[str, ...], engine_kernels: bool, overwrite: bool) -> None:
    """Compile the plugin kernels ahead of time, on this machine, no GPU needed.

    Triton compiles each kernel for each architecture and configuration (activation dtype, state dtype,
    prefill/decode variants) to PTX, the form TensorRT's ahead-of-time plugins embed in an engine. Registers
    and spills come from ptxas on the shipped PTX. Exits non-zero if any kernel spills registers.
    Every configuration by default; the dtype options and --engine-kernels narrow it the way `build` does for
    its engine (a build config's precision: --dtype COMPUTE --kv-cache-dtype KV --ssm-state-dtype SSM
    --conv-state-dtype CONV --engine-kernels compiles what its kernels stage compiles).

    \b
    Examples:
      trtfalcon plugins compile --arch sm_90 --arch sm_100 --out runs/kernels
      trtfalcon plugins compile --arch sm_89 --dtype bf16 --kv-cache-dtype fp8 --ssm-state-dtype fp32 \\
          --conv-state-dtype bf16 --engine-kernels --out runs/kernels-sm89
    """
    from trtfalcon.config import FalconH1Config
    from trtfalcon.config import preset as get_preset
    from trtfalcon.plugins.aot import KernelSelection, compile_kernels, print_kernel_report

    every = KernelSelection()
    selection = KernelSelection(dtypes or every.dtypes, kv_cache or None, ssm_state or every.ssm_state,
                                conv_state or None, engine_kernels=engine_kernels)
    cfg = FalconH1Config.from_json_file(checkpoint) if checkpoint else get_preset(preset)
    with progress_messages("compile") as progress:
        manifest = compile_kernels(list(archs), out_dir, config=cfg, selection=selection, overwrite=overwrite,
                                   progress=progress)
    print_kernel_report(manifest, out_dir)


# ------------------------------------------------------------------------------------------------------ serve
@main.group()
def serve() -> None:
    """Serve a model: generate a Triton Inference Server model repository that runs the trtfalcon runtime."""


@serve.command("triton")
@click.option("--engine", "engine_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A TensorRT engine directory (from `build`) [default backend: tensorrt].")
@click.option("--checkpoint", "checkpoint_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A deploy or Hugging Face checkpoint directory [default backend: torch], or an ONNX export "
                   "directory with --backend onnxruntime.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model repository (created if missing); the model goes to OUT/MODEL_NAME.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default=None,
              help="Executor inside the server [default: tensorrt with --engine, torch with --checkpoint].")
@click.option("--model-name", default="trtfalcon", show_default=True, help="Name clients address.")
@click.option("--instances-per-gpu", default=1, show_default=True, type=click.IntRange(min=1),
              help="Model instances per GPU (each its own engine and KV cache); on CPU, the instance count.")
@click.option("--gpus", default=None, help="Comma-separated GPU ids, e.g. 0,1,2,3: --instances-per-gpu engines on "
                                          "each (data parallel) [default: CPU instances].")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Tokenizer directory [default: the model directory if it has tokenizer.json]. Without one the "
                   "model takes and returns token ids only.")
@click.option("--copy-model", is_flag=True,
              help="Copy the checkpoint/engine into the repository (self-contained) instead of referencing its path.")
@click.option("--default-max-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="max_tokens of requests that do not send one (capped by max_seq_len).")
@click.option("--max-logprobs", default=20, show_default=True, type=click.IntRange(min=0),
              help="Largest top-k of log-probs a request may ask for.")
@click.option("--seed", default=0, show_default=True, help="Engine seed for sampled requests that send no seed.")
@click.option("--overwrite", is_flag=True, help="Replace OUT/MODEL_NAME if it exists.")
@click.option("--launch", is_flag=True, help="Then start tritonserver on OUT and serve until Ctrl-C (docs/serving.md).")
@click.option("--tritonserver", "tritonserver_path", type=click.Path(exists=True, path_type=Path),
              help="With --launch: the tritonserver binary or an unpacked nvidia-pytriton wheel [default: an "
                   "installed nvidia-pytriton, then tritonserver on PATH, then /opt/tritonserver].")
@click.option("--host", default="127.0.0.1", show_default=True, help="With --launch: address to listen on.")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="With --launch.")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(0, 65535), help="With --launch.")
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(0, 65535), help="With --launch.")
@runtime_option_flags
@handle_errors
def serve_triton(engine_dir: Path | None, checkpoint_dir: Path | None, out_dir: Path, backend: str | None,
                 model_name: str, instances_per_gpu: int, gpus: str | None, tokenizer_dir: Path | None,
                 copy_model: bool, default_max_tokens: int, max_logprobs: int, seed: int, overwrite: bool,
                 launch: bool, tritonserver_path: Path | None, host: str, http_port: int, grpc_port: int,
                 metrics_port: int, **kw: Any) -> None:
    """Write a Triton model repository serving a model with the trtfalcon runtime (Python backend).

    Writes OUT/MODEL_NAME/{config.pbtxt, 1/model.py, 1/trtfalcon.json}: a decoupled model (token streaming)
    with Triton's batching off (the runtime batches in flight), inputs text_input or input_ids, max_tokens,
    temperature, top_p, top_k, seed, stop_words, stop_token_ids, ignore_eos, stream, logprobs; outputs
    text_output, output_ids, finish_reason, token counts, log-probs. The runtime options size each instance's
    engine; the device comes from the instance group (--gpus). See docs/serving.md.

    \b
    Examples:
      trtfalcon serve triton --checkpoint runs/tiny-deploy --out runs/triton-repo --max-batch-size 8
      trtfalcon serve triton --engine runs/7b-engine --out /models --gpus 0,1,2,3 --max-batch-size 64
      tritonserver --model-repository runs/triton-repo
      trtfalcon serve triton --checkpoint runs/tiny-deploy --out runs/triton-repo --overwrite --launch
    """
    from dataclasses import asdict

    from trtfalcon.serve.repository import InstancePlan, write_repository

    if (engine_dir is None) == (checkpoint_dir is None):
        raise click.UsageError("give exactly one of --engine or --checkpoint")
    ctx = click.get_current_context()
    launch_only = [f"--{name.replace('_', '-')}" for name in ("host", "http_port", "grpc_port", "metrics_port")
                   if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
    launch_only += ["--tritonserver"] if tritonserver_path is not None else []
    if launch_only and not launch:
        raise click.UsageError(f"{', '.join(launch_only)}: only used with --launch")
    gpu_ids: tuple[int, ...] = ()
    if gpus:
        try:
            gpu_ids = tuple(int(g) for g in gpus.replace(" ", "").split(",") if g != "")
        except ValueError:
            raise click.BadParameter(f"expected comma-separated GPU ids such as 0,1, found {gpus!r}",
                                     param_hint="--gpus") from None
        if not gpu_ids or min(gpu_ids) < 0 or len(set(gpu_ids)) != len(gpu_ids):
            raise click.BadParameter(f"expected distinct GPU ids >= 0 such as 0,1, found {gpus!r}", param_hint="--gpus")
    opts = _pop_runtime_options(kw)
    if opts.device != "cpu" and not gpu_ids:
        raise click.BadParameter(f"each instance's device comes from --gpus; found --device {opts.device} without "
                                 "--gpus", param_hint="--device")
    backend = backend or ("tensorrt" if engine_dir is not None else "torch")
    runtime = {k: v for k, v in asdict(opts).items() if k != "device"}
    dest = write_repository(
        out_dir, model_dir=engine_dir or checkpoint_dir, backend=backend, model_name=model_name,
        plan=InstancePlan(count=instances_per_gpu, gpus=gpu_ids), runtime=runtime,
        limits={"default_max_tokens": default_max_tokens, "max_logprobs": max_logprobs},
        tokenizer_dir=tokenizer_dir, copy_model=copy_model, seed=seed, overwrite=overwrite)
    where = f"{instances_per_gpu} per GPU on GPUs {','.join(map(str, gpu_ids))}" if gpu_ids \
        else f"{instances_per_gpu} on CPU"
    click.echo(f"wrote {dest} ({backend} backend; instances: {where})")
    click.echo(f"  {dest / 'config.pbtxt'}\n  {dest / '1' / 'model.py'}\n  {dest / '1' / 'trtfalcon.json'}")
    if not launch:
        click.echo(f"serve it: tritonserver --model-repository {out_dir.resolve()}   (trtfalcon installed in its "
                   "Python), or add --launch")
        return
    from trtfalcon.serve.server import TritonServer, find_tritonserver, serve_forever

    server = TritonServer(out_dir, install=find_tritonserver(tritonserver_path), host=host, http_port=http_port,
                          grpc_port=grpc_port, metrics_port=metrics_port, announce=click.echo)
    raise click.exceptions.Exit(serve_forever(server, click.echo))


# ------------------------------------------------------------------------------------------------------ demo
@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Working directory for every artifact (replaced if it exists).")
@click.option("--isl", default=32, show_default=True, type=click.IntRange(min=1), help="Bench input length.")
@click.option("--osl", default=32, show_default=True, type=click.IntRange(min=1), help="Bench output length.")
@click.option("--skip-kernels", is_flag=True, help="Skip the ahead-of-time kernel build (about a minute).")
@handle_errors
def demo(out_dir: Path, isl: int, osl: int, skip_kernels: bool) -> None:
    """The embedded default: every pipeline stage that runs on this machine, on a tiny model, in a few minutes.

    Each step prints what it did and where its artifact went; see trtfalcon/demo.py for the list of steps.
    """
    from trtfalcon.demo import run_demo

    run_demo(out_dir, isl=isl, osl=osl, compile_kernels=not skip_kernels, echo=click.echo,
             heading=lambda text: click.secho(text, bold=True))


# ------------------------------------------------------------------------------------------------------ helpers
def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * mult)
            break
    raise click.BadParameter(f"expected a size such as 500MB or 2GB, found {text!r}", param_hint="--max-shard-size")


if __name__ == "__main__":
    main()
