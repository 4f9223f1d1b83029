"""Build configs (build_configs/*.yaml): one validated schema, and a memory planner that says whether the weights,
the KV cache, the Mamba state and the activations fit the target GPU, and why.

A build config fixes what an engine is built for:
    model       the shape the planner uses when no checkpoint is given (`preset`); `build` uses the checkpoint's
    precision   weights fp8|bf16, compute dtype, KV cache / SSM state / conv state dtypes
    quantize    calibration settings, used when weights are fp8 and the checkpoint is a bf16 HF one
    runtime     max_batch_size, max_num_tokens (per step), max_seq_len (prompt + output), kv_block_size
    target      GPU model (its memory), the TensorRT build for it (TensorRT 11 or for RTX), architectures the plugin
                kernels are compiled for, memory utilization
    profile     the TensorRT optimization profile's "opt" point (min and max follow from `runtime`)
    workload    the isl -> osl the config is sized for (max_seq_len must hold isl + osl)
Unknown keys are errors (a typo must not silently fall back to a default); every error names the file and key.

The plan sizes the KV pool for every sequence at full length (max_batch_size x ceil(max_seq_len / block)
blocks): the in-flight runtime then never preempts. The same numbers size the TensorRT optimization profile.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trtfalcon.config import FalconH1Config, PRESETS, preset
from trtfalcon.dtypes import FloatName, KvCacheName, SsmStateName, lookup
from trtfalcon.errors import ConfigError

GiB = 2**30

# Memory as the driver reports it (nvidia-smi "Total", MiB), not the marketing number: an "80 GB" H100 has
# 81,559 MiB = 79.6 GiB; a "141 GB" H200 has 143,771 MiB = 140.4 GiB. `builder`: the TensorRT build that targets
# the GPU (trtfalcon/tensorrt_import.py): TensorRT 11 for the datacenter Hopper/Blackwell parts, TensorRT for RTX
# for Ampere / Ada / consumer-and-workstation Blackwell (it builds for their compute capability on any machine).
GPUS: dict[str, dict[str, Any]] = {
    "H100": {"memory_mib": 81_559, "arch": "sm_90", "bandwidth_tbs": 3.35, "builder": "tensorrt"},
    "H200": {"memory_mib": 143_771, "arch": "sm_90", "bandwidth_tbs": 4.8, "builder": "tensorrt"},
    "B200": {"memory_mib": 183_359, "arch": "sm_100", "bandwidth_tbs": 8.0, "builder": "tensorrt"},
    "A100": {"memory_mib": 81_920, "arch": "sm_80", "bandwidth_tbs": 2.0, "builder": "tensorrt-rtx"},  # 80 GB SXM
    "RTXA6000": {"memory_mib": 49_140, "arch": "sm_86", "bandwidth_tbs": 0.77, "builder": "tensorrt-rtx"},
    "RTX4090": {"memory_mib": 24_564, "arch": "sm_89", "bandwidth_tbs": 1.01, "builder": "tensorrt-rtx"},
    "RTX6000Ada": {"memory_mib": 49_140, "arch": "sm_89", "bandwidth_tbs": 0.96, "builder": "tensorrt-rtx"},
    "RTX5090": {"memory_mib": 32_607, "arch": "sm_120", "bandwidth_tbs": 1.79, "builder": "tensorrt-rtx"},
    "RTXPRO6000": {"memory_mib": 97_887, "arch": "sm_120", "bandwidth_tbs": 1.79, "builder": "tensorrt-rtx"},
}
FP8_MIN_CC = 89  # FP8 tensor cores: Ada (sm_89) and newer; TensorRT for RTX refuses fp8 for sm_80/sm_86


def _one_of(value: str, table: dict[str, Any]) -> str:
    """A field naming an entry of a table (presets, GPUs): pydantic puts the field's path before the message."""
    if value not in table:
        raise ValueError(f"expected one of {', '.join(table)}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    preset: str = Field("7b", description="Model shape for planning without a checkpoint: " + ", ".join(PRESETS))

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str) -> str:
        return _one_of(v, PRESETS)


class PrecisionSection(_Strict):
    weights: Literal["fp8", "bf16"] = "bf16"
    compute: FloatName = "bf16"
    kv_cache: KvCacheName = "bf16"
    ssm_state: SsmStateName = "fp32"
    conv_state: FloatName = "bf16"


class QuantizeSection(_Strict):
    calib_data: str | None = None
    calib_size: int = Field(128, ge=1)
    calib_seq_len: int = Field(2048, ge=2)
    holdout: int = Field(8, ge=0)
    conservative: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"


class RuntimeSection(_Strict):
    max_batch_size: int = Field(..., ge=1)
    max_num_tokens: int = Field(..., ge=1)
    max_seq_len: int = Field(..., ge=2)
    kv_block_size: int = Field(64, ge=1)

    @field_validator("kv_block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("must be a power of two (paged-attention tiles)")
        return v


class TargetSection(_Strict):
    gpu: str
    archs: list[str] = Field(default_factory=lambda: ["sm_90"], min_length=1)
    builder: Literal["tensorrt", "tensorrt-rtx"] | None = Field(
        None, description="TensorRT 11 or TensorRT for RTX; default: the GPU's (engine/config.py GPUS)")
    memory_gib: float | None = Field(None, gt=0, description="Overrides the GPU table (a MIG slice, a smaller SKU)")
    memory_utilization: float = Field(0.90, gt=0, le=1.0)
    reserve_gib: float = Field(2.0, ge=0, description="CUDA context, TensorRT runtime, fragmentation")

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: str) -> str:
        return _one_of(v, GPUS)

    @model_validator(mode="before")
    @classmethod
    def _rtx_default_arch(cls, raw: Any) -> Any:
        """A TensorRT for RTX target without archs is built for its GPU's compute capability (sm_90, the default
        otherwise, is not one TensorRT for RTX builds for)."""
        if isinstance(raw, dict) and "archs" not in raw and raw.get("gpu") in GPUS:
            if (raw.get("builder") or GPUS[raw["gpu"]]["builder"]) == "tensorrt-rtx":
                return {**raw, "archs": [GPUS[raw["gpu"]]["arch"]]}
        return raw

    @field_validator("archs")
    @classmethod
    def _archs(cls, v: list[str]) -> list[str]:
        from trtfalcon.plugins.aot import AOTError, parse_arch

        for a in v:
            try:
                parse_arch(a)
            except AOTError as e:
                raise ValueError(str(e).split(": ", 1)[-1]) from None
        return v

    @model_validator(mode="after")
    def _archs_for_builder(self) -> TargetSection:
        """What each TensorRT build can target: TensorRT 11 here is for sm_90 and newer (the datacenter GPUs it is
        tested for); TensorRT for RTX builds one engine per compute capability it lists, and the GPU's own."""
        from trtfalcon.plugins.aot import parse_arch
        from trtfalcon.tensorrt_import import RTX_COMPUTE_CAPABILITIES

        ccs = [parse_arch(a) for a in self.archs]
        if self.builder_name == "tensorrt-rtx":
            rtx = ", ".join(RTX_COMPUTE_CAPABILITIES)
            for a, cc in zip(self.archs, ccs):
                if f"sm_{cc}" not in RTX_COMPUTE_CAPABILITIES:
                    raise ValueError(f"archs: {a}: TensorRT for RTX builds for {rtx}, not sm_{cc} (sm_90 / "
                                     "sm_100 datacenter GPUs take target.builder: tensorrt)")
            if len(ccs) != 1:
                raise ValueError(f"archs: a TensorRT for RTX engine is built for one compute capability (its "
                                 f"plugin kernels are compiled for it), found {len(ccs)}: {', '.join(self.archs)}")
            gpu_cc = parse_arch(GPUS[self.gpu]["arch"])
            if ccs[0] != gpu_cc:
                raise ValueError(f"archs: {self.archs[0]} is not the {self.gpu}'s compute capability "
                                 f"({GPUS[self.gpu]['arch']})")
        else:
            for a, cc in zip(self.archs, ccs):
                if cc < 90:
                    raise ValueError(f"archs: {a}: the TensorRT 11 path targets sm_90 or newer (H100, H200, "
                                     "B200); for sm_80 / sm_86 / sm_89 / sm_120 GPUs set target.builder: tensorrt-rtx")
        return self

    @property
    def builder_name(self) -> str:
        """"tensorrt" (TensorRT 11) or "tensorrt-rtx" (TensorRT for RTX)."""
        return self.builder or GPUS[self.gpu]["builder"]

    @property
    def min_cc(self) -> int:
        from trtfalcon.plugins.aot import parse_arch

        return min(parse_arch(a) for a in self.archs)

    @property
    def total_bytes(self) -> int:
        if self.memory_gib is not None:
            return int(self.memory_gib * GiB)
        return GPUS[self.gpu]["memory_mib"] * 2**20


class ProfileSection(_Strict):
    opt_num_tokens: int | None = Field(None, ge=1, description="default: max_batch_size (decode steps)")
    opt_num_seqs: int | None = Field(None, ge=1, description="default: max_batch_size")
    builder_optimization_level: int = Field(3, ge=0, le=5)
    workspace_gib: float = Field(4.0, gt=0)


class WorkloadSection(_Strict):
    isl: int = Field(..., ge=1)
    osl: int = Field(..., ge=1)


class BuildConfig(_Strict):
    name: str
    description: str = ""
    model: ModelSection = ModelSection()
    precision: PrecisionSection = PrecisionSection()
    quantize: QuantizeSection = QuantizeSection()
    runtime: RuntimeSection
    target: TargetSection
    profile: ProfileSection = ProfileSection()
    workload: WorkloadSection | None = None

    @model_validator(mode="after")
    def _consistent(self) -> BuildConfig:
        r, p = self.runtime, self.precision
        if r.max_num_tokens < r.max_batch_size:
            raise ValueError(f"runtime.max_num_tokens ({r.max_num_tokens}) must be at least runtime.max_batch_size "
                             f"({r.max_batch_size}): a decode step carries one token per sequence")
        if r.kv_block_size > r.max_seq_len:
            raise ValueError(f"runtime.kv_block_size ({r.kv_block_size}) exceeds runtime.max_seq_len ({r.max_seq_len})")
        if self.workload and self.workload.isl + self.workload.osl > r.max_seq_len:
            raise ValueError(f"runtime.max_seq_len ({r.max_seq_len}) must hold workload.isl + workload.osl "
                             f"({self.workload.isl} + {self.workload.osl} = {self.workload.isl + self.workload.osl})")
        if p.kv_cache == "fp8" and p.weights != "fp8":
            raise ValueError("precision.kv_cache fp8 needs k/v scales, which FP8 quantization calibrates: set "
                             "precision.weights: fp8")
        for key, value in (("weights", p.weights), ("kv_cache", p.kv_cache)):
            if value == "fp8" and self.target.min_cc < FP8_MIN_CC:
                raise ValueError(f"precision.{key} fp8 needs FP8 tensor cores (sm_89 or newer); target.archs has "
                                 f"sm_{self.target.min_cc} ({self.target.gpu}): use bf16")
        if p.weights == "fp8" and p.compute == "fp32":
            raise ValueError("precision.compute fp32 with FP8 weights: FP8 GEMMs take bf16/fp16 around their Q/DQ")
        prof = self.profile
        if prof.opt_num_tokens is not None and prof.opt_num_tokens > r.max_num_tokens:
            raise ValueError(f"profile.opt_num_tokens ({prof.opt_num_tokens}) exceeds runtime.max_num_tokens "
                             f"({r.max_num_tokens})")
        if prof.opt_num_seqs is not None and prof.opt_num_seqs > r.max_batch_size:
            raise ValueError(f"profile.opt_num_seqs ({prof.opt_num_seqs}) exceeds runtime.max_batch_size "
                             f"({r.max_batch_size})")
        return self

    @property
    def blocks_per_seq(self) -> int:
        return math.ceil(self.runtime.max_seq_len / self.runtime.kv_block_size)

    @property
    def num_kv_blocks(self) -> int:
        return self.runtime.max_batch_size * self.blocks_per_seq


def load_build_config(path: str | Path) -> BuildConfig:
    """Parse and validate a YAML build config; every problem is reported with its key path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: build config not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (name, precision, runtime, target, ...), "
                          f"found {type(raw).__name__}")
    return parse_build_config(raw, str(path))


def parse_build_config(raw: dict[str, Any], source: str = "<build config>") -> BuildConfig:
    try:
        return BuildConfig.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check its spelling and section)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            elif "input" in err and not isinstance(err["input"], dict):
                msg += f" (found {err['input']!r})"
            problems.append(f"{key}: {msg}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


# ---------------------------------------------------------------------------------------------------------------
# The memory plan


@dataclass(frozen=True)
class MemoryPlan:
    gpu: str
    total_bytes: int
    usable_bytes: int
    weights_bytes: int
    kv_cache_bytes: int
    state_bytes: int
    activation_bytes: int
    reserve_bytes: int
    num_kv_blocks: int
    kv_bytes_per_token: int
    state_bytes_per_seq: int
    max_batch_that_fits: int
    detail: dict[str, Any]

    @property
    def required_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.state_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.required_bytes <= self.usable_bytes

    def breakdown(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        d = self.detail
        return (
            f"weights {g(self.weights_bytes)} ({d['weights']}) + KV cache {g(self.kv_cache_bytes)} "
            f"({d['kv']}) + Mamba state {g(self.state_bytes)} ({d['state']}) + activations "
            f"{g(self.activation_bytes)} (estimate, {d['activations']}) + reserve {g(self.reserve_bytes)} = "
            f"{g(self.required_bytes)} needed; {self.gpu} has {g(self.total_bytes)} x utilization "
            f"{d['utilization']:.2f} = {g(self.usable_bytes)} usable"
        )

    def verdict(self) -> str:
        if self.fits:
            spare = self.usable_bytes - self.required_bytes
            return (f"fits: {self.breakdown()} ({spare / GiB:.2f} GiB spare; up to batch {self.max_batch_that_fits} "
                    "at this max_seq_len)")
        return (f"does not fit: {self.breakdown()}; {(self.required_bytes - self.usable_bytes) / GiB:.2f} GiB over. "
                f"At this max_seq_len and these dtypes at most max_batch_size={self.max_batch_that_fits} fits"
                + ("" if self.detail["kv_dtype"] == "fp8" else "; an FP8 KV cache halves the KV bytes"))

    def asdict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(required_bytes=self.required_bytes, fits=self.fits, verdict=self.verdict())
        return d


def weight_bytes(cfg: FalconH1Config, weights: str, compute: str) -> tuple[int, str]:
    """Bytes of the deploy weights. FP8: each quantized linear 1 byte/param + a fp32 scale per output row + a fp32
    input scale; embeddings, lm_head (untied in a deploy checkpoint), norms and conv stay in the compute dtype
    (FP8 never quantizes them); A_log, D, dt_bias are fp32 either way."""
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    linear = L * (h * cfg.qkv_size + cfg.q_size * h + h * cfg.in_proj_size + cfg.mamba_d_ssm * h
                  + 3 * h * cfg.intermediate_size)
    rows = L * (cfg.qkv_size + h + cfg.in_proj_size + h + 2 * cfg.intermediate_size + h)
    other = 2 * cfg.vocab_size * h + h + L * (cfg.conv_dim * (cfg.mamba_d_conv + 1) + 2 * h + cfg.mamba_d_ssm)
    fp32 = L * 3 * cfg.mamba_n_heads * 4
    cb = lookup(compute).itemsize
    if weights == "fp8":
        total = linear + 4 * rows + 4 * 6 * L + other * cb + fp32
        what = f"{linear / 1e9:.2f} B linear params FP8 + {other / 1e9:.2f} B embeddings/lm_head/norms {compute}"
    else:
        total = (linear + other) * cb + fp32
        what = f"{(linear + other) / 1e9:.2f} B params {compute}"
    return total, what


def activation_bytes(cfg: FalconH1Config, bc: BuildConfig) -> tuple[int, str]:
    """Peak live activations of one step at max_num_tokens (TensorRT reuses buffers across layers): the widest
    per-token tensors of one layer (in_proj output, gate_up output, qkv, a few hidden-size tensors) in the compute
    dtype, plus fp32 logits for max_batch_size rows, plus the builder's workspace limit."""
    t = bc.runtime.max_num_tokens
    per_token = cfg.in_proj_size + 2 * cfg.intermediate_size + cfg.qkv_size + 4 * cfg.hidden_size + cfg.conv_dim
    b = t * per_token * lookup(bc.precision.compute).itemsize * 2  # x2: producer and consumer of a layer live together
    b += bc.runtime.max_batch_size * cfg.vocab_size * 4
    ws = int(bc.profile.workspace_gib * GiB)
    return b + ws, f"{t} tokens/step, workspace {bc.profile.workspace_gib:g} GiB"


def plan_memory(bc: BuildConfig, cfg: FalconH1Config | None = None) -> MemoryPlan:
    """Bytes each part needs at the config's maxima, against the target GPU's usable memory."""
    cfg = cfg or preset(bc.model.preset)
    p, r, t = bc.precision, bc.runtime, bc.target
    w, w_what = weight_bytes(cfg, p.weights, p.compute)
    kv_tok = cfg.kv_cache_bytes_per_token(p.kv_cache)
    kv_per_seq = bc.blocks_per_seq * r.kv_block_size * kv_tok
    state_seq = cfg.state_bytes_per_seq(p.ssm_state, p.conv_state)
    act, act_what = activation_bytes(cfg, bc)
    reserve = int(t.reserve_gib * GiB)
    usable = int(t.total_bytes * t.memory_utilization)
    fixed = w + act + reserve
    per_seq = kv_per_seq + state_seq
    max_batch = max(0, (usable - fixed) // per_seq)
    return MemoryPlan(
        gpu=t.gpu, total_bytes=t.total_bytes, usable_bytes=usable, weights_bytes=w,
        kv_cache_bytes=r.max_batch_size * kv_per_seq, state_bytes=r.max_batch_size * state_seq,
        activation_bytes=act, reserve_bytes=reserve, num_kv_blocks=bc.num_kv_blocks, kv_bytes_per_token=kv_tok,
        state_bytes_per_seq=state_seq, max_batch_that_fits=int(max_batch),
        detail={
            "weights": w_what,
            "kv": f"{r.max_batch_size} seq x {bc.blocks_per_seq * r.kv_block_size:,} tokens x "
                  f"{kv_tok / 1024:.1f} KiB/token {p.kv_cache}",
            "state": f"{r.max_batch_size} seq x {state_seq / 2**20:.1f} MiB (SSM {p.ssm_state}, conv {p.conv_state})",
            "activations": act_what, "utilization": t.memory_utilization, "kv_dtype": p.kv_cache,
            "model": cfg.source,
        },
    )


def check_fits(bc: BuildConfig, cfg: FalconH1Config | None = None, source: str = "build config") -> MemoryPlan:
    plan = plan_memory(bc, cfg)
    if not plan.fits:
        raise ConfigError(f"{source}: {bc.name} {plan.verdict()}")
    return plan


# ---------------------------------------------------------------------------------------------------------------
# The optimization profile: min / opt / max of every symbolic dimension of the engine I/O contract


def dim_ranges(bc: BuildConfig) -> dict[str, tuple[int, int, int]]:
    """Symbolic dimension (contract.py / the export manifest) -> (min, opt, max)."""
    r, prof = bc.runtime, bc.profile
    seqs_opt = prof.opt_num_seqs or r.max_batch_size
    tokens_opt = prof.opt_num_tokens or r.max_batch_size
    blocks = bc.blocks_per_seq
    return {
        "num_tokens": (1, tokens_opt, r.max_num_tokens),
        "num_seqs": (1, seqs_opt, r.max_batch_size),
        "num_seqs+1": (2, seqs_opt + 1, r.max_batch_size + 1),
        "max_blocks": (1, blocks, blocks),
        "num_blocks": (1, bc.num_kv_blocks, bc.num_kv_blocks),
        "block_size": (r.kv_block_size,) * 3,  # fixed: a kernel compile-time constant
        "num_slots": (1, r.max_batch_size, r.max_batch_size),
    }


def optimization_profile(
    bc: BuildConfig, inputs: dict[str, list[int | str]],
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Graph input name -> (min, opt, max) shapes, from the export manifest's symbolic shapes."""
    ranges = dim_ranges(bc)
    out = {}
    for name, shape in inputs.items():
        lo, opt, hi = [], [], []
        for d in shape:
            if isinstance(d, int):
                lo.append(d), opt.append(d), hi.append(d)
            elif d in ranges:
                a, b, c = ranges[d]
                lo.append(a), opt.append(b), hi.append(c)
            else:
                raise ConfigError(f"graph input '{name}': symbolic dimension '{d}' has no range in the build config "
                                  f"(known: {', '.join(ranges)})")
        out[name] = (tuple(lo), tuple(opt), tuple(hi))
    return out


def contract_inputs(cfg: FalconH1Config) -> dict[str, list[int | str]]:
    """The engine inputs as runtime/contract.py defines them (step inputs + per-layer pools), for planning before
    an export exists; the build itself reads the export manifest, which must agree."""
    from trtfalcon.runtime.contract import STEP_INPUTS, cache_names

    pools = {
        "kv_cache": [2, "num_blocks", "block_size", cfg.num_key_value_heads, cfg.head_dim],
        "conv_state": ["num_slots", cfg.conv_dim, cfg.conv_state_len],
        "ssm_state": ["num_slots", cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state],
    }
    out: dict[str, list[int | str]] = {k: list(shape) for k, (_, shape) in STEP_INPUTS.items()}
    for name in cache_names(cfg.num_hidden_layers):
        out[name] = list(pools[name.split(".")[0]])
    return out
