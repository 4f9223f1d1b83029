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

DTYPE_CHOICE = click.Choice(["bf16", "fp16", "fp32"])


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


def _progress(total: int, description: str):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[tensor]}"), transient=False, disable=not sys.stderr.isatty(),
    )
    task = progress.add_task(description, total=total, tensor="")
    return progress, task


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="trtfalcon")
def main() -> None:
    """Deploy Falcon-H1 / Falcon-H1R (hybrid attention + Mamba2) models on NVIDIA GPUs.

    \b
    The pipeline, one command per stage, one inspectable directory per artifact:
      synth     make a random HF-format checkpoint of a known shape (tests, benchmarks, demo)
      convert   HF checkpoint -> deploy checkpoint (muP multipliers folded, q/k/v and gate/up fused)
      generate  run prompts through the model (reference oracle or the in-flight-batching runtime)

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
    elem = 2 if dtype != "fp32" else 4
    total = sum(_numel(s) * elem for s in hf_tensor_shapes(cfg).values())
    progress, task = _progress(total, f"synth {preset}")
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
    Streams one row chunk at a time (peak memory ~ a few hundred MB whatever the model size) and writes
    atomically: on any error nothing is left at OUT_DIR.

    \b
    Example:  trtfalcon convert runs/tiny-hf runs/tiny-deploy --dtype fp32
    """
    from trtfalcon.checkpoint.convert import convert_checkpoint

    state: dict[str, Any] = {}

    def start(total: int) -> None:
        state["progress"], state["task"] = _progress(total, "convert")
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


# ------------------------------------------------------------------------------------------------------ generate
@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt-ids", help="Comma-separated prompt token ids, e.g. 1,2,3.")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL, one {"prompt_ids": [...], "max_new_tokens": N} per line; run in flight together.')
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 = greedy.")
@click.option("--seed", default=0, show_default=True, help="Sampling seed (per request).")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Compute dtype [default: the checkpoint's; fp32 for HF].")
@click.option("--backend", type=click.Choice(["reference"]), default="reference", show_default=True,
              help="reference: the unbatched oracle model.")
@click.option("--json", "as_json", is_flag=True, help='One JSON object per prompt: {"token_ids": [...], ...}.')
@handle_errors
def generate(
    checkpoint: Path, prompt_ids: str | None, prompts_file: Path | None, max_new_tokens: int, temperature: float,
    seed: int, dtype: str | None, backend: str, as_json: bool,
) -> None:
    """Generate tokens for one or many prompts.

    CHECKPOINT is a deploy checkpoint (from `convert`) or a Hugging Face checkpoint (converted in memory).

    \b
    Examples:
      trtfalcon generate runs/tiny-deploy --prompt-ids 1,2,3 --max-new-tokens 8 --json
      trtfalcon generate runs/tiny-deploy --prompts-file prompts.jsonl --json
    """
    from trtfalcon.model.generate import reference_generate
    from trtfalcon.model.reference import ReferenceModel
    from trtfalcon.model.weights import load_weights
    from trtfalcon.runtime.prompts import load_prompts

    weights = load_weights(checkpoint, dtype)
    cfg = weights.config
    prompts = load_prompts(prompt_ids, prompts_file, max_new_tokens, cfg.vocab_size, cfg.max_position_embeddings)
    model = ReferenceModel(weights)
    for i, p in enumerate(prompts):
        tokens = reference_generate(
            model, p.prompt_ids, p.max_new_tokens, temperature=temperature, seed=seed, stop_token_ids=cfg.eos_token_id,
        )
        if as_json:
            click.echo(json.dumps({"index": i, "prompt_ids": p.prompt_ids, "token_ids": tokens}))
        else:
            click.echo(",".join(map(str, tokens)))


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
