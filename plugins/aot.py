"""Ahead-of-time build of every plugin kernel for given GPU architectures, on a machine with no GPU.

`compile_all(["sm_90", "sm_100"], out_dir)` compiles each op's kernels (plugins/spec.py) for each architecture and
configuration (activation dtype fp32/bf16, state/cache dtype, constexpr variants) with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`, and writes per kernel and configuration:

    out_dir/<arch>/<plugin>__<config>.ptx     what TensorRT embeds (the AOT plugin API takes PTX)
    out_dir/<arch>/<plugin>__<config>.cubin   Triton's own ptxas output, for inspection
    out_dir/<arch>/<plugin>__<config>.json    kernel name, launch parameters, grid and scalar expressions,
                                              resources
    out_dir/manifest.json                     every record above, in one list

`compile_kernels` is what `trtfalcon plugins compile`, the demo and `build` run: compile_all into an atomically
written directory, refusing Triton's interpreter and kernels that spill; `print_kernel_report` shows the result.
Which configurations: `configurations(cfg, KernelSelection(...))`, the one place both decide. `plugins compile`
takes every one unless its options narrow it; `build` takes `KernelSelection.for_engine(precision)`: exactly the
kernels and dtypes its engine runs, so a configuration the engine never uses cannot stop a build.

Where the resource numbers come from: Triton's metadata gives `shared` (dynamic shared memory the launch must
request) and `num_warps`; registers and spills are NOT in Triton's metadata without a GPU (it reads them from
the driver after loading), so we run the ptxas that Triton bundles (`ptxas -v`, the same binary that built the
cubin) on the PTX we ship and parse its "Used N registers, ... bytes spill stores/loads" lines.

ABI note: Triton 3.x appends two hidden pointer parameters to every kernel (global and profile scratch).
TensorRT launches a kernel with exactly inputs + scalar args + outputs, so we remove those two trailing
parameters from the PTX when the kernel never references them (scratch sizes 0, checked) and ptxas-verify the
result; a kernel that needs scratch fails loudly instead of being shipped with a mismatched signature.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trtfalcon.checkpoint.safetensors_io import atomic_output_dir
from trtfalcon.config import FalconH1Config, preset
from trtfalcon.dtypes import FLOAT_NAMES, KV_CACHE_NAMES, SSM_STATE_NAMES, lookup
from trtfalcon.errors import ConfigError, TrtFalconError
from trtfalcon.plugins.ops import OPS
from trtfalcon.plugins.spec import KernelContext, KernelSpec, OpSpec
from trtfalcon.plugins.triton_lang import require_triton


class AOTError(TrtFalconError):
    """A kernel that cannot be compiled ahead of time or whose PTX cannot match TensorRT's launch ABI."""


def parse_arch(arch: str) -> int:
    """'sm_90' / 'sm_90a' / '90' / 'sm100' -> 90 / 100."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)a?", arch.strip().lower())
    if not m:
        raise AOTError(f"--arch: expected an architecture like sm_90 or sm_100, found {arch!r}")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------------------------
# One compile
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CompiledKernel:
    plugin: str  # TensorRT plugin / ONNX op type
    kernel: str  # spec kernel name
    config: str  # configuration tag (dtypes, variants)
    arch: str
    name: str  # kernel symbol in the PTX
    ptx: str
    cubin: bytes
    num_warps: int
    shared_mem: int
    signature: dict[str, str]
    constexprs: dict[str, Any]
    grid: list[str]
    scalars: list[list[str]]
    resources: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "plugin": self.plugin, "kernel": self.kernel, "config": self.config, "arch": self.arch,
            "kernel_name": self.name,
            "launch": {"grid": self.grid, "block_x": self.num_warps * 32, "num_warps": self.num_warps,
                       "shared_mem": self.shared_mem},
            "scalar_args": self.scalars, "signature": self.signature,
            "constexprs": {k: v for k, v in self.constexprs.items()},
            "resources": self.resources,
        }


def kernel_signature(op: OpSpec, ks: KernelSpec, dtypes: dict[str, str], attrs: dict[str, Any],
                     constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton signature in the kernel's parameter order: inputs, scalars, outputs (the TensorRT ABI), constexprs."""
    expected = op.kernel_param_names(ks)
    params = [n for n in ks.fn.arg_names if n not in constexprs]
    if params != expected:
        raise AOTError(f"{op.name}/{ks.name}: kernel parameters {params} do not follow the spec's ABI {expected}")
    ptr_dtype = {f"{i.name}_ptr": dtypes[i.name] for i in op.inputs}
    for o in op.outputs:
        ptr_dtype[f"{o.name}_ptr"] = dtypes[o.alias] if o.alias else op.output_dtype(o, dtypes, attrs)
    sig: dict[str, str] = {}
    for n in ks.fn.arg_names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in ptr_dtype:
            sig[n] = "*" + lookup(ptr_dtype[n], "long").triton
        else:
            sig[n] = "i32"
    return sig


def strip_hidden_params(ptx: str, name: str, n_params: int) -> str:
    """Drop the parameters after the first n_params from `.entry name(...)` if the body never reads them."""
    m = re.search(r"(\.entry\s+" + re.escape(name) + r"\s*\()(.*?)(\))", ptx, re.S)
    if m is None:
        raise AOTError(f"{name}: no .entry in the PTX")
    params = [p.strip() for p in m.group(2).split(",") if p.strip()]
    if len(params) < n_params:
        raise AOTError(f"{name}: PTX has {len(params)} parameters, the spec declares {n_params}")
    extra = params[n_params:]
    for p in extra:
        pname = p.split()[-1]
        if re.search(r"\[" + re.escape(pname) + r"\]", ptx):
            raise AOTError(f"{name}: hidden parameter {pname} is used by the kernel (global/profile scratch); "
                           "TensorRT cannot pass it")
    kept = ",\n\t".join(params[:n_params])
    return ptx[: m.start(2)] + "\n\t" + kept + "\n" + ptx[m.end(2):]


_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack_frame": r"(\d+) bytes stack frame",
    "static_smem": r"(\d+) bytes smem",
}


def ptxas_resources(ptx: str, cc: int) -> dict[str, Any]:
    """Registers, spills, stack and static shared memory of the PTX, from Triton's bundled `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(cc).path
    target = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)  # Triton picks sm_90a / sm_100a / sm_120a itself
    gpu = target.group(1) if target else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "k.ptx", Path(d) / "k.cubin"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise AOTError(f"ptxas rejected the PTX for {gpu}:\n{proc.stderr[-2000:]}")
        log = proc.stderr + proc.stdout
    res: dict[str, Any] = {}
    for key, pat in _PTXAS_PATTERNS.items():
        m = re.search(pat, log)
        res[key] = int(m.group(1)) if m else 0
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    res["source"] = f"ptxas -v ({version[-1] if version else ptxas}) on the shipped PTX, --gpu-name={gpu}"
    return res


def compile_kernel(op: OpSpec, ks: KernelSpec, dtypes: dict[str, str], attrs: dict[str, Any],
                   static_dim: Callable[[str, int], int], cc: int | None, config: str = "",
                   resources: bool = True) -> CompiledKernel:
    """Compile one kernel of `op` for compute capability `cc` (None: the current GPU, as inside TensorRT's build).

    dtypes: dtype name of every input; attrs: the op's attributes (defaults filled in); static_dim(t, axis): the
    dimensions constant for the model (head counts, sizes) that become compile-time constants.
    """
    require_triton()
    from trtfalcon.plugins.triton_lang import INTERPRETING

    if INTERPRETING:
        raise AOTError("ahead-of-time compilation needs compiled kernels: unset TRITON_INTERPRET (the interpreter "
                       "replaces @triton.jit functions and upcasts dot operands)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if cc is None:  # the GPU doing the build (TensorRT 11's aot_impl): its tiles (KernelContext.cc), its target
        cc = triton.runtime.driver.active.get_current_target().arch
    attrs = {**op.attr_defaults(), **attrs}
    present = {i.name: True for i in op.inputs}  # graph formats always pass every input (fill for absent ones)
    ctx = KernelContext(attrs, dtypes, present, static_dim, cc)
    constexprs = {k: v for k, v in ks.constexprs(ctx).items() if k in ks.fn.arg_names}
    all_constexprs = ks.constexprs(ctx)
    sig = kernel_signature(op, ks, dtypes, attrs, constexprs)
    num_warps = ks.num_warps(all_constexprs)
    compiled = triton.compile(ASTSource(ks.fn, sig, constexprs=constexprs), target=GPUTarget("cuda", cc, 32),
                              options=dict(num_warps=num_warps, num_stages=ks.num_stages, enable_fp_fusion=True))
    md = compiled.metadata
    ptx = strip_hidden_params(compiled.asm["ptx"], md.name, len(op.kernel_param_names(ks)))
    comp = CompiledKernel(
        plugin=op.plugin_name(ks), kernel=ks.name, config=config, arch=f"sm_{cc}", name=md.name, ptx=ptx,
        cubin=compiled.asm.get("cubin", b""), num_warps=md.num_warps, shared_mem=md.shared, signature=sig,
        constexprs=all_constexprs, grid=[str(e) for e in ks.grid],
        scalars=[[n, str(e)] for n, e in ks.scalars],
    )
    if resources:
        comp.resources = ptxas_resources(ptx, cc)
        comp.resources["dynamic_smem"] = md.shared
    return comp


# ---------------------------------------------------------------------------------------------------------------
# The configurations a model needs
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildConfig:
    op: str
    kernel: str
    tag: str
    dtypes: dict[str, str]
    attrs: dict[str, Any]
    dims: dict[str, tuple[int, ...]]  # static dims per input (only those the constexprs read need be right)
    min_cc: int = 0  # oldest compute capability it compiles for (float8 conversions need sm_89)


@dataclass(frozen=True)
class KernelSelection:
    """Which kernel configurations to compile. Each dtype field holds short names (trtfalcon/dtypes.py); None: the
    ones listed for it. The default is every configuration the kernels are built for (`plugins compile`);
    `for_engine` is exactly what one engine runs (`build`'s kernels stage).

    dtypes      activations = the compute dtype (q/k/v, x, y, the conv weights)
    kv_cache    None: each activation dtype, and fp8 (E4M3 with its k/v scales; compiled for sm_89 and newer only)
    ssm_state   the SSM state pool
    conv_state  None: each activation dtype, and fp32
    engine_kernels  only what an exported engine holds: each op's general kernel (the ONNX node's op type,
                export/onnx.py) and the model's own gated-norm variant; False: every kernel (the decode and
                recurrent ones the torch executor picks by shape too) and every norm variant.
    """

    dtypes: tuple[str, ...] = ("fp32", "bf16")
    kv_cache: tuple[str, ...] | None = None
    ssm_state: tuple[str, ...] = SSM_STATE_NAMES
    conv_state: tuple[str, ...] | None = None
    engine_kernels: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("dtypes", FLOAT_NAMES), ("kv_cache", KV_CACHE_NAMES), ("ssm_state", SSM_STATE_NAMES),
                              ("conv_state", FLOAT_NAMES)):
            values = getattr(self, name)
            if values is None:
                continue
            if isinstance(values, str) or not values:
                raise ConfigError(f"kernel selection: {name}: expected a non-empty tuple of dtype names, found "
                                  f"{values!r}")
            for v in values:
                lookup(v, among=allowed, what=f"kernel selection: {name}")
            object.__setattr__(self, name, tuple(dict.fromkeys(values)))

    @classmethod
    def for_engine(cls, compute: str, kv_cache: str, ssm_state: str, conv_state: str) -> KernelSelection:
        """The configurations of one engine: its precision's dtypes (a build config's `precision`), its kernels."""
        return cls((compute,), (kv_cache,), (ssm_state,), (conv_state,), engine_kernels=True)

    def record(self) -> dict[str, Any]:
        """What was asked, as the manifest and build.json keep it (None: every one, per activation dtype)."""
        return {"kernels": "engine" if self.engine_kernels else "all", "dtype": list(self.dtypes),
                "kv_cache": None if self.kv_cache is None else list(self.kv_cache), "ssm_state": list(self.ssm_state),
                "conv_state": None if self.conv_state is None else list(self.conv_state)}


def configurations(cfg: FalconH1Config, selection: KernelSelection = KernelSelection()) -> list[BuildConfig]:
    """The (op, kernel, dtype, variant) configurations of `selection` for the model `cfg`: what `plugins compile`
    and `build` compile, so both decide here. By default every one an engine for `cfg` may use: activations fp32
    or bf16; the SSM state pool fp32 or bf16; the conv state in the activation dtype or fp32; the KV cache in the
    activation dtype or FP8 (E4M3, with its k/v scales; sm_89 and newer); norm with/without, before/after gate."""
    out: list[BuildConfig] = []
    i32 = "int32"
    conv_dim, K = cfg.conv_dim, cfg.mamba_d_conv
    H, P, G, N = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_groups, cfg.mamba_d_state
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    lim = cfg.time_step_limit
    long = lambda name: lookup(name).long  # noqa: E731 - the spec's tensor dtypes are long names

    def kernels(op: str, every: tuple[str, ...]) -> tuple[str, ...]:
        return (OPS[op].kernels[0].name,) if selection.engine_kernels else every

    if selection.engine_kernels:  # the export's attributes (export/onnx.py make_mamba)
        norms = ((cfg.mamba_rms_norm, cfg.mamba_norm_before_gate),)
    else:
        norms = ((True, False), (True, True), (False, False))
    for a in selection.dtypes:
        act = long(a)
        for st in selection.conv_state or sorted({a, "fp32"}, key=lambda n: long(n)):
            out.append(BuildConfig(
                "causal_conv1d", "varlen", f"x-{a}_state-{st}",
                dict(x=act, weight=act, bias=act, conv_state=long(st), cu_seqlens=i32, context_lens=i32,
                     state_slots=i32),
                dict(activation=True), dict(x=(1, conv_dim), weight=(conv_dim, K))))
        for kern in kernels("ssd", ("chunked", "recurrent")):
            for st in selection.ssm_state:
                out.append(BuildConfig(
                    "ssd", kern, f"x-{a}_state-{st}",
                    dict(x=act, dt=act, A="float32", B=act, C=act, D="float32", dt_bias="float32",
                         ssm_state=long(st), cu_seqlens=i32, context_lens=i32, state_slots=i32),
                    dict(chunk_size=cfg.mamba_chunk_size, dt_min=float(lim[0]), dt_max=float(lim[1])),
                    dict(x=(1, H, P), B=(1, G, N))))
        for kern in kernels("paged_attention", ("prefill", "decode")):
            for cache in selection.kv_cache or (a, "fp8"):
                out.append(BuildConfig(
                    "paged_attention", kern, f"qkv-{a}_cache-{cache}",
                    dict(q=act, k=act, v=act, kv_cache=long(cache), block_tables=i32, cu_seqlens=i32,
                         context_lens=i32, k_scale="float32", v_scale="float32"),
                    dict(scale=0.0), dict(q=(1, hq, hd), k=(1, hkv, hd)), min_cc=89 if cache == "fp8" else 0))
        for has_norm, nbg in norms:
            tag = f"y-{a}_" + (("norm-before-gate" if nbg else "gate-then-norm") if has_norm else "gate-only")
            out.append(BuildConfig(
                "gated_rms_norm", "rows", tag, dict(y=act, z=act, weight=act),
                dict(n_groups=G, eps=cfg.rms_norm_eps, norm_before_gate=nbg, has_norm=has_norm, out_dtype=act),
                dict(y=(1, cfg.mamba_d_ssm))))
    return out


def compile_config(bc: BuildConfig, cc: int, resources: bool = True) -> CompiledKernel:
    op = OPS[bc.op]
    return compile_kernel(op, op.kernel(bc.kernel), bc.dtypes, bc.attrs, lambda t, a: bc.dims[t][a], cc,
                          config=bc.tag, resources=resources)


def compile_all(archs: list[str], out_dir: Path, progress: Callable[[str], None] | None = None, *,
                config: FalconH1Config | None = None, selection: KernelSelection = KernelSelection()) -> dict[str, Any]:
    """Compile the kernels of `selection` (default: every one) for every arch, for the model `config` (default: the
    Falcon-H1-7B preset).

    Writes the artifacts described in the module docstring under out_dir and returns the manifest
    {"model": ..., "archs": [...], "selection": ..., "kernels": [record, ...]}. progress(msg) is called once per
    kernel compiled.
    """
    cfg = config if config is not None else preset("7b")
    out_dir = Path(out_dir)
    configs = configurations(cfg, selection)
    if selection.kv_cache is not None:  # asked for by name: a configuration an arch cannot run is an error, not a skip
        for arch in archs:
            unable = sorted({f"{bc.op} {bc.tag}" for bc in configs if parse_arch(arch) < bc.min_cc})
            if unable:
                raise ConfigError(f"kernel selection: kv_cache fp8 needs sm_89 or newer (E4M3 conversions); arch "
                                  f"{arch} cannot run {', '.join(unable)}: compile fp8 for newer archs only")
    records: list[dict[str, Any]] = []
    for arch in archs:
        cc = parse_arch(arch)
        adir = out_dir / f"sm_{cc}"
        adir.mkdir(parents=True, exist_ok=True)
        for bc in configs:
            if cc < bc.min_cc:
                continue
            comp = compile_config(bc, cc)
            stem = f"{comp.plugin}__{bc.tag}"
            (adir / f"{stem}.ptx").write_text(comp.ptx)
            if comp.cubin:
                (adir / f"{stem}.cubin").write_bytes(comp.cubin)
            rec = comp.record()
            rec["files"] = {"ptx": f"sm_{cc}/{stem}.ptx", "cubin": f"sm_{cc}/{stem}.cubin"}
            (adir / f"{stem}.json").write_text(json.dumps(rec, indent=2, default=str) + "\n")
            records.append(rec)
            if progress is not None:
                r = comp.resources
                progress(f"sm_{cc} {stem}: {r.get('registers')} regs, {r.get('spill_stores', 0)}+"
                         f"{r.get('spill_loads', 0)} B spilled, {comp.shared_mem} B smem")
    manifest = {"model": cfg.summary(), "archs": [f"sm_{parse_arch(a)}" for a in archs],
                "selection": selection.record(), "kernels": records}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


REPORT_COLUMNS = ("arch", "plugin", "config", "registers", "spill_stores", "spill_loads", "shared_mem",
                  "num_warps", "grid")


def report_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per compiled kernel (columns REPORT_COLUMNS), for a table in the CLI or a report."""
    rows = []
    for r in manifest["kernels"]:
        res = r.get("resources", {})
        rows.append({
            "arch": r["arch"], "plugin": r["plugin"], "config": r["config"],
            "registers": res.get("registers"), "spill_stores": res.get("spill_stores"),
            "spill_loads": res.get("spill_loads"), "shared_mem": r["launch"]["shared_mem"],
            "num_warps": r["launch"]["num_warps"], "grid": " x ".join(r["launch"]["grid"]),
        })
    return rows


def spilling(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of kernels that spill registers (should be empty)."""
    return [r for r in report_rows(manifest) if (r["spill_stores"] or 0) + (r["spill_loads"] or 0) > 0]


# ---------------------------------------------------------------------------------------------------------------
# What `plugins compile`, the demo and `build` run
# ---------------------------------------------------------------------------------------------------------------
def compile_kernels(archs: list[str], out_dir: str | Path, *, config: FalconH1Config | None = None,
                    selection: KernelSelection = KernelSelection(), overwrite: bool = False,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """compile_all into out_dir, written atomically (nothing is left there if a compile fails); returns the manifest.

    Raises ConfigError when TRITON_INTERPRET is set (the interpreter replaces Triton's compiler), and, once out_dir
    is written (its PTX and manifest are what one inspects), when any kernel spills registers.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise ConfigError("unset TRITON_INTERPRET: ahead-of-time compilation needs Triton's compiler")
    require_triton()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        manifest = compile_all(list(archs), tmp, progress=progress, config=config, selection=selection)
    bad = spilling(manifest)
    if bad:
        spills = ", ".join(f"{r['arch']} {r['plugin']} {r['config']} ({r['spill_stores']}+{r['spill_loads']} B)"
                           for r in bad)
        raise ConfigError(f"{len(bad)} kernel(s) spill registers: {spills}; expected none (see "
                          f"{Path(out_dir) / 'manifest.json'}; each kernel's tiles per arch are in its declaration, "
                          "plugins/spec.py)")
    return manifest


def kernel_report(manifest: dict[str, Any]) -> Any:
    """The report of a compile as a rich Table: one row per kernel, REPORT_COLUMNS but the grid (a shape
    expression: in each kernel's JSON)."""
    from rich.table import Table

    cols = [c for c in REPORT_COLUMNS if c != "grid"]
    t = Table(title=f"plugin kernels: {', '.join(manifest['archs'])}")
    for col in cols:
        t.add_column(col, justify="left" if col in ("arch", "plugin", "config") else "right")
    for row in report_rows(manifest):
        t.add_row(*("-" if row[c] is None else str(row[c]) for c in cols))
    return t


def print_kernel_report(manifest: dict[str, Any], out_dir: str | Path | None = None) -> None:
    """Print kernel_report on stdout (into a pipe or a log file 160 columns wide, not squeezed into 80), then
    where the kernels were written."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(kernel_report(manifest))
    if out_dir is not None:
        console.out(f"wrote {len(manifest['kernels'])} kernels to {out_dir}", highlight=False)


__all__ = ["AOTError", "BuildConfig", "CompiledKernel", "KernelSelection", "REPORT_COLUMNS", "compile_all",
           "compile_config", "compile_kernel", "compile_kernels", "configurations", "kernel_report", "parse_arch",
           "print_kernel_report", "ptxas_resources", "report_rows", "spilling"]
