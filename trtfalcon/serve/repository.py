"""Write a Triton model repository that serves a trtfalcon model through Triton's Python backend.

    REPO/<model_name>/config.pbtxt        backend "python", decoupled, max_batch_size 0, no dynamic batching,
                                         inputs/outputs from protocol.py, one instance group per GPU
    REPO/<model_name>/1/model.py         the template in this package (thin: delegates to serve/backend.py)
    REPO/<model_name>/1/trtfalcon.json   ServeSettings: backend, model directory, runtime sizing, request caps

Why these choices:
- In-flight batching happens inside the runtime (token-level, across requests), so Triton's dynamic batcher is
  off and max_batch_size is 0: each Triton request is one prompt, handed to the engine as soon as it arrives.
- Decoupled transaction policy: a request gets any number of responses (one per token when streaming) and ends
  with TRITONSERVER_RESPONSE_COMPLETE_FINAL.
- Weights are referenced, not copied, by default: a checkpoint or engine is gigabytes and the repository is
  regenerated often (sizing changes), so trtfalcon.json holds its absolute path and the container must mount it
  at the same path. `copy_model=True` copies it into 1/model/ (a relative path in trtfalcon.json) for a
  self-contained repository that can be moved or baked into an image. Symlinks are not used: they dangle as soon
  as the repository is mounted into a container without the target.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from trtfalcon import __version__
from trtfalcon.errors import ConfigError
from trtfalcon.serve.protocol import TensorSpec, inputs, outputs
from trtfalcon.serve.text import has_tokenizer

SETTINGS_FILE = "trtfalcon.json"
SETTINGS_FORMAT = 1
SERVE_BACKENDS = ("torch", "onnxruntime", "tensorrt")
COPIED_MODEL_DIR = "model"  # inside the version directory, when copy_model
COPIED_TOKENIZER_DIR = "tokenizer"


@dataclass
class ServeSettings:
    """The contents of 1/trtfalcon.json: everything model.py needs besides config.pbtxt.

    model_dir / tokenizer_dir: absolute, or relative to the version directory (a copied model).
    runtime: RuntimeOptions fields except `device`, which each instance takes from its Triton instance group.
    limits: ServeLimits caps except vocab_size and max_seq_len, which come from the loaded model.
    cancel_poll_s: how often the engine loop asks Triton whether each in-flight request was cancelled (each ask is
    a round trip to the server process, so not every step at batch 64).
    """

    backend: str
    model_dir: str
    tokenizer_dir: str | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    cancel_poll_s: float = 0.02
    format: int = SETTINGS_FORMAT
    trtfalcon_version: str = __version__

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, version_dir: str | Path) -> ServeSettings:
        path = Path(version_dir) / SETTINGS_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: not found (regenerate the repository with `trtfalcon serve triton`)") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict) or raw.get("format") != SETTINGS_FORMAT:
            raise ConfigError(f"{path}: format: expected {SETTINGS_FORMAT}, found {raw.get('format')!r}"
                              if isinstance(raw, dict) else f"{path}: expected a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown fields {unknown} (written by a newer trtfalcon?)")
        return cls(**raw)

    def resolve(self, version_dir: str | Path, which: str) -> Path | None:
        value = getattr(self, which)
        if value is None:
            return None
        p = Path(value)
        return p if p.is_absolute() else Path(version_dir) / p


@dataclass(frozen=True)
class InstancePlan:
    """Where instances run: KIND_GPU with `count` instances on each of `gpus`, or KIND_CPU with `count`."""

    count: int = 1
    gpus: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        return "KIND_GPU" if self.gpus else "KIND_CPU"


def instance_runtime_options(runtime: dict[str, Any], device: str):  # noqa: ANN201 - RuntimeOptions, imported lazily
    """trtfalcon.json's runtime fields + the instance's device -> RuntimeOptions, naming any unknown field."""
    from trtfalcon.runtime.backends import RuntimeOptions

    unknown = sorted(set(runtime) - set(RuntimeOptions.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"{SETTINGS_FILE}: runtime: unknown fields {unknown}")
    return RuntimeOptions(**runtime, device=device)


# ---------------------------------------------------------------------------------------------- config.pbtxt
def _tensor_block(kind: str, spec: TensorSpec, optional: bool) -> str:
    dims = ", ".join(str(d) for d in spec.dims)
    lines = ["  {", f'    name: "{spec.name}"', f"    data_type: {spec.data_type}", f"    dims: [ {dims} ]"]
    if optional:
        lines.append("    optional: true")
    lines.append("  }")
    return f"  # {spec.description}\n" + "\n".join(lines)


def render_config(model_name: str, text: bool, plan: InstancePlan) -> str:
    """config.pbtxt text (protobuf text format of inference.ModelConfig)."""
    ins = ",\n".join(_tensor_block("input", s, optional=True) for s in inputs(text))
    outs = ",\n".join(_tensor_block("output", s, optional=False) for s in outputs(text))
    gpus = f"\n    gpus: [ {', '.join(map(str, plan.gpus))} ]" if plan.gpus else ""
    return f"""# Generated by `trtfalcon serve triton` (trtfalcon {__version__}); runtime settings: 1/{SETTINGS_FILE}.
name: "{model_name}"
backend: "python"
# Batching happens inside the trtfalcon runtime (in-flight, token by token): Triton passes requests straight
# through (no dynamic_batching block, no batch dimension).
max_batch_size: 0
# Decoupled: any number of responses per request (one per token when streaming), then the FINAL flag.
model_transaction_policy {{
  decoupled: true
}}
input [
{ins}
]
output [
{outs}
]
# One instance = one engine with its own KV cache and state pools; see docs/serving.md on sizing.
instance_group [
  {{
    count: {plan.count}
    kind: {plan.kind}{gpus}
  }}
]
"""


# ---------------------------------------------------------------------------------------------- the repository
def model_template() -> str:
    """The model.py copied into the repository (shipped inside this package)."""
    return resources.files("trtfalcon.serve").joinpath("model.py").read_text()


def write_repository(out: str | Path, *, model_dir: str | Path, backend: str, model_name: str = "trtfalcon",
                     plan: InstancePlan = InstancePlan(), runtime: dict[str, Any] | None = None,
                     limits: dict[str, Any] | None = None, tokenizer_dir: str | Path | None = None,
                     copy_model: bool = False, seed: int = 0, overwrite: bool = False) -> Path:
    """Write REPO/<model_name>/ atomically (other models in REPO are left alone); return its path."""
    from trtfalcon.checkpoint.safetensors_io import atomic_output_dir
    from trtfalcon.runtime.backends import BACKENDS
    from trtfalcon.serve.requests import serve_limits

    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: expected a checkpoint or engine directory, found none")
    if backend not in SERVE_BACKENDS:
        raise ConfigError(f"backend: expected one of {SERVE_BACKENDS}, found {backend!r}")
    if backend == "tensorrt" and not plan.gpus:
        raise ConfigError("gpus: the tensorrt backend runs on GPUs only; give at least one GPU (--gpus 0)")
    if backend not in BACKENDS:
        raise ConfigError(f"backend: {backend!r} has no executor in this trtfalcon yet (available: "
                          f"{', '.join(BACKENDS)})")
    if plan.count < 1:
        raise ConfigError(f"instances: expected at least 1 per GPU (or on the CPU), found {plan.count}")
    if not model_name or not all(c.isalnum() or c in "-_." for c in model_name):
        raise ConfigError(f"model_name: expected letters, digits, '-', '_' or '.', found {model_name!r}")
    if tokenizer_dir is None and has_tokenizer(model_dir):
        tokenizer_dir = model_dir
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir).resolve()
        if not has_tokenizer(tokenizer_dir):
            raise ConfigError(f"{tokenizer_dir}: expected a tokenizer (tokenizer.json or tokenizer.model), found none")
    runtime = dict(runtime or {})
    runtime.pop("device", None)  # per instance, from the instance group
    instance_runtime_options(runtime, "cpu")  # unknown or mistyped fields fail here, not when Triton loads the model
    serve_limits(dict(limits or {}), vocab_size=1, max_seq_len=1)

    settings = ServeSettings(backend=backend, model_dir=str(model_dir),
                             tokenizer_dir=str(tokenizer_dir) if tokenizer_dir else None,
                             runtime=runtime, limits=dict(limits or {}), seed=seed)
    dest = Path(out) / model_name
    with atomic_output_dir(dest, overwrite=overwrite) as tmp:
        version = tmp / "1"
        version.mkdir()
        if copy_model:
            shutil.copytree(model_dir, version / COPIED_MODEL_DIR)
            settings.model_dir = COPIED_MODEL_DIR
            if tokenizer_dir == model_dir:
                settings.tokenizer_dir = COPIED_MODEL_DIR
            elif tokenizer_dir is not None:
                shutil.copytree(tokenizer_dir, version / COPIED_TOKENIZER_DIR)
                settings.tokenizer_dir = COPIED_TOKENIZER_DIR
        (tmp / "config.pbtxt").write_text(render_config(model_name, tokenizer_dir is not None, plan))
        (version / "model.py").write_text(model_template())
        (version / SETTINGS_FILE).write_text(settings.to_json())
    return dest
