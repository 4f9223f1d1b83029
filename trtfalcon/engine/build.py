"""`trtfalcon build`: checkpoint -> [quantize] -> convert -> export -> plugin kernels -> TensorRT 11 engine.

This is the one module of the builder that imports `tensorrt` (lazily, in import_tensorrt); the TensorRT executor
borrows import_tensorrt from here. Everything before the engine runs without TensorRT and without a GPU, so
on a machine that has neither the build writes every earlier artifact, then stops with a MissingDependencyError
saying what is missing and how to get it; re-running the same command where TensorRT and a GPU exist reuses the
finished stages (build.json records the config and checkpoint they were made from).

OUT/
    build.json      the build config, source checkpoint, memory plan, each stage's status and directory
    fp8-hf/         ModelOpt FP8 unified HF checkpoint (only when the config asks FP8 of a bf16 HF checkpoint)
    deploy/         deploy checkpoint (folded, fused; FP8 weights and scales when quantized)
    onnx/           ONNX graph of one engine step (plugin nodes, FP8 Q/DQ, external weights) + export.json
    kernels/        every plugin kernel compiled ahead of time for target.archs (PTX, cubin, resources)
    engine/         model.engine + manifest.json (I/O contract, profile, build config, versions) + config.json
Each stage directory is written atomically: a failure leaves the finished ones and nothing half written.

The engine: a STRONGLY_TYPED network (TensorRT 11 has no precision flags: bf16 comes from the graph's tensor
types, FP8 from its explicit Q/DQ), parsed from the ONNX export with the trtfalcon plugins registered first
(plugins/tensorrt.py: quickly deployable plugins with ahead-of-time Triton kernels, so the engine needs no Python
at run time), aliased plugin I/O enabled for the in-place cache updates, one optimization profile whose
min/opt/max come from the build config (engine/config.py optimization_profile over the export's I/O shapes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtfalcon import __version__
from trtfalcon.checkpoint.safetensors_io import atomic_output_dir
from trtfalcon.config import FalconH1Config
from trtfalcon.engine.config import BuildConfig, GiB, MemoryPlan, check_fits, load_build_config, optimization_profile
from trtfalcon.errors import CheckpointError, ConfigError, MissingDependencyError, TrtFalconError

ENGINE_FILE = "model.engine"
ENGINE_MANIFEST = "manifest.json"
ENGINE_FORMAT_VERSION = 1
BUILD_RECORD = "build.json"
STAGES = ("quantize", "convert", "export", "kernels", "engine")
STAGE_DIRS = {"quantize": "fp8-hf", "convert": "deploy", "export": "onnx", "kernels": "kernels", "engine": "engine"}
MIN_TENSORRT_MAJOR = 11

TENSORRT_HINT = (
    "install TensorRT 11 with its builder libraries from NVIDIA's index: `pip install tensorrt-cu13==11.4.0.106 "
    "--extra-index-url https://pypi.nvidia.com` (PyPI's tensorrt-cu13-libs is only a stub that downloads from "
    "there), or run inside an NGC TensorRT container (`docker run --gpus all -it nvcr.io/nvidia/tensorrt:<release>-py3`); "
    "the builder also needs an NVIDIA GPU (sm_90 or newer)"
)
GPU_HINT = "run on a machine with an NVIDIA GPU of compute capability 9.0 or newer (H100, H200, B200) and its driver"


class EngineBuildError(TrtFalconError):
    """TensorRT refused the network (parser or builder errors); the message carries TensorRT's own errors."""


def import_tensorrt() -> Any:
    """The `tensorrt` module (TensorRT >= 11), or a MissingDependencyError naming what is missing and how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependencyError(f"TensorRT is not installed (`import tensorrt` failed: {e}); {TENSORRT_HINT}") from e
    except OSError as e:  # bindings present, libnvinfer missing
        raise MissingDependencyError(f"TensorRT's libraries cannot be loaded ({e}); {TENSORRT_HINT}") from e
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        raise MissingDependencyError(f"TensorRT {trt.__version__} found; trtfalcon engines need TensorRT "
                                     f"{MIN_TENSORRT_MAJOR} (strongly typed networks, AOT plugins); {TENSORRT_HINT}")
    return trt


def create_builder(trt: Any) -> tuple[Any, Any]:
    """(builder, logger). TensorRT's builder needs a CUDA device: without one its factory returns null."""
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as e:
        raise MissingDependencyError(f"TensorRT is installed but cannot create a builder ({e}): no usable CUDA GPU; "
                                     f"{GPU_HINT}") from e
    if builder is None:
        raise MissingDependencyError(f"TensorRT cannot create a builder: no usable CUDA GPU; {GPU_HINT}")
    return builder, logger


# ---------------------------------------------------------------------------------------------------------------
# The TensorRT step


def build_tensorrt_engine(
    bc: BuildConfig, export_dir: Path, engine_dir: Path, *, plan: MemoryPlan | None = None,
    extra_manifest: dict[str, Any] | None = None, overwrite: bool = False,
) -> Path:
    """Parse export_dir/model.onnx into a strongly typed network with the plugins registered, build it with the
    config's optimization profile, write engine_dir/{model.engine, manifest.json, config.json} atomically."""
    from trtfalcon.export.onnx import MODEL_FILE, read_manifest
    from trtfalcon.plugins.tensorrt import register_plugins

    trt = import_tensorrt()
    builder, logger = create_builder(trt)
    export = read_manifest(export_dir)
    plugin_ids = register_plugins()  # before parsing: the parser maps trtfalcon nodes to registered plugins
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(export_dir / MODEL_FILE)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{export_dir / MODEL_FILE}: TensorRT's ONNX parser failed: " + "; ".join(errors[:5]))
    shapes = optimization_profile(bc, export["inputs"])
    graph_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if graph_inputs != set(shapes):
        raise EngineBuildError(f"{export_dir}: the parsed network's inputs {sorted(graph_inputs - set(shapes))[:3]} "
                               f"differ from export.json's {sorted(set(shapes) - graph_inputs)[:3]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(bc.profile.workspace_gib * GiB))
    config.builder_optimization_level = bc.profile.builder_optimization_level
    # Plugin outputs that alias their inputs (the in-place KV / conv / SSM pool updates) are a preview feature.
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{export_dir}: TensorRT built no engine (see its log above)")
    seconds = time.perf_counter() - t0
    gpu = _gpu_description()
    with atomic_output_dir(engine_dir, overwrite=overwrite) as tmp:
        (tmp / ENGINE_FILE).write_bytes(bytes(serialized))
        shutil.copy2(export_dir / "config.json", tmp / "config.json")
        manifest = {
            "format": "trtfalcon-engine", "version": ENGINE_FORMAT_VERSION, "engine": ENGINE_FILE,
            "versions": {"trtfalcon": __version__, "tensorrt": trt.__version__, **_versions()},
            "gpu": gpu, "build_seconds": round(seconds, 1),
            "build_config": bc.model_dump(),
            "io": {"inputs": export["inputs"], "outputs": export["outputs"], "aliases": export["aliases"]},
            "cache_dtypes": export["cache_dtypes"], "dtype": export["dtype"], "fp8": export.get("fp8"),
            "profile": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in shapes.items()},
            "runtime": {**bc.runtime.model_dump(), "num_kv_blocks": bc.num_kv_blocks},
            "plugins": plugin_ids, "memory_plan": plan.asdict() if plan else None, **(extra_manifest or {}),
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
    from trtfalcon.checkpoint.convert import is_deploy_checkpoint
    from trtfalcon.checkpoint.fp8 import is_quantized_hf_checkpoint

    if is_deploy_checkpoint(checkpoint):
        raw = json.loads((checkpoint / "config.json").read_text())
        return "deploy-fp8" if raw["trtfalcon"].get("quantization") else "deploy"
    if is_quantized_hf_checkpoint(checkpoint):
        return "hf-fp8"
    return "hf"


def _has_kv_scales(kind: str, checkpoint: Path) -> bool:
    """Whether an FP8 checkpoint declares an FP8 KV cache (and so, once validated, carries the k/v scales)."""
    if kind == "deploy-fp8":
        raw = json.loads((checkpoint / "config.json").read_text())
        return (raw["trtfalcon"].get("quantization") or {}).get("kv_cache_quant_algo") == "FP8"
    from trtfalcon.checkpoint.fp8 import read_quant_config

    return read_quant_config(checkpoint).kv_cache_fp8


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
                info = _compile_kernels(bc, cfg, target)
            else:
                try:
                    build_tensorrt_engine(bc, out / STAGE_DIRS["export"], target, plan=plan, overwrite=True,
                                          extra_manifest={"kernels": str(out / STAGE_DIRS["kernels"]),
                                                          "source_checkpoint": str(checkpoint.resolve())})
                except MissingDependencyError as e:
                    record["stages"]["engine"] = {"status": "missing", "reason": str(e)}
                    save()
                    done = [f"{STAGE_DIRS[s]}/" for s in stages if record["stages"].get(s, {}).get("status") == "done"]
                    raise MissingDependencyError(
                        f"engine not built: {e}. Written to {out}: {BUILD_RECORD}, {', '.join(done)}. Re-run this "
                        "command where TensorRT and a GPU exist: the finished stages are reused"
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


def _check_supported(bc: BuildConfig) -> None:
    """What the exporter's cache pools take (export/onnx.py KV_DTYPES / STATE_DTYPES); asked before any work is
    done. precision.kv_cache fp8 flows into quantize (k/v scales), export (float8 KV pools, scales fed to the
    attention nodes) and so the engine's I/O dtypes."""
    from trtfalcon.export.onnx import KV_DTYPES, STATE_DTYPES

    p = bc.precision
    for key, value, allowed in (("kv_cache", p.kv_cache, KV_DTYPES), ("conv_state", p.conv_state, STATE_DTYPES),
                                ("ssm_state", p.ssm_state, STATE_DTYPES)):
        if value not in allowed:
            raise ConfigError(f"{bc.name}: precision.{key}: expected one of {', '.join(allowed)} (what the ONNX "
                              f"exporter's cache pools take, trtfalcon/export/onnx.py), found {value}")


def _compile_kernels(bc: BuildConfig, cfg: FalconH1Config, target: Path) -> dict[str, Any]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise ConfigError("unset TRITON_INTERPRET: compiling the plugin kernels ahead of time needs Triton's compiler")
    from trtfalcon.plugins.triton_lang import require_triton
    from trtfalcon.plugins.aot import compile_all, spilling

    require_triton()
    with atomic_output_dir(target, overwrite=True) as tmp:
        manifest = compile_all(list(bc.target.archs), tmp, config=cfg)
        bad = spilling(manifest)
        if bad:
            raise ConfigError(f"{len(bad)} plugin kernel(s) spill registers: {', '.join(r['plugin'] for r in bad)}")
    return {"archs": list(bc.target.archs), "kernels": len(manifest["kernels"])}


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
