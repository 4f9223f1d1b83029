"""`trtfalcon build`: checkpoint -> [quantize] -> convert -> export -> plugin kernels -> TensorRT engine.

Two TensorRT builds, one code path: TensorRT 11 for the datacenter GPUs (H100, H200, B200), which needs the GPU it
builds for, and TensorRT for RTX for Ampere / Ada / RTX Blackwell GPUs (A100, RTX A6000, RTX 4090, RTX 6000 Ada,
RTX 5090, RTX PRO 6000), which builds for a named compute capability on any machine, GPU or not. The build config's
target picks one (engine/config.py: target.builder, default the GPU's); `TensorRT11` / `TensorRTForRTX` below are
the one place where the two differ (module, builder creation, plugin registration, target); parsing, the network,
the profile and the manifest are shared. TensorRT is imported through trtfalcon/tensorrt_import.py, lazily. Everything
before the engine runs without TensorRT and without a GPU, so on a machine that lacks what the target needs the
build writes every earlier artifact, then stops with a MissingDependencyError saying what is missing and how to get
it; re-running the same command where it exists reuses the finished stages (build.json records the config and
checkpoint they were made from).

OUT/
    build.json      the build config, source checkpoint, memory plan, each stage's status and directory
    fp8-hf/         ModelOpt FP8 unified HF checkpoint (only when the config asks FP8 of a bf16 HF checkpoint)
    deploy/         deploy checkpoint (folded, fused; FP8 weights and scales when quantized)
    onnx/           ONNX graph of one engine step (plugin nodes, FP8 Q/DQ, external weights) + export.json
    kernels/        the engine's plugin kernels (its ops' kernels in its precision's dtypes) compiled ahead of
                    time for target.archs (PTX, cubin, resources); a spill is an error
    engine/         model.engine + manifest.json (I/O contract, profile, build config, versions, the builder's
                    account of the engine's layers) + config.json
Each stage directory is written atomically: a failure leaves the finished ones and nothing half written.

The engine: a STRONGLY_TYPED network (TensorRT 11 has no precision flags: bf16 comes from the graph's tensor
types, FP8 from its explicit Q/DQ), parsed from the ONNX export with the trtfalcon plugins registered first
(TensorRT 11: plugins/tensorrt.py, quickly deployable plugins with ahead-of-time Triton kernels, so the engine needs
no Python at run time; TensorRT for RTX: plugins/tensorrt_rtx.py, IPluginV3 plugins carrying the same kernels'
PTX), aliased plugin I/O enabled for the in-place cache updates, one optimization profile whose min/opt/max come
from the build config (engine/config.py optimization_profile over the export's I/O shapes).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtfalcon import __version__
from trtfalcon.checkpoint.safetensors_io import atomic_output_dir
from trtfalcon.config import FalconH1Config
from trtfalcon.engine.config import FP8_MIN_CC, BuildConfig, GiB, MemoryPlan, check_fits, load_build_config, optimization_profile
from trtfalcon.errors import CheckpointError, ConfigError, MissingDependencyError, TrtFalconError
from trtfalcon.tensorrt_import import GPU_HINT, TENSORRT, TENSORRT_RTX, import_tensorrt

if TYPE_CHECKING:  # plugins/ is imported lazily (it imports torch and triton)
    from trtfalcon.plugins.aot import KernelSelection

ENGINE_FILE = "model.engine"
ENGINE_MANIFEST = "manifest.json"
ENGINE_FORMAT_VERSION = 1
BUILD_RECORD = "build.json"
STAGES = ("quantize", "convert", "export", "kernels", "engine")
STAGE_DIRS = {"quantize": "fp8-hf", "convert": "deploy", "export": "onnx", "kernels": "kernels", "engine": "engine"}


class EngineBuildError(TrtFalconError):
    """TensorRT refused the network (parser or builder errors); the message carries TensorRT's own errors."""


# ---------------------------------------------------------------------------------------------------------------
# Where TensorRT 11 and TensorRT for RTX differ: the module, how a builder is made, how plugins get in, the target.
# Everything else (network, parser, profile, builder config, manifest) is build_tensorrt_engine's one code path.


class TensorRT11:
    """TensorRT 11: builds on (and for) the GPU it runs on; plugins are quickly deployable plugins whose AOT kernels
    the engine embeds (plugins/tensorrt.py)."""

    flavor = TENSORRT

    def __init__(self, bc: BuildConfig):
        self.bc = bc
        self.trt = import_tensorrt(TENSORRT.name)

    def create_builder(self, logger: Any) -> Any:
        try:
            builder = self.trt.Builder(logger)
        except (TypeError, RuntimeError) as e:  # "factory function returned nullptr": no CUDA device
            raise MissingDependencyError(f"TensorRT is installed but cannot create a builder ({e}): no usable CUDA "
                                         f"GPU; {GPU_HINT}") from e
        if builder is None:
            raise MissingDependencyError(f"TensorRT cannot create a builder: no usable CUDA GPU; {GPU_HINT}")
        return builder

    def register_plugins(self) -> list[str]:
        from trtfalcon.plugins.tensorrt import register_plugins

        return register_plugins()

    def set_target(self, config: Any) -> dict[str, Any]:
        return {"gpu": _gpu_description()}  # the GPU doing the build is the target

    def plugin_report(self) -> dict[str, Any]:
        return {}


class TensorRTForRTX:
    """TensorRT for RTX: builds for a named compute capability with no GPU; plugins are Python IPluginV3 classes the
    ONNX parser creates from their creators (plugins/tensorrt_rtx.py), which carry their kernels' PTX."""

    flavor = TENSORRT_RTX

    def __init__(self, bc: BuildConfig):
        from trtfalcon.plugins.aot import parse_arch

        self.bc = bc
        self.cc = parse_arch(bc.target.archs[0])  # one, checked by engine/config.py
        self.trt = import_tensorrt(TENSORRT_RTX.name)

    def create_builder(self, logger: Any) -> Any:
        return self.trt.Builder(logger)

    def register_plugins(self) -> list[str]:
        from trtfalcon.plugins.tensorrt_rtx import register_rtx_plugins, start_build

        start_build()
        return register_rtx_plugins(self.trt, self.cc)

    def set_target(self, config: Any) -> dict[str, Any]:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(self.trt.ComputeCapability, f"SM{self.cc}"), 0)
        return {"compute_capability": f"sm_{self.cc}", "gpu": {"name": self.bc.target.gpu}}

    def plugin_report(self) -> dict[str, Any]:
        from trtfalcon.plugins.tensorrt_rtx import build_errors, build_observations

        return {"errors": build_errors(), "plugin_layers": build_observations()}


BUILDERS = {TENSORRT.name: TensorRT11, TENSORRT_RTX.name: TensorRTForRTX}


def builder_for(bc: BuildConfig) -> TensorRT11 | TensorRTForRTX:
    """The TensorRT build the config targets (target.builder, or its GPU's), imported."""
    return BUILDERS[bc.target.builder_name](bc)


class _Log:
    """TensorRT's logger: warnings and errors to stderr as TensorRT would print them, every message kept so that the
    engine's layer information (verbose) can be read back and errors quoted."""

    def __new__(cls, trt: Any):
        class Log(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[tuple[Any, str]] = []

            def log(self, severity, msg):
                self.messages.append((severity, msg))
                if severity <= trt.ILogger.Severity.WARNING:
                    print(f"[TensorRT {severity.name}] {msg}", file=sys.stderr, flush=True)

            def errors(self) -> list[str]:
                return [m for s, m in self.messages if s <= trt.ILogger.Severity.ERROR]

        return Log()


_LAYER_LINE = re.compile(r"^Layer\((\w+)\): (.+?), Tactic: \S+, (.*)$")
_TENSOR = re.compile(r"(?:^|, )(.+?) \((\w+)\[([-0-9,]*)\]\)")
_FUSED = re.compile(r"^ForeignNode (\{.+\}) metadata: (.*)$")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def engine_layers(messages: list[str]) -> list[dict[str, Any]]:
    """The builder's "Engine Layer Information" (verbose log), per layer: type, name, inputs and outputs as (tensor,
    dtype, dims), and for a fused (Myelin) layer the ONNX nodes it holds: the built engine's own account of its
    layers, readable with no GPU. Empty where the log has no such lines (a TensorRT that words them otherwise)."""
    layers, fused = [], {}
    for msg in messages:
        m = _FUSED.match(msg.strip())
        if m:
            fused[m.group(1)] = _ONNX_LAYER.findall(m.group(2))
            continue
        for line in msg.splitlines():
            m = _LAYER_LINE.match(line.strip())
            if not m:
                continue
            ins, _, outs = m.group(3).partition(" -> ")
            tensors = lambda part: [[n, t, [int(d) for d in dims.split(",") if d]]  # noqa: E731
                                    for n, t, dims in _TENSOR.findall(part)]
            layers.append({"type": m.group(1), "name": m.group(2), "inputs": tensors(ins), "outputs": tensors(outs)})
    for layer in layers:
        if layer["name"] in fused:
            layer["onnx_layers"] = fused[layer["name"]]
    return layers


# ---------------------------------------------------------------------------------------------------------------
# The TensorRT step


def build_tensorrt_engine(
    bc: BuildConfig, export_dir: Path, engine_dir: Path, *, plan: MemoryPlan | None = None,
    extra_manifest: dict[str, Any] | None = None, overwrite: bool = False,
) -> Path:
    """Parse export_dir/model.onnx into a strongly typed network with the plugins registered, build it with the
    config's optimization profile for its target (TensorRT 11 or TensorRT for RTX), write
    engine_dir/{model.engine, manifest.json, config.json} atomically."""
    from trtfalcon.export.onnx import MODEL_FILE, read_manifest

    target = builder_for(bc)
    trt = target.trt
    logger = _Log(trt)
    builder = target.create_builder(logger)
    export = read_manifest(export_dir)
    if (export.get("fp8") or export["cache_dtypes"].get("kv_cache") == "fp8") and bc.target.min_cc < FP8_MIN_CC:
        raise ConfigError(f"{export_dir}: the export holds FP8 tensors, which {bc.target.gpu} "
                          f"(sm_{bc.target.min_cc}) cannot run (FP8 needs sm_{FP8_MIN_CC} or newer); export it in bf16")
    plugin_ids = target.register_plugins()  # before parsing: the parser maps trtfalcon nodes to registered plugins
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(export_dir / MODEL_FILE)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{export_dir / MODEL_FILE}: {target.flavor.title}'s ONNX parser failed: "
                               + "; ".join(errors[:5] + target.plugin_report().get("errors", [])[:3]))
    shapes = optimization_profile(bc, {name: io["shape"] for name, io in export["inputs"].items()})
    graph_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if graph_inputs != set(shapes):
        raise EngineBuildError(f"{export_dir}: the parsed network's inputs {sorted(graph_inputs - set(shapes))[:3]} "
                               f"differ from export.json's {sorted(set(shapes) - graph_inputs)[:3]}")
    layer_types: dict[str, int] = {}
    for i in range(network.num_layers):
        kind = network.get_layer(i).type.name
        layer_types[kind] = layer_types.get(kind, 0) + 1
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(bc.profile.workspace_gib * GiB))
    config.builder_optimization_level = bc.profile.builder_optimization_level
    # Plugin outputs that alias their inputs (the in-place KV / conv / SSM pool updates) are a preview feature.
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    built_for = target.set_target(config)
    serialized = builder.build_serialized_network(network, config)
    report = target.plugin_report()
    if serialized is None:
        raise EngineBuildError(f"{export_dir}: {target.flavor.title} built no engine for {built_for}: "
                               + "; ".join((logger.errors() + report.get("errors", []))[-5:]))
    seconds = time.perf_counter() - t0
    with atomic_output_dir(engine_dir, overwrite=overwrite) as tmp:
        (tmp / ENGINE_FILE).write_bytes(bytes(serialized))
        shutil.copy2(export_dir / "config.json", tmp / "config.json")
        manifest = {
            "format": "trtfalcon-engine", "version": ENGINE_FORMAT_VERSION, "engine": ENGINE_FILE,
            "builder": {"name": target.flavor.name, "title": target.flavor.title, "version": trt.__version__,
                        **{k: v for k, v in built_for.items() if k != "gpu"}},
            "versions": {"trtfalcon": __version__, "tensorrt": trt.__version__, **_versions()},
            "gpu": built_for.get("gpu"), "build_seconds": round(seconds, 1), "engine_bytes": serialized.nbytes,
            "build_config": bc.model_dump(),
            "io": {"inputs": export["inputs"], "outputs": export["outputs"], "aliases": export["aliases"]},
            "cache_dtypes": export["cache_dtypes"], "dtype": export["dtype"], "fp8": export.get("fp8"),
            "profile": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in shapes.items()},
            "runtime": {**bc.runtime.model_dump(), "num_kv_blocks": bc.num_kv_blocks},
            "plugins": plugin_ids, "network_layers": dict(sorted(layer_types.items())),
            "engine_layers": engine_layers([m for _, m in logger.messages]),
            "plugin_layers": report.get("plugin_layers"),
            "memory_plan": plan.asdict() if plan else None, **(extra_manifest or {}),
        }
        (tmp / ENGINE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return engine_dir


def _gpu_description() -> dict[str, Any] | None:
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return {"name": p.name, "compute_capability": f"{p.major}.{p.minor}", "memory_bytes": p.total_memory}
    except Exception:  # noqa: BLE001 - descriptive only
        pass
    return None


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "triton", "onnx", "modelopt"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            continue
    return out


# ---------------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class BuildResult:
    out_dir: Path
    plan: MemoryPlan
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    engine_dir: Path | None = None


def _fingerprint(bc: BuildConfig, checkpoint: Path) -> str:
    """What decides whether a finished stage can be reused: the build config and the checkpoint's CONTENT, not its
    path (a rewritten checkpoint at the same path must rebuild; the same checkpoint copied to a GPU host, with its
    modification times kept, may reuse). Content = config.json + per weight file its name, size, mtime and the
    hash of its safetensors header (names, shapes, dtypes, offsets); hashing all the weights would cost ~15 s/7B."""
    files = []
    for f in sorted(checkpoint.iterdir()):
        if f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json",
                                                     "hf_quant_config.json"):
            st = f.stat()
            entry = {"name": f.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            if f.suffix == ".safetensors":
                with open(f, "rb") as fh:
                    head = fh.read(8)
                    n = int.from_bytes(head, "little") if len(head) == 8 else 0
                    entry["header"] = hashlib.sha256(head + fh.read(min(n, 100 * 2**20))).hexdigest()
            else:
                entry["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
            files.append(entry)
    blob = json.dumps({"config": bc.model_dump(), "checkpoint": files, "trtfalcon": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _checkpoint_kind(checkpoint: Path) -> str:
    from trtfalcon.checkpoint.deploy import is_deploy_checkpoint
    from trtfalcon.checkpoint.deploy_reader import read_deploy_config
    from trtfalcon.checkpoint.hf import is_quantized_hf_checkpoint

    if is_deploy_checkpoint(checkpoint):
        return "deploy-fp8" if read_deploy_config(checkpoint)["trtfalcon"].get("quantization") else "deploy"
    if is_quantized_hf_checkpoint(checkpoint):
        return "hf-fp8"
    return "hf"


def _has_kv_scales(kind: str, checkpoint: Path) -> bool:
    """Whether an FP8 checkpoint declares an FP8 KV cache (and so, once validated, carries the k/v scales)."""
    if kind == "deploy-fp8":
        from trtfalcon.checkpoint.deploy_fp8 import kv_cache_fp8
        from trtfalcon.checkpoint.deploy_reader import read_deploy_config

        return kv_cache_fp8(read_deploy_config(checkpoint)["trtfalcon"].get("quantization"))
    from trtfalcon.checkpoint.fp8 import read_fp8_quant_config

    return read_fp8_quant_config(checkpoint).kv_cache_fp8


def plan_stages(bc: BuildConfig, kind: str, checkpoint: Path) -> list[str]:
    """Which stages this config needs for this checkpoint; a precision mismatch is an error before any work."""
    fp8 = bc.precision.weights == "fp8"
    if kind in ("deploy-fp8", "hf-fp8") and not fp8:
        raise ConfigError(f"{checkpoint}: is FP8-quantized but the build config asks precision.weights: bf16; pass "
                          "the bf16 source checkpoint or use an FP8 build config")
    if kind == "deploy" and fp8:
        raise ConfigError(f"{checkpoint}: is a bf16 deploy checkpoint but the build config asks precision.weights: "
                          "fp8; pass its Hugging Face source (build quantizes it) or an FP8 checkpoint")
    if bc.precision.kv_cache == "fp8" and kind in ("deploy-fp8", "hf-fp8") and not _has_kv_scales(kind, checkpoint):
        raise ConfigError(f"{checkpoint}: the build config asks precision.kv_cache: fp8, which needs each layer's "
                          "k_scale / v_scale, but the checkpoint was quantized without an FP8 KV cache "
                          "(kv_cache_quant_algo null); pass its Hugging Face source (build calibrates the scales), "
                          "re-quantize with --kv-cache-dtype fp8, or set precision.kv_cache: bf16")
    pre = {"hf": ["quantize", "convert"] if fp8 else ["convert"], "hf-fp8": ["convert"]}.get(kind, [])
    return pre + ["export", "kernels", "engine"]


def run_build(
    config: str | Path | BuildConfig, checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> BuildResult:
    """Run every stage the config asks for. Raises MissingDependencyError (after writing every stage before the
    engine) where TensorRT or a GPU is missing."""
    bc = config if isinstance(config, BuildConfig) else load_build_config(config)
    checkpoint, out = Path(checkpoint), Path(out_dir)
    if not (checkpoint / "config.json").is_file():
        raise CheckpointError(f"{checkpoint}: no config.json (expected a Hugging Face, FP8 or deploy checkpoint)")
    cfg = FalconH1Config.from_json_file(checkpoint)
    plan = check_fits(bc, cfg, source=str(config) if not isinstance(config, BuildConfig) else bc.name)
    log(f"memory plan: {plan.verdict()}")
    _check_supported(bc)
    kind = _checkpoint_kind(checkpoint)
    stages = plan_stages(bc, kind, checkpoint)
    record_path = out / BUILD_RECORD
    fingerprint = _fingerprint(bc, checkpoint)
    record = _open_out_dir(out, record_path, fingerprint, overwrite)
    record.update(fingerprint=fingerprint, build_config=bc.model_dump(), checkpoint=str(checkpoint.resolve()),
                  checkpoint_kind=kind, memory_plan=plan.asdict(), trtfalcon=__version__)
    record.setdefault("stages", {})
    result = BuildResult(out, plan, record["stages"])

    def save() -> None:
        tmp = record_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        tmp.replace(record_path)

    source = checkpoint
    compute = bc.precision.compute
    for stage in stages:
        target = out / STAGE_DIRS[stage]
        if record["stages"].get(stage, {}).get("status") == "done" and target.is_dir():
            log(f"{stage}: reusing {target}")
            source = target if stage != "kernels" else source
            continue
        t0 = time.perf_counter()
        try:
            if stage == "quantize":
                from trtfalcon.quantize.fp8 import quantize_fp8

                q = bc.quantize
                r = quantize_fp8(source, target, kv_cache_dtype="fp8" if bc.precision.kv_cache == "fp8" else None,
                                 calib_data=q.calib_data, calib_size=q.calib_size, calib_seq_len=q.calib_seq_len,
                                 holdout=q.holdout, conservative=q.conservative, device=q.device, overwrite=True,
                                 log=log)
                info: dict[str, Any] = {"calibration": r.calibration, "accuracy": r.accuracy}
                source = target
            elif stage == "convert":
                from trtfalcon.checkpoint.convert import convert_checkpoint

                convert_checkpoint(source, target, dtype=compute, overwrite=True)
                info, source = {}, target
            elif stage == "export":
                from trtfalcon.export.onnx import export_onnx

                p = bc.precision
                export_onnx(source, target, dtype=compute, kv_dtype=p.kv_cache, conv_dtype=p.conv_state,
                            ssm_dtype=p.ssm_state, overwrite=True)
                info, source = {}, target
            elif stage == "kernels":
                from trtfalcon.plugins.aot import compile_kernels

                manifest = compile_kernels(list(bc.target.archs), target, config=cfg,
                                           selection=engine_kernel_selection(bc), overwrite=True)
                info = {"archs": list(bc.target.archs), "kernels": len(manifest["kernels"]),
                        "selection": manifest["selection"],
                        "configurations": [f"{r['arch']} {r['plugin']} {r['config']}" for r in manifest["kernels"]]}
            else:
                try:
                    build_tensorrt_engine(bc, out / STAGE_DIRS["export"], target, plan=plan, overwrite=True,
                                          extra_manifest={"kernels": str(out / STAGE_DIRS["kernels"]),
                                                          "source_checkpoint": str(checkpoint.resolve())})
                except MissingDependencyError as e:
                    record["stages"]["engine"] = {"status": "missing", "reason": str(e)}
                    save()
                    done = [f"{STAGE_DIRS[s]}/" for s in stages if record["stages"].get(s, {}).get("status") == "done"]
                    where = ("TensorRT and a GPU exist" if bc.target.builder_name == TENSORRT.name
                             else "TensorRT for RTX is installed")
                    raise MissingDependencyError(
                        f"engine not built: {e}. Written to {out}: {BUILD_RECORD}, {', '.join(done)}. Re-run this "
                        f"command where {where}: the finished stages are reused"
                    ) from e
                info = {}
                result.engine_dir = target
        except MissingDependencyError:
            raise
        except BaseException as e:
            record["stages"][stage] = {"status": "failed", "error": str(e)}
            save()
            raise
        record["stages"][stage] = {"status": "done", "dir": str(target), "seconds": round(time.perf_counter() - t0, 2),
                                   **info}
        save()
        log(f"{stage}: wrote {target} ({record['stages'][stage]['seconds']} s)")
    return result


def engine_kernel_selection(bc: BuildConfig) -> KernelSelection:
    """The kernel configurations the config's engine runs (plugins/aot.py KernelSelection.for_engine): its ops'
    kernels in its precision's dtypes, what the kernels stage compiles and checks, so that a configuration the engine
    never uses (another KV cache dtype, the torch executor's decode kernels) cannot stop its build."""
    from trtfalcon.plugins.aot import KernelSelection

    p = bc.precision
    return KernelSelection.for_engine(p.compute, p.kv_cache, p.ssm_state, p.conv_state)


def _check_supported(bc: BuildConfig) -> None:
    """What the exporter's cache pools take (trtfalcon/dtypes.py KV_CACHE_NAMES / FLOAT_NAMES); asked before any work is
    done. precision.kv_cache fp8 flows into quantize (k/v scales), export (float8 KV pools, scales fed to the
    attention nodes) and so the engine's I/O dtypes."""
    from trtfalcon.dtypes import FLOAT_NAMES, KV_CACHE_NAMES

    p = bc.precision
    for key, value, allowed in (("kv_cache", p.kv_cache, KV_CACHE_NAMES), ("conv_state", p.conv_state, FLOAT_NAMES),
                                ("ssm_state", p.ssm_state, FLOAT_NAMES)):
        if value not in allowed:
            raise ConfigError(f"{bc.name}: precision.{key}: expected one of {', '.join(allowed)} (what the ONNX "
                              f"exporter's cache pools take, trtfalcon/export/onnx.py), found {value}")


def _open_out_dir(out: Path, record_path: Path, fingerprint: str, overwrite: bool) -> dict[str, Any]:
    """An empty or new OUT, or one a previous run of the same config + checkpoint left (its stages are reused)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        previous = None
        if record_path.is_file():
            try:
                previous = json.loads(record_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                previous = None
        if previous and previous.get("fingerprint") == fingerprint and not overwrite:
            return previous
        if not overwrite:
            why = ("it was built from a different config or checkpoint" if previous
                   else "it is not a trtfalcon build directory")
            raise CheckpointError(f"{out}: already exists and {why} (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return {}
