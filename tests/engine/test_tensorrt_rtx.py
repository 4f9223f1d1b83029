"""TensorRT for RTX builds real engines here, with no GPU: the tiny model's export parsed and built for sm_89 (FP8 and
bf16) and sm_80 (bf16), every plugin layer in the engine with its kernel, the pools updated in place, the build
config's profile read back from what the builder told the plugins; bad targets refused; and `trtfalcon build` with
the shipped RTX FP8 configs (sm_89, sm_120) writing an engine and its manifest, its kernels stage compiling exactly
the configurations the engine runs.

The builds run in a subprocess: the plugin kernels compile with Triton's real compiler, which a test process running
Triton's interpreter (TRITON_INTERPRET=1, tests/plugins) cannot switch back to. What cannot run here: deserializing
and running the engines (TensorRT for RTX needs a driver for that) and the kernel launch itself (no GPU, no libcuda).
The run-time plugins are still made from the fields the engine holds, by their creators, as the deserializer would
make them, and their enqueue is called with real TensorRT tensor descriptors: only the CUDA driver is recorded
instead of called.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml

from trtfalcon.engine.config import load_build_config, parse_build_config
from trtfalcon.errors import ConfigError

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT for RTX: pip install 'trtfalcon[rtx]'")

ROOT = Path(__file__).parents[2]
TINY = yaml.safe_load((ROOT / "build_configs" / "tiny-demo.yaml").read_text())
# the tiny config's runtime: 8 sequences, 128 tokens a step, 256 tokens each in blocks of 16
BATCH, TOKENS, BLOCK, BLOCKS_PER_SEQ = 8, 128, 16, 256 // 16
TARGETS = {"sm89-fp8": ("RTX4090", "sm_89", "fp8"), "sm89-bf16": ("RTX4090", "sm_89", "bf16"),
           "sm80-bf16": ("A100", "sm_80", "bf16")}


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _tiny_rtx(gpu: str, arch: str, weights: str) -> dict:
    raw = json.loads(json.dumps(TINY))
    raw["name"] = f"tiny-{arch}-{weights}"
    raw["precision"]["weights"] = weights
    raw["target"] = {"gpu": gpu, "builder": "tensorrt-rtx", "archs": [arch], "reserve_gib": 0.5}
    return raw


_BUILD = """
import json, sys
from pathlib import Path
from trtfalcon.engine.build import build_tensorrt_engine
from trtfalcon.engine.config import parse_build_config
for raw, export, out in json.loads(sys.argv[1]):
    build_tensorrt_engine(parse_build_config(raw), Path(export), Path(out))
"""


@pytest.fixture(scope="module")
def exports(tiny_hf, tmp_path_factory):
    """The tiny model's bf16 and FP8 (ModelOpt, short calibration) ONNX exports."""
    pytest.importorskip("modelopt", reason="FP8 calibration needs nvidia-modelopt")
    from trtfalcon.checkpoint.convert import convert_checkpoint
    from trtfalcon.export import export_onnx
    from trtfalcon.quantize.fp8 import quantize_fp8

    d = tmp_path_factory.mktemp("rtx-exports")
    fp8_hf = quantize_fp8(tiny_hf, d / "fp8-hf", calib_size=2, calib_seq_len=16, accuracy=False).out_dir
    return {
        "bf16": export_onnx(convert_checkpoint(tiny_hf, d / "deploy", dtype="bf16"), d / "onnx-bf16", dtype="bf16"),
        "fp8": export_onnx(convert_checkpoint(fp8_hf, d / "deploy-fp8"), d / "onnx-fp8", dtype="bf16"),
        "fp8_hf": fp8_hf,
    }


@pytest.fixture(scope="module")
def engines(exports, tmp_path_factory):
    """target -> engine directory, all three built by one subprocess."""
    d = tmp_path_factory.mktemp("rtx-engines")
    jobs = [(_tiny_rtx(*t), str(exports[t[2]]), str(d / name)) for name, t in TARGETS.items()]
    r = subprocess.run([sys.executable, "-c", _BUILD, json.dumps(jobs)], capture_output=True, text=True,
                       env=_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return {name: d / name for name in TARGETS}


def _manifest(engine_dir: Path) -> dict:
    return json.loads((engine_dir / "manifest.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_engine_is_built_for_its_compute_capability_with_every_plugin_kernel(engines, exports, target):
    gpu, arch, weights = TARGETS[target]
    m = _manifest(engines[target])
    engine = (engines[target] / "model.engine").read_bytes()
    assert m["builder"] == {"name": "tensorrt-rtx", "title": "TensorRT for RTX", "version": "1.7.1.116",
                            "compute_capability": arch}
    assert len(engine) == m["engine_bytes"] > 1_000_000 and engine[:4] == b"vtrt"  # TensorRT's plan header
    # every trtfalcon node of the ONNX graph became a plugin layer of the engine, serialized with its kernel
    model = onnx.load(str(exports[weights] / "model.onnx"), load_external_data=False)
    nodes = {n.name: n.op_type for n in model.graph.node if n.domain == "trtfalcon"}
    assert len(nodes) == 4 * 2  # conv, SSD, gated norm, attention per layer
    layers = m["plugin_layers"]
    assert {k: v["plugin"] for k, v in layers.items()} == nodes
    assert all(v["serialized"] and v["arch"] == arch for v in layers.values())
    assert m["network_layers"]["PLUGIN_V3"] == len(nodes)
    in_engine = set()  # the builder's own account: a plugin layer of its own, or fused into a Myelin region
    for layer in m["engine_layers"]:
        in_engine |= {layer["name"]} if layer["type"] == "PluginV3" else set(layer.get("onnx_layers", []))
    assert set(nodes) <= in_engine
    # the engine holds the plugins' PTX, compiled for this compute capability only
    assert set(re.findall(rb"\.target (sm_\w+)", engine)) == {arch.encode()}
    for kernel in {v["kernel"] for v in layers.values()}:
        assert f".entry {kernel}(".encode() in engine, kernel
    if weights == "fp8":
        assert m["fp8"] and m["network_layers"]["QUANTIZE"] > 0 and m["network_layers"]["DEQUANTIZE"] > 0
    else:
        assert not m["fp8"] and "QUANTIZE" not in m["network_layers"]


@pytest.mark.slow
def test_pools_are_updated_in_place(engines):
    """Each cache/state pool enters a plugin layer of the engine and leaves it as its aliased graph output: no copy
    layer in between, the same dims (TensorRT keeps the aliased plugin I/O in place)."""
    for target, d in engines.items():
        m = _manifest(d)
        pools = m["io"]["aliases"]  # output -> input
        assert len(pools) == 3 * 2
        found = {}
        for layer in m["engine_layers"]:
            ins = {t[0]: t for t in layer["inputs"]}
            for t in layer["outputs"]:
                src = pools.get(t[0])
                if src in ins:
                    assert layer["type"] == "PluginV3" and ins[src][1:] == t[1:], (target, layer["name"])
                    found[t[0]] = src
        assert found == pools, target


@pytest.mark.slow
def test_profile_read_back_from_the_builder(engines):
    """The min/opt/max TensorRT configured each plugin with (the config's batch, tokens and sequence length through
    the graph to the plugins), and the block size the engine fixed."""
    for target, d in engines.items():
        m = _manifest(d)
        attn = next(v for v in m["plugin_layers"].values() if v["plugin"] == "paged_attention")["inputs"]
        assert (attn["q"]["min"][0], attn["q"]["opt"][0], attn["q"]["max"][0]) == (1, BATCH, TOKENS)
        assert attn["block_tables"]["max"] == [BATCH, BLOCKS_PER_SEQ]
        assert attn["cu_seqlens"]["min"] == [2] and attn["cu_seqlens"]["max"] == [BATCH + 1]
        assert attn["kv_cache"]["min"][1:3] == [1, BLOCK] and attn["kv_cache"]["max"][1:3] == [BATCH * BLOCKS_PER_SEQ,
                                                                                                BLOCK]
        ssd = next(v for v in m["plugin_layers"].values() if v["plugin"] == "ssd")["inputs"]
        assert ssd["ssm_state"]["max"][0] == BATCH and ssd["x"]["max"][0] == TOKENS
        conv = next(v for v in m["plugin_layers"].values() if v["plugin"] == "causal_conv1d")["inputs"]
        assert conv["conv_state"]["max"][0] == BATCH and conv["state_slots"]["max"] == [BATCH]
        kv_in = next(t for layer in m["engine_layers"] for t in layer["inputs"] if t[0] == "kv_cache.0")
        assert kv_in[2][2] == BLOCK  # block_size is fixed by the profile (min = max): a constant in the engine
        assert m["profile"]["input_ids"] == {"min": [1], "opt": [BATCH], "max": [TOKENS]}


def test_bad_targets_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"target: archs: sm_90: TensorRT for RTX builds for sm_75, sm_80, sm_86, "
                                          r"sm_89, sm_120, sm_121, not sm_90"):
        parse_build_config({**_tiny_rtx("H200", "sm_90", "bf16")})
    with pytest.raises(ConfigError, match=r"precision.weights fp8 needs FP8 tensor cores \(sm_89 or newer\); "
                                          r"target.archs has sm_80 \(A100\)"):
        parse_build_config(_tiny_rtx("A100", "sm_80", "fp8"))


def test_fp8_export_refused_for_a_gpu_without_fp8(exports, tmp_path):
    """A bf16 sm_80 config given an FP8 export: refused before TensorRT builds anything."""
    from trtfalcon.engine.build import build_tensorrt_engine

    with pytest.raises(ConfigError, match="holds FP8 tensors, which A100 .sm_80. cannot run"):
        build_tensorrt_engine(parse_build_config(_tiny_rtx("A100", "sm_80", "bf16")), exports["fp8"], tmp_path / "e")
    assert not (tmp_path / "e").exists()


def _kernel_configurations(kernels_manifest: dict) -> set:
    """(plugin, input dtypes) of each kernel the kernels stage compiled, read from its Triton signature."""
    from trtfalcon.dtypes import lookup
    from trtfalcon.plugins.tensorrt import plugin_kernels

    out = set()
    for r in kernels_manifest["kernels"]:
        op, _ = plugin_kernels()[r["plugin"]]
        dtypes = {i.name: lookup(r["signature"][f"{i.name}_ptr"][1:], "triton").long for i in op.inputs}
        out.add((r["plugin"], tuple(sorted(dtypes.items()))))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config", ["rtx4090-fp8-b8-isl512-osl8k", "rtxpro6000-fp8-b32-isl512-osl32k"])
def test_cli_build_with_the_rtx_fp8_config(exports, tmp_path, config):
    """`trtfalcon build --config build_configs/<RTX FP8 config> --checkpoint HF --out DIR` on this CPU machine, for
    sm_89 (RTX 4090) and sm_120 (RTX PRO 6000): the shipped config as is; the checkpoint is the tiny model's FP8
    Hugging Face checkpoint (ModelOpt's format: build converts it; quantizing a bf16 one with the config's 256 x
    2048-token calibration takes ~17 min on 2 cores). The kernels stage compiles exactly the configurations the
    engine's plugin layers run (their plugins and dtypes), none spilling, and says so in build.json."""
    cfg = ROOT / "build_configs" / f"{config}.yaml"
    bc = load_build_config(cfg)
    arch = bc.target.archs[0]
    out = tmp_path / "build"
    r = subprocess.run([sys.executable, "-m", "trtfalcon.cli", "build", "--config", str(cfg), "--checkpoint",
                        str(exports["fp8_hf"]), "--out", str(out)], capture_output=True, text=True, env=_env(),
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    record = json.loads((out / "build.json").read_text())
    assert {k: v["status"] for k, v in record["stages"].items()} == {
        "convert": "done", "export": "done", "kernels": "done", "engine": "done"}
    m = _manifest(out / "engine")
    assert m["builder"]["compute_capability"] == arch and m["build_config"]["name"] == bc.name
    assert (out / "engine" / "model.engine").stat().st_size == m["engine_bytes"] > 1_000_000
    assert m["fp8"] and m["profile"]["block_tables"]["max"] == [bc.runtime.max_batch_size, bc.blocks_per_seq]
    kernels = json.loads((out / "kernels" / "manifest.json").read_text())
    assert kernels["archs"] == [arch]
    p = bc.precision
    assert record["stages"]["kernels"]["selection"] == kernels["selection"] == {
        "kernels": "engine", "dtype": [p.compute], "kv_cache": [p.kv_cache], "ssm_state": [p.ssm_state],
        "conv_state": [p.conv_state]}
    assert len(record["stages"]["kernels"]["configurations"]) == len(kernels["kernels"]) == 4
    assert not [k for k in kernels["kernels"] if k["resources"]["spill_stores"] or k["resources"]["spill_loads"]]
    engine_runs = {(v["plugin"], tuple(sorted(v["dtypes"].items()))) for v in m["plugin_layers"].values()}
    assert _kernel_configurations(kernels) == engine_runs


def _engine_plugin_fields(engine: bytes, kernel: str) -> tuple[dict, str]:
    """The kernel record and PTX a plugin serialized into the engine file (plugins/tensorrt_rtx.py KERNEL_FIELD,
    PTX_FIELD), read from the engine's bytes."""
    meta = json.loads(re.search(rb'\{"name": "' + kernel.encode() + rb'".*?"key": "[0-9a-f]+"\}', engine).group())
    entry = engine.index(f".entry {kernel}(".encode())
    start = engine.rindex(b"//\n// Generated by LLVM NVPTX", 0, entry)
    return meta, engine[start:engine.index(b"\0", entry)].decode()


@pytest.mark.slow
@pytest.mark.parametrize("plugin", ["causal_conv1d", "ssd", "paged_attention"])
def test_runtime_plugin_from_the_engine_launches_its_kernel(engines, monkeypatch, plugin):
    """The plugin made at load time from the engine's fields launches the engine's PTX with the spec's grid and
    ABI: input pointers, scalar arguments from the shapes, output pointers (the aliased pool's = TensorRT's output
    buffer), num_warps * 32 threads, on TensorRT's stream."""
    import numpy as np

    import trtfalcon.plugins.cuda_driver as cuda_driver
    from trtfalcon.plugins.ops import OPS
    from trtfalcon.plugins.tensorrt_rtx import KERNEL_FIELD, PTX_FIELD, creators, register_rtx_plugins
    from trtfalcon.tensorrt_import import import_tensorrt

    trt = import_tensorrt("tensorrt-rtx")
    register_rtx_plugins(trt)
    m = _manifest(engines["sm89-bf16"])
    layer, seen = next((k, v) for k, v in m["plugin_layers"].items() if v["plugin"] == plugin)
    meta, ptx = _engine_plugin_fields((engines["sm89-bf16"] / "model.engine").read_bytes(), seen["kernel"])
    op = OPS[plugin]
    chars = lambda name, text: trt.PluginField(  # noqa: E731
        name, np.frombuffer(text.encode() + b"\0", dtype=np.int8).copy(), trt.PluginFieldType.CHAR)
    fields = [chars(KERNEL_FIELD, json.dumps(meta)), chars(PTX_FIELD, ptx)]
    runtime_plugin = creators()[plugin].create_plugin(layer, trt.PluginFieldCollection(fields),
                                                      trt.TensorRTPhase.RUNTIME)

    # a step of 3 sequences, 10 tokens; static dims as the engine has them
    n_seqs, n_tokens = 3, 10
    shapes = {}
    for name, io in [(i.name, i) for i in op.inputs]:
        lo = seen["inputs"][name]["min"]
        shape = [n_tokens if s == "num_tokens" else n_seqs + 1 if s == "num_seqs+1" else n_seqs if s == "num_seqs"
                 else 4 if s in ("num_slots", "num_blocks", "max_blocks") else d for s, d in zip(io.shape, lo)]
        shapes[name] = shape

    def desc(shape, dtype):
        d = trt.PluginTensorDesc()
        d.dims, d.type, d.format = trt.Dims(shape), getattr(trt, {"bfloat16": "bfloat16", "float32": "float32",
                                                                   "int32": "int32"}[dtype]), trt.TensorFormat.LINEAR
        return d

    inputs = [desc(shapes[i.name], seen["dtypes"][i.name]) for i in op.inputs]
    outputs = [desc(shapes[o.like], seen["dtypes"][o.like]) for o in op.outputs]
    in_ptrs = [0x1000 * (k + 1) for k in range(len(op.inputs))]
    out_ptrs = [0x90000 + 0x1000 * k for k in range(len(op.outputs))]
    launches = []

    class RecordedDriver:
        def function(self, key, name, ptx_text, shared_mem):
            launches.append({"ptx": ptx_text, "name": name})
            return "fn"

        def launch(self, fn, name, grid, block_x, shared_mem, stream, signature, values):
            launches[-1].update(grid=grid, block_x=block_x, shared_mem=shared_mem, stream=stream, values=values,
                                signature=signature)

    monkeypatch.setattr(cuda_driver, "driver", lambda: RecordedDriver())
    runtime_plugin.enqueue(inputs, outputs, in_ptrs, out_ptrs, 0, 0xBEEF)
    (launch,) = launches
    assert launch["ptx"] == ptx and launch["name"] == seen["kernel"] == meta["name"]
    assert launch["block_x"] == meta["num_warps"] * 32 and launch["shared_mem"] == meta["shared_mem"]
    assert launch["stream"] == 0xBEEF
    c = meta["constexprs"]
    # the spec's grids and scalar arguments (plugins/spec.py), written out for these shapes
    if plugin == "causal_conv1d":
        expected = ([n_seqs, -(-shapes["x"][1] // c["BLOCK_C"])], [shapes["x"][1]])
    elif plugin == "ssd":
        expected = ([n_seqs, shapes["x"][1], -(-shapes["x"][2] // c["BLOCK_P"])], [])
    else:
        expected = ([-(-n_tokens // c["TOKENS_PER_TILE"]), n_seqs, shapes["k"][1]],
                    [shapes["kv_cache"][1], shapes["kv_cache"][2], shapes["block_tables"][1]])
    assert launch["grid"] == expected[0]
    assert launch["values"] == in_ptrs + expected[1] + out_ptrs
    assert list(launch["signature"].values()).count("i32") == len(expected[1])


def test_cuda_driver_packs_the_kernel_abi_and_says_when_the_driver_is_missing():
    import ctypes

    from trtfalcon.errors import MissingDependencyError
    from trtfalcon.plugins.cuda_driver import CudaDriver, CudaDriverError, pack_kernel_args

    sig = {"x_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr", "out_ptr": "*fp32"}
    params, keep = pack_kernel_args(sig, [0xDEAD0000, -7, 0xBEEF0000])
    assert ctypes.cast(params[0], ctypes.POINTER(ctypes.c_uint64)).contents.value == 0xDEAD0000
    assert ctypes.cast(params[1], ctypes.POINTER(ctypes.c_int32)).contents.value == -7
    assert ctypes.cast(params[2], ctypes.POINTER(ctypes.c_uint64)).contents.value == 0xBEEF0000
    with pytest.raises(CudaDriverError, match="kernel takes 3 arguments"):
        pack_kernel_args(sig, [1, 2])
    with pytest.raises(CudaDriverError, match="does not fit the kernel's i32"):
        pack_kernel_args(sig, [1, 2**31, 3])
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        with pytest.raises(MissingDependencyError, match="needs the NVIDIA driver .libcuda.so.1"):
            CudaDriver()
    else:
        pytest.skip("an NVIDIA driver is installed here")
