"""`trtfalcon demo`: the whole pipeline that runs on this machine, on a tiny model, with no arguments.

Each step is a function of the shared state below; a new pipeline stage adds its step to STEPS, so the demo
always exercises everything that can run here. Steps print what they did and where the artifact went (through
`echo`: the CLI passes click's). A library module: failures are trtfalcon's errors (trtfalcon/errors.py), which
the CLI prints as one line and exit code 1.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trtfalcon.errors import CheckpointError, TrtFalconError
from trtfalcon.runtime.options import RuntimeOptions


class DemoCheckError(TrtFalconError):
    """Two paths of the pipeline that must agree do not (the runtime vs the reference model, onnxruntime vs the
    torch executor): a bug in trtfalcon."""


@dataclass
class DemoState:
    out_dir: Path
    isl: int
    osl: int
    compile_kernels: bool = True
    artifacts: dict[str, Path] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    echo: Callable[[str], None] = print


def step_synth(st: DemoState) -> str:
    from trtfalcon.checkpoint.synth import synth_checkpoint
    from trtfalcon.config import preset_dict

    st.artifacts["HF checkpoint"] = synth_checkpoint(preset_dict("tiny"), st.out_dir / "tiny-hf", dtype="fp32")
    return "tiny random Falcon-H1 checkpoint in Hugging Face format"


def step_convert(st: DemoState) -> str:
    from trtfalcon.checkpoint.convert import convert_checkpoint

    st.artifacts["deploy checkpoint"] = convert_checkpoint(
        st.artifacts["HF checkpoint"], st.out_dir / "tiny-deploy", dtype="fp32"
    )
    return "muP multipliers folded, q/k/v and gate/up fused"


def _options(st: DemoState) -> RuntimeOptions:
    return RuntimeOptions(max_batch_size=64, max_num_tokens=256, max_seq_len=st.isl + st.osl + 64, block_size=16)


def step_generate(st: DemoState) -> str:
    from trtfalcon.bench.dataset import token_norm_dist
    from trtfalcon.model.generate import reference_generate
    from trtfalcon.model.reference import ReferenceModel
    from trtfalcon.model.weights import load_weights
    from trtfalcon.runtime.llm import LLMEngine
    from trtfalcon.runtime.request import Request, SamplingParams

    opts = replace(_options(st), max_batch_size=8, max_num_tokens=64)
    engine = LLMEngine.from_options("torch", st.artifacts["deploy checkpoint"], opts)
    prompts = [r.input_ids for r in token_norm_dist(8, 24, 1, 12, vocab_size=engine.config.vocab_size, seed=1)]
    outs = engine.generate(
        [Request(str(i), p, SamplingParams(max_new_tokens=12, ignore_eos=True)) for i, p in enumerate(prompts)]
    )
    ref = ReferenceModel(load_weights(st.artifacts["deploy checkpoint"]))
    same = sum(o.token_ids == reference_generate(ref, p, 12) for o, p in zip(outs, prompts))
    if same != len(prompts):
        raise DemoCheckError(f"the runtime gives the reference model's greedy tokens for {same} of {len(prompts)} "
                             "prompts, expected all; please report this")
    return f"{same}/{len(prompts)} prompts in flight give the reference model's greedy tokens exactly"


def step_kernels(st: DemoState) -> str:
    if not st.compile_kernels:
        return "skipped (--skip-kernels)"
    from trtfalcon.config import preset
    from trtfalcon.plugins.aot import compile_kernels, print_kernel_report
    from trtfalcon.progress import progress_messages

    out = st.out_dir / "kernels"
    with progress_messages("compile") as progress:
        manifest = compile_kernels(["sm_90"], out, config=preset("7b"), overwrite=True, progress=progress)
    print_kernel_report(manifest, out)
    st.artifacts["plugin kernels (sm_90)"] = out
    return f"{len(manifest['kernels'])} kernels compiled for sm_90 (7B shapes), none spilling"


def step_export(st: DemoState) -> str:
    import torch

    from trtfalcon.export import export_onnx, read_manifest
    from trtfalcon.runtime.backends import create_executor
    from trtfalcon.runtime.contract import StepBatch

    out = export_onnx(st.artifacts["deploy checkpoint"], st.out_dir / "tiny-onnx")
    st.artifacts["ONNX export"] = out
    manifest = read_manifest(out)
    # one prefill step and one decode step through both executors: the graph computes the model
    worst = 0.0
    torch_ex, _ = create_executor("torch", st.artifacts["deploy checkpoint"], _options(st))
    ort_ex, _ = create_executor("onnxruntime", out, _options(st))
    ids = torch.arange(1, 10, dtype=torch.int32)
    for batch in (
        StepBatch(ids, torch.arange(9, dtype=torch.int32), torch.tensor([0, 9], dtype=torch.int32),
                  torch.tensor([0], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                  torch.tensor([[0, 1]], dtype=torch.int32)),
        StepBatch(ids[:1], torch.tensor([9], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
                  torch.tensor([9], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                  torch.tensor([[0, 1]], dtype=torch.int32)),
    ):
        a, b = torch_ex.execute(batch), ort_ex.execute(batch)
        worst = max(worst, float((a - b).abs().max() / a.abs().max()))
    if worst > 1e-4:
        raise DemoCheckError(f"{out}: the exported graph's logits differ from the torch executor's by {worst:.1e} "
                             "(relative), expected at most 1e-4; please report this")
    nodes = ", ".join(f"{n} x{k}" for n, k in manifest["plugins"]["nodes"].items())
    return (f"opset {manifest['opset']}, plugin nodes {nodes}; onnxruntime logits = torch executor's "
            f"(max relative difference {worst:.1e})")


def step_bench(st: DemoState) -> str:
    """The same requests (same seeds) on the torch executor and, where the export ran, on onnxruntime."""
    from trtfalcon.bench.dataset import token_norm_dist
    from trtfalcon.bench.report import plot, print_table, write_report
    from trtfalcon.bench.throughput import run_concurrency
    from trtfalcon.runtime.llm import LLMEngine

    backends = [("torch", st.artifacts["deploy checkpoint"], st.out_dir / "bench")]
    if "ONNX export" in st.artifacts:
        backends.append(("onnxruntime", st.artifacts["ONNX export"], st.out_dir / "bench-onnxruntime"))
    rows = {}
    for backend, path, out in backends:
        engine = LLMEngine.from_options(backend, path, _options(st))
        cfg = engine.config
        results = []
        for c in (32, 64):
            warm = min(c, 8)
            reqs = token_norm_dist(warm + 2 * c, st.isl, st.osl, vocab_size=cfg.vocab_size, seed=c,
                                   max_seq_len=engine.limits.max_seq_len)
            results.append(run_concurrency(engine, reqs, concurrency=c, warmup=warm))
        rows[backend] = results
        meta = {"demo": True, "backend": backend, "model": cfg.summary(), "isl": st.isl, "osl": st.osl}
        write_report(out / "report.json", results, meta)
        plot(out / "throughput.png", results, f"tiny model, {backend} on CPU: isl {st.isl} -> osl {st.osl}")
        st.artifacts[f"bench report ({backend})"] = out / "report.json"
        st.artifacts[f"throughput plot ({backend})"] = out / "throughput.png"
    print_table(rows["torch"], "cpu")
    if "onnxruntime" in rows:
        st.echo(f"    {'concurrency':>11} {'torch tok/s':>12} {'onnxruntime tok/s':>18} {'ratio':>6}")
        for t, o in zip(rows["torch"], rows["onnxruntime"]):
            st.echo(f"    {t.concurrency:>11} {t.output_tokens_per_s:>12.0f} {o.output_tokens_per_s:>18.0f} "
                       f"{o.output_tokens_per_s / t.output_tokens_per_s:>6.2f}")
    return f"{' and '.join(rows)} at concurrency 32 and 64, isl {st.isl} -> osl {st.osl}, same requests"


def step_quantize(st: DemoState) -> str:
    from trtfalcon.errors import MissingDependencyError

    try:
        from trtfalcon.quantize.fp8 import quantize_fp8

        r = quantize_fp8(st.artifacts["HF checkpoint"], st.out_dir / "tiny-fp8", calib_size=8, calib_seq_len=64,
                         holdout=4)
    except MissingDependencyError as e:
        return f"skipped: {e}"
    st.artifacts["FP8 checkpoint"] = r.out_dir
    st.artifacts["FP8 accuracy report"] = r.out_dir / "accuracy.json"
    a = r.accuracy or {}
    return (f"ModelOpt FP8 (E4M3 per tensor) on {r.quantized_modules} linears, calibrated on SYNTHETIC token ids "
            f"(no text for a random model); vs fp32 source: top-1 agreement {100 * a['top1_agreement']:.1f} %, "
            f"logit relative RMS error {100 * a['logit_rel_rms_err']:.2f} %, perplexity x{a['perplexity_ratio']:.4f}: "
            "random weights and inputs, so these check the path, not accuracy (next step: a trained model)")


def step_quantize_toy(st: DemoState) -> str:
    """FP8's cost on a model whose answers can be wrong: the trained toy reasoner, calibrated on its task's text."""
    from trtfalcon.errors import MissingDependencyError

    data = Path(__file__).resolve().parents[1] / "tests" / "data"
    toy, calib = data / "toy-reasoner", data / "toy-calib.jsonl"
    if not (toy / "config.json").is_file() or not calib.is_file():
        return f"skipped: {toy} is not here (an installed wheel ships no tests/data/; run from the repository)"
    try:
        from trtfalcon.quantize.fp8 import quantize_fp8
        from trtfalcon.tts.toy_eval import ToyTaskEvaluator

        r = quantize_fp8(toy, st.out_dir / "toy-fp8", calib_data=calib, calib_size=64, calib_seq_len=64, holdout=16,
                         task=ToyTaskEvaluator(100))
    except MissingDependencyError as e:
        return f"skipped: {e}"
    st.artifacts["FP8 toy reasoner accuracy report"] = r.out_dir / "accuracy.json"
    a = r.accuracy or {}
    t = a["task"]
    return (f"trained toy reasoner (tests/data/toy-reasoner), calibrated on 64 traces of its task; vs fp32 source: "
            f"top-1 agreement {100 * a['top1_agreement']:.1f} % and perplexity x{a['perplexity_ratio']:.4f} on 16 "
            f"held-out traces; greedy answers right on {t['items']} held-out problems: source "
            f"{100 * t['accuracy_source']:.0f} %, FP8 {100 * t['accuracy_quantized']:.0f} % (both converted and run "
            "by the runtime)")


def step_tts(st: DemoState) -> str:
    """DeepConf on the trained toy reasoner: online against offline with the same seeds, all problems in flight.
    A wrong vote is reported, not an error: voting is a bet, not a guarantee."""
    import time

    from trtfalcon.runtime.llm import LLMEngine
    from trtfalcon.tts.answers import TOY_ANSWER
    from trtfalcon.tts.run import TTSConfig, run_tts_many
    from trtfalcon.tts.toy_eval import MAX_COMPLETION_TOKENS
    from trtfalcon.tts.toy_task import decode, held_out_problems, prompt_ids

    toy = Path(__file__).resolve().parents[1] / "tests" / "data" / "toy-reasoner"
    if not (toy / "config.json").is_file():
        return f"skipped: {toy} is not here (an installed wheel ships no tests/data/; run from the repository)"
    problems = held_out_problems(3)
    engine = LLMEngine.from_options("torch", toy, RuntimeOptions(max_batch_size=64, max_seq_len=128), log_steps=False)
    # window 8: toy traces are ~25-50 tokens (DeepConf's 2048 suits long reasoning); temperature 1 for diverse traces
    config = TTSConfig(budget=12, warmup=4, mode="online", eta=10, window=8, temperature=1.0, top_p=1.0,
                       max_new_tokens=MAX_COMPLETION_TOKENS)
    prompts = [prompt_ids(p) for p in problems]
    t0 = time.perf_counter()
    online = run_tts_many(engine, prompts, config, TOY_ANSWER, decode=decode)
    seconds = time.perf_counter() - t0
    offline = run_tts_many(engine, prompts, replace(config, mode="offline"), TOY_ANSWER, decode=decode)
    on_tokens, off_tokens = sum(r.tokens_generated for r in online), sum(r.tokens_generated for r in offline)
    if on_tokens > off_tokens:
        raise DemoCheckError(f"DeepConf online generated {on_tokens} tokens, more than offline's {off_tokens} with the "
                             "same seeds (its traces are prefixes of offline's); please report this")
    right = sum(r.answer == p.answer for r, p in zip(online, problems))
    stopped = sum(r.num_stopped for r in online)
    return (f"DeepConf online (budget {config.budget}, warm-up {config.warmup}, eta {config.eta:g}, window "
            f"{config.window}) on {len(problems)} held-out problems in flight "
            f"on the toy reasoner: voted answer right on {right}/{len(problems)}; {stopped} of "
            f"{len(problems) * (config.budget - config.warmup)} traces stopped, {on_tokens:,} tokens vs offline's "
            f"{off_tokens:,} with the same seeds ({100 * (off_tokens - on_tokens) / off_tokens:.0f}% saved); "
            f"{seconds:.1f} s (`trtfalcon tts`)")


def step_build(st: DemoState) -> str:
    if not st.compile_kernels:
        return "skipped (--skip-kernels: the build compiles the plugin kernels)"
    from trtfalcon.engine.build import run_build
    from trtfalcon.errors import MissingDependencyError

    config = Path(__file__).resolve().parents[1] / "build_configs" / "tiny-demo.yaml"
    if not config.is_file():
        return f"skipped: {config} is not here (an installed wheel ships no build_configs/; run from the repository)"
    source = st.artifacts.get("FP8 checkpoint", st.artifacts["HF checkpoint"])
    out = st.out_dir / "tiny-build"
    st.artifacts["build directory"] = out
    try:
        result = run_build(config, source, out, overwrite=True)
    except MissingDependencyError as e:
        missing = str(e).split(". Written to", 1)[0].removeprefix("engine not built: ")
        return f"everything up to the engine written to {out} (build.json); engine not built here: {missing}"
    return f"TensorRT engine {result.engine_dir}"


STEPS: list[tuple[str, Callable[[DemoState], str]]] = [
    ("synth", step_synth),
    ("convert", step_convert),
    ("generate", step_generate),
    ("quantize fp8", step_quantize),
    ("fp8 accuracy (toy reasoner)", step_quantize_toy),
    ("test-time scaling (toy reasoner)", step_tts),
    ("export", step_export),
    ("plugins compile", step_kernels),
    ("build", step_build),
    ("bench", step_bench),
]


MARKER = ".trtfalcon-demo"  # marks a directory the demo made, so a rerun may replace it


def run_demo(out_dir: Path, *, isl: int = 32, osl: int = 32, compile_kernels: bool = True,
             echo: Callable[[str], None] = print, heading: Callable[[str], None] = print) -> DemoState:
    """Run every step in STEPS in out_dir (replaced if an earlier demo made it); echo prints a line, heading a
    step's title."""
    if out_dir.exists() and not (out_dir / MARKER).is_file() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(
            f"{out_dir}: exists and was not made by `trtfalcon demo`; choose another --out (the demo replaces its "
            "directory on every run)"
        )
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    (out_dir / MARKER).write_text("made by trtfalcon demo; replaced on the next run\n")
    st = DemoState(out_dir, isl, osl, compile_kernels, echo=echo)
    for i, (name, step) in enumerate(STEPS, 1):
        heading(f"{i}/{len(STEPS)} {name}")
        echo(f"    {step(st)}")
    heading("done. Artifacts:")
    width = max(map(len, st.artifacts)) + 2
    for label, path in st.artifacts.items():
        echo(f"    {label:<{width}} {path}")
    return st
