"""Which kernel configurations are compiled: plugins/aot.py `configurations(cfg, KernelSelection)`, the one place
where `plugins compile` (every configuration unless narrowed) and `build` (exactly its engine's) decide it; and every
shipped build config's engine kernels compiling without register spills for its archs, at the tiny and 7B shapes."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from trtfalcon.config import preset  # noqa: E402
from trtfalcon.engine.build import engine_kernel_selection  # noqa: E402
from trtfalcon.engine.config import load_build_config  # noqa: E402
from trtfalcon.errors import ConfigError  # noqa: E402
from trtfalcon.plugins.aot import KernelSelection, compile_all, configurations  # noqa: E402
from trtfalcon.plugins.ops import OPS  # noqa: E402

ROOT = Path(__file__).parents[2]
SHIPPED = sorted((ROOT / "build_configs").glob("*.yaml"))


def _keys(configs) -> set[tuple[str, str]]:
    """(plugin name = the ONNX op type, configuration tag) of each configuration."""
    return {(OPS[bc.op].plugin_name(OPS[bc.op].kernel(bc.kernel)), bc.tag) for bc in configs}


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_by_default_every_configuration():
    expected = set()
    for a in ("fp32", "bf16"):
        expected |= {("causal_conv1d", f"x-{a}_state-{s}") for s in {a, "fp32"}}
        expected |= {(p, f"x-{a}_state-{s}") for p in ("ssd", "ssd_recurrent") for s in ("fp32", "bf16")}
        expected |= {(p, f"qkv-{a}_cache-{c}") for p in ("paged_attention", "paged_attention_decode")
                     for c in (a, "fp8")}
        expected |= {("gated_rms_norm", f"y-{a}_{v}") for v in ("gate-then-norm", "norm-before-gate", "gate-only")}
    configs = configurations(preset("7b"))
    assert len(configs) == len(expected) == 25 and _keys(configs) == expected


def test_an_engine_compiles_its_precision_and_its_kernels_only():
    """A build config's precision -> one configuration per op: the kernel the export writes (each op's general one),
    in the engine's dtypes, with the model's gated-norm variant."""
    cfg = preset("7b")  # gated norm on, after the gate
    configs = configurations(cfg, KernelSelection.for_engine("bf16", "fp8", "fp32", "bf16"))
    assert _keys(configs) == {("causal_conv1d", "x-bf16_state-bf16"), ("ssd", "x-bf16_state-fp32"),
                              ("paged_attention", "qkv-bf16_cache-fp8"), ("gated_rms_norm", "y-bf16_gate-then-norm")}
    by_op = {bc.op: bc for bc in configs}
    assert by_op["paged_attention"].dtypes["kv_cache"] == "float8_e4m3fn" and by_op["paged_attention"].min_cc == 89
    assert by_op["ssd"].dtypes["ssm_state"] == "float32" and by_op["ssd"].dtypes["x"] == "bfloat16"
    assert by_op["causal_conv1d"].dtypes["conv_state"] == "bfloat16"
    assert by_op["gated_rms_norm"].attrs["out_dtype"] == "bfloat16"
    assert {bc.kernel for bc in configs} == {op.kernels[0].name for op in OPS.values()}
    # the model's own norm variant (export/onnx.py passes these attributes)
    for rms, before, tag in ((False, False, "gate-only"), (True, True, "norm-before-gate")):
        model = dataclasses.replace(cfg, mamba_rms_norm=rms, mamba_norm_before_gate=before)
        (norm,) = [bc for bc in configurations(model, KernelSelection.for_engine("fp32", "fp32", "bf16", "fp32"))
                   if bc.op == "gated_rms_norm"]
        assert norm.tag == f"y-fp32_{tag}" and (norm.attrs["has_norm"], norm.attrs["norm_before_gate"]) == (rms, before)


def test_a_shipped_build_configs_selection_is_its_precision():
    bc = load_build_config(ROOT / "build_configs" / "h100-fp8-fp8kv-b64-isl512-osl32k.yaml")
    assert engine_kernel_selection(bc).record() == {"kernels": "engine", "dtype": ["bf16"], "kv_cache": ["fp8"],
                                                    "ssm_state": ["fp32"], "conv_state": ["bf16"]}


def test_narrowing_one_dtype_keeps_every_choice_of_the_others():
    keys = _keys(configurations(preset("tiny"), KernelSelection(dtypes=("bf16",), kv_cache=("fp8",))))
    assert {k for k in keys if k[0].startswith("paged_attention")} == {
        ("paged_attention", "qkv-bf16_cache-fp8"), ("paged_attention_decode", "qkv-bf16_cache-fp8")}
    assert {k for k in keys if k[0] == "causal_conv1d"} == {("causal_conv1d", "x-bf16_state-bf16"),
                                                             ("causal_conv1d", "x-bf16_state-fp32")}
    assert len([k for k in keys if k[0].startswith("ssd")]) == 4 and not any("fp32" in k[1][:6] for k in keys)


def test_a_bad_selection_names_the_field():
    with pytest.raises(ConfigError, match=r"kernel selection: kv_cache: expected one of bf16, fp16, fp32, fp8, "
                                          r"found 'int8'"):
        KernelSelection(kv_cache=("int8",))
    with pytest.raises(ConfigError, match=r"kernel selection: ssm_state: expected one of fp32, bf16, found 'fp16'"):
        KernelSelection(ssm_state=("fp16",))
    with pytest.raises(ConfigError, match=r"kernel selection: dtypes: expected a non-empty tuple"):
        KernelSelection(dtypes=())


def test_plugins_compile_options_narrow_the_selection(tmp_path, monkeypatch):
    """`trtfalcon plugins compile`: every configuration by default; each dtype option narrows its field only, as
    KernelSelection does for `build` (--engine-kernels: the engine's kernels)."""
    from click.testing import CliRunner

    from trtfalcon.cli import main
    from trtfalcon.plugins import aot

    seen = []
    monkeypatch.setattr(aot, "compile_kernels", lambda archs, out, **kw: seen.append((archs, kw["selection"])) or {})
    monkeypatch.setattr(aot, "print_kernel_report", lambda manifest, out: None)
    args = ["plugins", "compile", "--out", str(tmp_path / "k"), "--preset", "tiny"]
    assert CliRunner().invoke(main, args).exit_code == 0
    r = CliRunner().invoke(main, args + ["--arch", "sm_89", "--dtype", "bf16", "--kv-cache-dtype", "fp8",
                                         "--kv-cache-dtype", "bf16", "--conv-state-dtype", "fp32", "--engine-kernels"])
    assert r.exit_code == 0, r.output
    assert seen == [(["sm_90"], KernelSelection()),
                    (["sm_89"], KernelSelection(("bf16",), ("fp8", "bf16"), ("fp32", "bf16"), ("fp32",), True))]
    r = CliRunner().invoke(main, args + ["--ssm-state-dtype", "fp16"])
    assert r.exit_code == 2 and "'fp16' is not one of 'fp32', 'bf16'" in r.output


def test_fp8_asked_for_an_arch_without_it_is_refused(tmp_path):
    """By default the FP8-cache kernels are skipped for sm_80/86; asked for by name they are an error, before any
    compile."""
    with pytest.raises(ConfigError, match=r"kv_cache fp8 needs sm_89 or newer .* arch sm_80 cannot run "
                                          r"paged_attention qkv-bf16_cache-fp8"):
        compile_all(["sm_90", "sm_80"], tmp_path, config=preset("tiny"),
                    selection=KernelSelection.for_engine("bf16", "fp8", "fp32", "bf16"))
    assert not any(tmp_path.iterdir())


# Compiles at the 7B shape (one subprocess: this process runs Triton's interpreter): every shipped build config's
# engine configurations for its archs (what its kernels stage compiles, engine_kernel_selection), and the attention
# configurations that take the mma.sync tiles; each (arch, configuration) once.
_COMPILE_7B = """
import json, sys
from trtfalcon.config import preset
from trtfalcon.engine.build import engine_kernel_selection
from trtfalcon.engine.config import load_build_config
from trtfalcon.plugins.aot import compile_config, configurations, parse_arch
from trtfalcon.plugins.spec import mma_sync_only

cfg, compiled, shipped = preset("7b"), {}, {}

def compile(cc, bc):
    key = f"sm_{cc} {bc.op} {bc.kernel} {bc.tag}"
    if key not in compiled:
        c = compile_config(bc, cc)
        compiled[key] = {"arch": f"sm_{cc}", "plugin": c.plugin, "kernel": bc.kernel, "config": bc.tag,
                         "resources": c.resources, "BLOCK_M": c.constexprs.get("BLOCK_M"),
                         "BLOCK_N": c.constexprs.get("BLOCK_N"), "warps": c.num_warps}
    return key

for path in sys.argv[1:]:
    bc = load_build_config(path)
    shipped[bc.name] = [compile(parse_arch(a), k) for a in bc.target.archs
                        for k in configurations(cfg, engine_kernel_selection(bc))]
tiled = [compile(cc, k) for cc in (80, 86, 89, 120) for k in configurations(cfg)
         if k.op == "paged_attention" and cc >= k.min_cc
         and ("fp32" in k.tag or "fp8" in k.tag) and not (k.kernel == "decode" and "cache-fp8" not in k.tag)]
print(json.dumps({"compiled": compiled, "shipped": shipped, "tiled": tiled}))
"""


@pytest.fixture(scope="module")
def compiled_7b():
    r = subprocess.run([sys.executable, "-c", _COMPILE_7B, *map(str, SHIPPED)], capture_output=True, text=True,
                       env=_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _no_spill(row: dict) -> bool:
    res = row["resources"]
    return res["spill_stores"] == res["spill_loads"] == 0 and 0 < res["registers"] <= 255


@pytest.mark.slow
def test_every_shipped_configs_engine_kernels_compile_without_spills_at_7b(compiled_7b):
    """What each shipped build config's kernels stage compiles (engine_kernel_selection, as `build` runs it), at the
    7B's shape the configs are for: one kernel per op for each of its archs, in its precision, none spilling."""
    assert len(compiled_7b["shipped"]) == len(SHIPPED) >= 9
    for path in SHIPPED:
        bc = load_build_config(path)
        p = bc.precision
        rows = [compiled_7b["compiled"][key] for key in compiled_7b["shipped"][bc.name]]
        assert {(row["arch"], row["plugin"], row["config"]) for row in rows} == {
            (arch, plugin, config) for arch in bc.target.archs for plugin, config in (
                ("causal_conv1d", f"x-{p.compute}_state-{p.conv_state}"), ("ssd", f"x-{p.compute}_state-{p.ssm_state}"),
                ("paged_attention", f"qkv-{p.compute}_cache-{p.kv_cache}"),
                ("gated_rms_norm", f"y-{p.compute}_gate-then-norm"))}, bc.name  # the 7B's norm: after the gate
        assert all(_no_spill(row) for row in rows), (bc.name, [r for r in rows if not _no_spill(r)])


@pytest.mark.slow
def test_attention_tiles_per_arch_do_not_spill_at_7b_heads(compiled_7b):
    """The attention configurations whose default tiles spilled at the 7B's heads on the mma.sync GPUs (FP8 caches
    on sm_89/120, fp32 on sm_80/86/89) take plugins/spec.py's smaller tiles there and keep every value in registers:
    32-row prefill tiles on 4 warps, 16-key decode tiles."""
    rows = [compiled_7b["compiled"][key] for key in compiled_7b["tiled"]]
    assert len(rows) == 2 + 2 * 5  # sm_80/86: fp32 prefill; sm_89/120: that, and FP8 caches (prefill, decode) x2
    for row in rows:
        assert _no_spill(row), row
        if row["kernel"] == "prefill":
            assert (row["BLOCK_M"], row["warps"]) == (32, 4), row
        else:
            assert row["BLOCK_N"] == 16, row
