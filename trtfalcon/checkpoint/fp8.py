"""ModelOpt FP8 unified Hugging Face checkpoints -> a DeployPlan in the FP8 deploy format (deploy_fp8.py).

The input is what `trtfalcon quantize` writes and what vLLM / SGLang / TensorRT-LLM read (ModelOpt's
`export_hf_checkpoint`): per quantized nn.Linear `<m>.weight` float8_e4m3fn, `<m>.weight_scale` and
`<m>.input_scale` fp32 (per tensor), `self_attn.{k,v}_proj.{k,v}_scale` for an FP8 KV cache, hf_quant_config.json
and config.json["quantization_config"] (quant_method "modelopt", hf.read_quant_config). Everything else is the
usual HF tensors.

Folding the muP multipliers (deploy.py) with FP8, exactly. ModelOpt quantizes each Linear's input as
the HF module sees it, and for q/k/v and in_proj that input is already multiplied: q_proj(n * a) with
a = attention_in_multiplier, in_proj(n * s) with s = ssm_in_multiplier. The deploy graph feeds n and carries a
(or s) in the weight. Since fake_quant(a * n, S) = a * fake_quant(n, S / a) for a > 0 (E4M3 rounding is scale
invariant), the HF linear equals the deploy linear with
    deploy input_scale       = HF input_scale / a                  (the input-side multiplier)
    deploy weight_scale[r]   = HF weight_scale * a * out[r]          (every multiplier convert folds into W)
    deploy weight (fp8 bytes) = the HF fp8 bytes, unchanged
where out[r] is the output-side fold of row r (key_multiplier, mup_vector blocks, attention_out, ssm_out, mlp
multipliers): deploy_sources(cfg) gives exactly these per-source factors. Fused tensors (qkv, gate_up) keep each
source's per-tensor weight scale on its own rows, so fusing is exact; their sources share one input, and
ModelOpt's exporter already gives them one input scale; where a checkpoint from elsewhere does not, we take the
max (vLLM does the same), which is the only non-exact step. KV scales map one to one: ModelOpt's k_bmm_quantizer
sees K after key_multiplier and RoPE, which is exactly what the deploy graph writes into the cache.

A deploy linear is FP8 only if all its HF sources are; any other FP8 weight (an lm_head someone quantized, a
fused linear with one bf16 source) is dequantized and folded in fp32, and the deploy config says which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from trtfalcon.checkpoint.deploy import (
    DeployPlan, Source, deploy_dtype_of, deploy_sources, deploy_tensor_shapes, fold_rows,
)
from trtfalcon.checkpoint.deploy_fp8 import (
    FP8_DTYPE, KV_SCALES, QUANTIZED_LINEARS, dequantize_weight, fp8_tensor_specs, quantization_meta,
)
from trtfalcon.checkpoint.hf import HFQuantConfig, hf_tensor_shapes, read_quant_config
from trtfalcon.checkpoint.safetensors_io import SafetensorsReader, TensorSpec, row_chunks, torch_dtype
from trtfalcon.config import FalconH1Config
from trtfalcon.errors import CheckpointError


def read_fp8_quant_config(directory: str | Path) -> HFQuantConfig:
    """hf.read_quant_config of a ModelOpt FP8 checkpoint: quant_algo must be 'FP8' (per-tensor E4M3)."""
    q = read_quant_config(directory)
    if q.quant_algo != "FP8":
        raise CheckpointError(f"{q.source}: quant_algo is {q.quant_algo!r}; expected 'FP8' (per-tensor E4M3, a "
                              "ModelOpt FP8 checkpoint)")
    return q


class FP8HFCheckpoint:
    """A ModelOpt FP8 unified HF checkpoint: config, quantization, lazily read tensors, all validated up front."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.config: FalconH1Config = FalconH1Config.from_json_file(self.directory / "config.json")
        self.quant = read_fp8_quant_config(self.directory)
        self.reader = SafetensorsReader(self.directory)
        self.reader.check_index()
        self.fp8_modules: set[str] = set()  # HF module names whose weight is FP8
        self.kv_scale_names: dict[tuple[int, str], str] = {}  # (layer, "k"|"v") -> tensor name
        self._scales: dict[str, float] = {}

    def validate(self) -> None:
        """Every tensor present with its shape; every FP8 weight with a positive finite weight_scale and
        input_scale; KV scales where the checkpoint declares an FP8 KV cache. Fails before any output exists."""
        cfg, r = self.config, self.reader
        expected = hf_tensor_shapes(cfg)
        known = set(expected) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
        for name, shape in expected.items():
            info = r.info(name)
            if info.shape != shape:
                raise CheckpointError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}, expected "
                                      f"{list(shape)} from {cfg.source}")
            if info.dtype == FP8_DTYPE:
                if len(shape) != 2 or "embed_tokens" in name:
                    raise CheckpointError(f"{info.file}: tensor '{name}' is FP8, but only Linear weights can be")
                self.fp8_modules.add(name.removesuffix(".weight"))
            elif not info.dtype.is_floating_point:
                raise CheckpointError(f"{info.file}: tensor '{name}' has dtype {info.dtype}, expected a float type")
        if not self.fp8_modules:
            raise CheckpointError(f"{self.directory}: {self.quant.source} declares FP8 but no weight is float8_e4m3fn")
        for m in sorted(self.fp8_modules):
            rows = expected[f"{m}.weight"][0]
            for leaf, shapes in (("weight_scale", ((), (1,), (rows,), (rows, 1))), ("input_scale", ((), (1,)))):
                known.add(self._check_scale(f"{m}.{leaf}", shapes, f"FP8 weight '{m}.weight' needs its {leaf}"))
        for i in range(cfg.num_hidden_layers):
            for kind in ("k", "v"):
                # ModelOpt writes self_attn.k_proj.k_scale; vLLM also accepts self_attn.k_scale.
                names = [f"model.layers.{i}.self_attn.{kind}_proj.{kind}_scale", f"model.layers.{i}.self_attn.{kind}_scale"]
                found = [n for n in names if n in r]
                known.update(found)
                if not self.quant.kv_cache_fp8:
                    continue
                if not found:
                    raise CheckpointError(
                        f"{self.directory}: tensor '{names[0]}' is missing (nor '{names[1]}'): {self.quant.source} "
                        "declares an FP8 KV cache, which needs a k_scale and v_scale per attention layer"
                    )
                self.kv_scale_names[(i, kind)] = self._check_scale(found[0], ((), (1,)), "the FP8 KV cache needs it")
        unexpected = sorted(set(r.tensors) - known)
        if unexpected:
            raise CheckpointError(
                f"{self.directory}: unexpected tensors for an FP8 checkpoint of this config "
                f"({', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}); trtfalcon reads per-tensor "
                "FP8 (weight_scale, input_scale, k/v scales) only"
            )

    def _check_scale(self, name: str, shapes: tuple[tuple[int, ...], ...], why: str) -> str:
        if name not in self.reader:
            raise CheckpointError(f"{self.directory}: tensor '{name}' is missing ({why})")
        info = self.reader.info(name)
        if info.shape not in shapes:
            raise CheckpointError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}, expected one of "
                                  f"{[list(s) for s in shapes]}")
        t = self.reader.get(name).float()
        if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            raise CheckpointError(f"{info.file}: tensor '{name}' must be positive and finite, found {t.flatten()[:4].tolist()}")
        if t.numel() == 1:
            self._scales[name] = float(t.reshape(()))
        return name

    def scale(self, name: str) -> float:
        return self._scales[name] if name in self._scales else float(self.reader.get(name).float().reshape(()))


def input_multiplier(cfg: FalconH1Config, deploy_linear: str) -> float:
    """The muP multiplier the HF graph applies to this linear's INPUT (ModelOpt calibrated after it)."""
    leaf = deploy_linear.split(".", 2)[-1]
    return {"attn.qkv_proj": cfg.attention_in_multiplier, "mamba.in_proj": cfg.ssm_in_multiplier}.get(leaf, 1.0)


def plan_fp8_deploy(hf_dir: Path, dtype: str) -> DeployPlan:
    """The FP8 deploy checkpoint of an FP8 HF checkpoint, validated before anything is planned, as a streaming
    plan (one row chunk at a time)."""
    ckpt = FP8HFCheckpoint(hf_dir)
    ckpt.validate()
    cfg, reader = ckpt.config, ckpt.reader
    tdtype = torch_dtype(dtype)
    sources = deploy_sources(cfg)
    shapes = deploy_tensor_shapes(cfg)

    def module(src: Source) -> str:
        return src.name.removesuffix(".weight")

    excluded = []
    for i in range(cfg.num_hidden_layers):
        for leaf in QUANTIZED_LINEARS:
            name = f"layers.{i}.{leaf}"
            if not all(module(s) in ckpt.fp8_modules for s in sources[f"{name}.weight"]):
                excluded.append(name)
    quantization = quantization_meta(ckpt.quant.kv_cache_fp8, excluded)
    fp8 = fp8_tensor_specs(shapes, cfg.num_hidden_layers, quantization, str(ckpt.directory))
    for name, srcs in sources.items():  # the exact fold needs positive factors (scales must stay positive)
        linear = name.removesuffix(".weight")
        if name in fp8 and (input_multiplier(cfg, linear) <= 0 or any(s.scale <= 0 for s in srcs)
                            or any(s.row_scale is not None and bool((s.row_scale <= 0).any()) for s in srcs)):
            raise CheckpointError(f"{cfg.source}: FP8 folding of '{linear}' needs positive muP multipliers")

    producers: dict[str, Callable[[], Iterator[torch.Tensor]]] = {}
    specs: list[TensorSpec] = []
    for name, srcs in sources.items():
        linear = name.removesuffix(".weight")
        if name in fp8:
            specs.append(TensorSpec(name, shapes[name], FP8_DTYPE))
            producers[name] = lambda srcs=srcs: _fp8_rows(reader, srcs)
            specs.append(TensorSpec(f"{linear}.weight_scale", (shapes[name][0],), torch.float32))
            producers[f"{linear}.weight_scale"] = lambda srcs=srcs: iter([_weight_scale(ckpt, srcs, module)])
            specs.append(TensorSpec(f"{linear}.input_scale", (), torch.float32))
            hf_scale = max(ckpt.scale(f"{module(s)}.input_scale") for s in srcs)
            value = torch.tensor(hf_scale / input_multiplier(cfg, linear), dtype=torch.float32)
            producers[f"{linear}.input_scale"] = lambda v=value: iter([v])
        else:
            dt = deploy_dtype_of(name, tdtype)
            specs.append(TensorSpec(name, shapes[name], dt))
            if any(module(s) in ckpt.fp8_modules for s in srcs):
                producers[name] = lambda srcs=srcs, dt=dt: _dequantized_rows(ckpt, srcs, module, dt)
            else:
                producers[name] = lambda srcs=srcs, dt=dt: fold_rows(reader, srcs, dt)
    for (i, kind), hf_name in sorted(ckpt.kv_scale_names.items()):
        name = f"layers.{i}.{KV_SCALES[('k', 'v').index(kind)]}"
        specs.append(TensorSpec(name, (), torch.float32))
        producers[name] = lambda n=hf_name: iter([torch.tensor(ckpt.scale(n), dtype=torch.float32)])
    missing = set(fp8) - {s.name for s in specs}
    if missing:  # the format's list and this plan must agree; a mismatch is a bug here, not in the input
        raise CheckpointError(f"internal: FP8 deploy plan lacks {sorted(missing)[:3]}")
    return DeployPlan(cfg, specs, producers, records={"quantization": {**quantization, "source": ckpt.quant.source}},
                      metadata={"quantization": "FP8"})


def _fp8_rows(reader: SafetensorsReader, srcs: list[Source]) -> Iterator[torch.Tensor]:
    """The HF fp8 bytes, unchanged, a row chunk at a time (the fold goes into weight_scale)."""
    for src in srcs:
        shape = reader.info(src.name).shape
        for start, end in row_chunks(shape[0], shape[1]):
            yield reader.get_rows(src.name, start, end)


def _weight_scale(ckpt: FP8HFCheckpoint, srcs: list[Source], module: Callable[[Source], str]) -> torch.Tensor:
    """Per deploy row: HF weight_scale (per tensor or per row) x the fold factors convert would put into W."""
    parts = []
    for src in srcs:
        rows = ckpt.reader.info(src.name).shape[0]
        ws = ckpt.reader.get(f"{module(src)}.weight_scale").float().reshape(-1).expand(rows) * src.scale
        if src.row_scale is not None:
            ws = ws * src.row_scale
        parts.append(ws)
    return torch.cat(parts).to(torch.float32).contiguous()


def _dequantized_rows(ckpt: FP8HFCheckpoint, srcs: list[Source], module: Callable[[Source], str],
                      dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """A deploy tensor kept dense although some source is FP8: dequantize in fp32, fold, cast."""
    for src in srcs:
        shape = ckpt.reader.info(src.name).shape
        if module(src) not in ckpt.fp8_modules:
            yield from fold_rows(ckpt.reader, [src], dtype)
            continue
        ws = ckpt.reader.get(f"{module(src)}.weight_scale").float().reshape(-1)
        for start, end in row_chunks(shape[0], 4 * shape[1]):
            scale = ws if ws.numel() == 1 else ws[start:end]
            t = dequantize_weight(ckpt.reader.get_rows(src.name, start, end), scale, torch.float32) * src.scale
            if src.row_scale is not None:
                t = t * src.row_scale[start:end, None]
            yield t.to(dtype)
