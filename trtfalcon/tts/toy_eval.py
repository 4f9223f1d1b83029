"""Sample the toy model's traces with the in-flight runtime and score them: single-trace accuracy, vote inputs.

The traces come from trtfalcon's own runtime (torch executor, deploy weights folded from the HF checkpoint in
memory), with SamplingParams.n samples of each problem sharing one prefill, exactly as DeepConf's parallel traces
will run in the engine. `ToyTaskEvaluator` is the same greedy scoring as a task of quantize's accuracy report (bf16
vs FP8 answers, `trtfalcon quantize --task toy-multiplication`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from trtfalcon.config import FalconH1Config
from trtfalcon.errors import ConfigError
from trtfalcon.model.weights import DeployWeights, load_weights
from trtfalcon.quantize.accuracy import TaskRun
from trtfalcon.runtime.executors.torch import TorchExecutor
from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.runtime.request import Request, RequestOutput, SamplingParams
from trtfalcon.tts.toy_task import (
    EOS_ID, HELD_OUT_COUNT, VOCAB, Problem, decode, held_out_problems, is_correct, prompt_ids,
)

# The longest reference completion (999*99, with EOS) is 49 tokens; a trace that has not ended by 96 has lost its
# way (and counts as wrong).
MAX_COMPLETION_TOKENS = 96


@dataclass
class SampledTrace:
    problem: Problem
    output: RequestOutput

    @property
    def text(self) -> str:
        return decode(self.output.token_ids)

    @property
    def correct(self) -> bool:
        return is_correct(self.problem, self.text)


def toy_engine(weights: DeployWeights | str | Path, max_batch_size: int = 256, block_size: int = 16) -> LLMEngine:
    """An engine with room for `max_batch_size` traces of the toy task at full length (no preemption)."""
    if not isinstance(weights, DeployWeights):
        weights = load_weights(weights, "fp32")
    max_seq_len = 16 + MAX_COMPLETION_TOKENS  # prompts are at most 10 tokens (BOS Q:999*99;)
    ex = TorchExecutor(weights, num_blocks=max_batch_size * math.ceil(max_seq_len / block_size),
                       block_size=block_size, num_slots=max_batch_size)
    return LLMEngine(ex, max_batch_size=max_batch_size, max_num_tokens=max(512, max_batch_size),
                     max_seq_len=max_seq_len, eos_token_ids=(EOS_ID,), log_steps=False)


def sample_traces(engine: LLMEngine, problems: Sequence[Problem], *, n: int = 1, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, logprobs: int = 0) -> list[list[SampledTrace]]:
    """n traces of each problem (trace k of problem i seeded with seed + i * n + k); per problem, in sample order."""
    requests = [
        Request(str(i), prompt_ids(p), SamplingParams(
            max_new_tokens=MAX_COMPLETION_TOKENS, temperature=temperature, top_p=top_p, seed=seed + i * n,
            logprobs=logprobs, n=n))
        for i, p in enumerate(problems)
    ]
    outputs = engine.generate(requests)
    for o in outputs:
        if o.finish_reason == "error":
            raise RuntimeError(f"toy trace {o.request_id} failed: {o.error}")
    return [[SampledTrace(p, o) for o in outputs[i * n:(i + 1) * n]] for i, p in enumerate(problems)]


def accuracy(traces: Sequence[Sequence[SampledTrace]]) -> float:
    """Fraction of all traces whose final answer is right."""
    flat = [t for per_problem in traces for t in per_problem]
    return sum(t.correct for t in flat) / len(flat)


@dataclass(frozen=True)
class ToyTaskEvaluator:
    """The toy task as a quantize accuracy task (quantize/accuracy.py TaskEvaluator): greedy answers to the first
    `problems` held-out problems, through the in-flight runtime. `trtfalcon quantize --task toy-multiplication`."""

    problems: int = HELD_OUT_COUNT
    name: ClassVar[str] = "toy-multiplication"

    def __post_init__(self) -> None:
        if not 1 <= self.problems <= HELD_OUT_COUNT:
            raise ConfigError(f"toy task problems: expected 1 to {HELD_OUT_COUNT} (the held-out problems training "
                              f"never saw), found {self.problems}")

    def describe(self) -> dict[str, Any]:
        return {"items_are": f"held-out long multiplications (toy_task.held_out_problems({self.problems}))",
                "decoding": f"greedy, at most {MAX_COMPLETION_TOKENS} tokens; right = the last 'A:<digits>' is the "
                            "product"}

    def check(self, config: FalconH1Config, source: Path) -> None:
        """The toy task's prompts are character ids of its own vocabulary: any other model reads them as other
        tokens, and its 'accuracy' would mean nothing."""
        if config.vocab_size != len(VOCAB) or config.eos_token_id != (EOS_ID,):
            raise ConfigError(
                f"{source}: --task {self.name} needs a model trained on the toy task (vocab_size {len(VOCAB)}, "
                f"eos_token_id {EOS_ID}: trtfalcon/tts/toy_task.py, e.g. tests/data/toy-reasoner), found vocab_size "
                f"{config.vocab_size}, eos_token_id {list(config.eos_token_id)}")

    def __call__(self, weights: DeployWeights) -> TaskRun:
        problems = held_out_problems(self.problems)
        traces = sample_traces(toy_engine(weights, max_batch_size=min(64, self.problems)), problems)
        return TaskRun([t.correct for (t,) in traces], [list(t.output.token_ids) for (t,) in traces])
