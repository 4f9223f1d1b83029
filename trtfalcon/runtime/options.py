"""RuntimeOptions: what sizes the runtime's caches and batches, declared once.

Each field that is a command-line option carries its flag and help text (field metadata), so `generate`, `bench`
and `serve triton` derive their options from this declaration (cli.py `runtime_option_flags`), and a new runtime
option is added here only. This module imports neither torch nor the executors: the CLI reads it to build its
options before any command runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trtfalcon.config import FalconH1Config

from trtfalcon.dtypes import FLOAT_NAMES, SSM_STATE_NAMES

KERNELS = ("auto", "torch", "reference", "triton")


@dataclass(frozen=True)
class Flag:
    """How one RuntimeOptions field reads on the command line."""

    help: str
    name: str = ""  # the flag; "" = "--" + the field name with dashes
    choices: tuple[str, ...] = ()
    min: int | None = None  # an integer option: the smallest value accepted
    none: str | None = None  # how the command line spells the field's None (e.g. "auto"), which is then its default


def _option(default: Any, help: str, **flag: Any) -> Any:
    return field(default=default, metadata={"flag": Flag(help, **flag)})


@dataclass(frozen=True)
class RuntimeOptions:
    """What sizes the caches and the batches. Defaults suit the tiny model on a CPU. The command line lists the
    options in this order."""

    max_batch_size: int = _option(64, "Sequences per step (in-flight batch), also the number of Mamba state slots.",
                                  min=1)
    max_num_tokens: int = _option(512, "Tokens per step: decode tokens + prefill chunks.", min=1)
    max_seq_len: int | None = _option(
        None, "Prompt + output limit per request [default: the model's, capped at 4096 on CPU].", min=2)
    block_size: int = _option(16, "Tokens per paged-KV block.", min=1)
    num_blocks: int | None = _option(
        None, "KV blocks in the pool [default: every sequence at full length]. Fewer forces preemption.", min=1)
    ssm_dtype: str = _option("fp32", "Dtype of the Mamba SSM state pool.", name="--ssm-state-dtype",
                             choices=SSM_STATE_NAMES)
    kv_dtype: str | None = _option(  # None: the weights' dtype (torch) or the export's / engine's
        None, "KV cache pool: auto = the compute dtype (torch) or what the export/engine takes; fp8 = E4M3 with the "
              "checkpoint's per-layer k/v scales (`quantize --kv-cache-dtype fp8`).",
        name="--kv-cache-dtype", choices=("auto", "fp8"), none="auto")
    kernels: str = _option(
        "auto", "Plugin ops: triton = the Triton kernels (CUDA; Triton's interpreter on CPU, slow); torch = "
                "vectorized torch; reference = the loop references (oracle). auto = triton on CUDA, torch on CPU.",
        choices=KERNELS)
    device: str = _option("cpu", "torch device of the torch backend.")
    dtype: str | None = _option(None, "Compute dtype [default: the checkpoint's; fp32 for an HF checkpoint].",
                                choices=FLOAT_NAMES)
    # Not a command-line option: CPU threads; default 1 for tiny models (parallel overhead dominates).
    num_threads: int | None = None

    @staticmethod
    def flags() -> dict[str, Flag]:
        """Field name -> its command-line Flag (name filled in), in declaration order; fields without one omitted."""
        out = {}
        for f in fields(RuntimeOptions):
            flag = f.metadata.get("flag")
            if flag is not None:
                out[f.name] = replace(flag, name=flag.name or "--" + f.name.replace("_", "-"))
        return out

    @classmethod
    def from_flags(cls, values: dict[str, Any]) -> RuntimeOptions:
        """Options from command-line values keyed by field name (a flag's `none` spelling becomes None)."""
        flags = cls.flags()
        return cls(**{k: None if flags[k].none is not None and v == flags[k].none else v for k, v in values.items()})

    def resolved_max_seq_len(self, cfg: FalconH1Config) -> int:
        cap = cfg.max_position_embeddings if self.device != "cpu" else min(cfg.max_position_embeddings, 4096)
        return self.max_seq_len or cap
