"""Ahead-of-time build of every plugin kernel for given GPU architectures, on a machine with no GPU.

`compile_all(["sm_90", "sm_100"], out_dir)` compiles each op's kernels (plugins/spec.py) for each architecture and
configuration (activation dtype fp32/bf16, state/cache dtype, constexpr variants) with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`, and writes per kernel and configuration:

    out_dir/<arch>/<plugin>__<config>.ptx     what TensorRT embeds (the AOT plugin API takes PTX)
    out_dir/<arch>/<plugin>__<config>.cubin   Triton's own ptxas output, for inspection
    out_dir/<arch>/<plugin>__<config>.json    kernel name, launch parameters, grid and scalar expressions,
                                              resources
    out_dir/manifest.json                     every record above, in one list

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
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from trtfalcon.config import FalconH1Config, preset
from trtfalcon.errors import TrtFalconError
from trtfalcon.plugins.triton_lang import require_triton
from trtfalcon.plugins.ops import OPS
from trtfalcon.plugins.spec import DTYPES, KernelContext, KernelSpec, OpSpec


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
            sig[n] = "*" + DTYPES[ptr_dtype[n]][1]
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
    gpu = f"sm_{cc}a" if cc in (90, 100) else f"sm_{cc}"
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

    attrs = {**op.attr_defaults(), **attrs}
    present = {i.name: True for i in op.inputs}  # graph formats always pass every input (fill for absent ones)
    ctx = KernelContext(attrs, dtypes, present, static_dim)
    constexprs = {k: v for k, v in ks.constexprs(ctx).items() if k in ks.fn.arg_names}
    all_constexprs = ks.constexprs(ctx)
    sig = kernel_signature(op, ks, dtypes, attrs, constexprs)
    num_warps = ks.num_warps(all_constexprs)
    target = GPUTarget("cuda", cc, 32) if cc is not None else None
    compiled = triton.compile(ASTSource(ks.fn, sig, constexprs=constexprs), target=target,
                              options=dict(num_warps=num_warps, num_stages=ks.num_stages, enable_fp_fusion=True))
    md = compiled.metadata
    cc_used = cc if cc is not None else int(str(md.arch).removeprefix("sm").rstrip("a"))
    ptx = strip_hidden_params(compiled.asm["ptx"], md.name, len(op.kernel_param_names(ks)))
    comp = CompiledKernel(
        plugin=op.plugin_name(ks), kernel=ks.name, config=config, arch=f"sm_{cc_used}", name=md.name, ptx=ptx,
        cubin=compiled.asm.get("cubin", b""), num_warps=md.num_warps, shared_mem=md.shared, signature=sig,
        constexprs=all_constexprs, grid=[str(e) for e in ks.grid],
        scalars=[[n, str(e)] for n, e in ks.scalars],
    )
    if resources:
        comp.resources = ptxas_resources(ptx, cc_used)
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


def configurations(cfg: FalconH1Config, act_dtypes: Iterable[str] = ("float32", "bfloat16")) -> list[BuildConfig]:
    """Every (op, kernel, dtype, variant) an engine for `cfg` may use: activations fp32 or bf16; the SSM state
    pool fp32 or bf16; the conv state in the activation dtype or fp32; the KV cache in the activation dtype or
    FP8 (E4M3, with its k/v scales; sm_89 and newer); norm with/without, before/after gate."""
    out: list[BuildConfig] = []
    i32 = "int32"
    conv_dim, K = cfg.conv_dim, cfg.mamba_d_conv
    H, P, G, N = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_groups, cfg.mamba_d_state
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    lim = cfg.time_step_limit
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    for act in act_dtypes:
        a = short[act]
        for st in sorted({act, "float32"}):
            out.append(BuildConfig(
                "causal_conv1d", "varlen", f"x-{a}_state-{short[st]}",
                dict(x=act, weight=act, bias=act, conv_state=st, cu_seqlens=i32, context_lens=i32, state_slots=i32),
                dict(activation=True), dict(x=(1, conv_dim), weight=(conv_dim, K))))
        for kern in ("chunked", "recurrent"):
            for st in ("float32", "bfloat16"):
                out.append(BuildConfig(
                    "ssd", kern, f"x-{a}_state-{short[st]}",
                    dict(x=act, dt=act, A="float32", B=act, C=act, D="float32", dt_bias="float32", ssm_state=st,
                         cu_seqlens=i32, context_lens=i32, state_slots=i32),
                    dict(chunk_size=cfg.mamba_chunk_size, dt_min=float(lim[0]), dt_max=float(lim[1])),
                    dict(x=(1, H, P), B=(1, G, N))))
        for kern in ("prefill", "decode"):
            for cache in (act, "float8_e4m3fn"):
                fp8 = cache == "float8_e4m3fn"
                out.append(BuildConfig(
                    "paged_attention", kern, f"qkv-{a}_cache-{'fp8' if fp8 else a}",
                    dict(q=act, k=act, v=act, kv_cache=cache, block_tables=i32, cu_seqlens=i32, context_lens=i32,
                         k_scale="float32", v_scale="float32"),
                    dict(scale=0.0), dict(q=(1, hq, hd), k=(1, hkv, hd)), min_cc=89 if fp8 else 0))
        for has_norm, nbg in ((True, False), (True, True), (False, False)):
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
                config: FalconH1Config | None = None,
                act_dtypes: Iterable[str] = ("float32", "bfloat16")) -> dict[str, Any]:
    """Compile every kernel for every arch and configuration of `config` (default: the Falcon-H1-7B preset).

    Writes the artifacts described in the module docstring under out_dir and returns the manifest
    {"model": ..., "archs": [...], "kernels": [record, ...]}. progress(msg) is called once per kernel compiled.
    """
    cfg = config if config is not None else preset("7b")
    out_dir = Path(out_dir)
    configs = configurations(cfg, act_dtypes)
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
                "kernels": records}
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


__all__ = ["AOTError", "BuildConfig", "CompiledKernel", "REPORT_COLUMNS", "compile_all", "compile_config",
           "compile_kernel", "configurations", "parse_arch", "ptxas_resources", "report_rows", "spilling"]
