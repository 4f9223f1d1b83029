"""The DeepConf workload of `trtfalcon bench --tts`: every prompt's budget of traces, offline then online, with the
same seeds, on one engine in one process.

Offline runs every trace to its end (EOS or max_new_tokens); online runs the warm-up traces to their end and stops
the others when their window confidence falls below the warm-up threshold. Trace k has the same seed in both runs,
so an online trace is a prefix of its offline twin and the difference in tokens generated is what online stopping
saved. Each run is timed as a whole (all prompts in flight, tts.run.run_tts_many): output tokens/s = tokens
generated / wall seconds. One short untimed run first takes the first-call costs out of the figures.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from trtfalcon.runtime.llm import LLMEngine
from trtfalcon.tts.answers import AnswerExtractor
from trtfalcon.tts.run import Decode, TTSConfig, TTSResult, run_tts_many


@dataclass(frozen=True)
class TTSModeRun:
    """One mode's run over every prompt."""

    mode: str
    seconds: float
    tokens_generated: int  # every trace's, warm-up included
    traces: int
    stopped: int  # traces DeepConf online stopped (0 offline)
    output_tokens_per_s: float
    answers: list[str | None]  # the voted answer of each prompt

    @classmethod
    def of(cls, mode: str, seconds: float, results: list[TTSResult]) -> TTSModeRun:
        tokens = sum(r.tokens_generated for r in results)
        return cls(mode, seconds, tokens, sum(len(r.traces) for r in results), sum(r.num_stopped for r in results),
                   tokens / seconds if seconds > 0 else 0.0, [r.answer for r in results])


@dataclass(frozen=True)
class TTSBenchResult:
    prompts: int
    config: dict[str, Any]  # the online TTSConfig (offline: the same with mode "offline")
    offline: TTSModeRun
    online: TTSModeRun

    @property
    def tokens_saved(self) -> int:
        """Offline tokens - online tokens: what stopping low-confidence traces saved (>= 0: each online trace is a
        prefix of the offline one)."""
        return self.offline.tokens_generated - self.online.tokens_generated

    @property
    def tokens_saved_pct(self) -> float:
        return 100.0 * self.tokens_saved / self.offline.tokens_generated if self.offline.tokens_generated else 0.0

    @property
    def same_answer(self) -> int:
        """Prompts whose online vote equals the offline DeepConf vote (same eta)."""
        return sum(a == b for a, b in zip(self.online.answers, self.offline.answers))

    def as_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "config": self.config, "offline": asdict(self.offline),
                "online": asdict(self.online), "tokens_saved": self.tokens_saved,
                "tokens_saved_pct": self.tokens_saved_pct, "same_answer": self.same_answer}


def run_tts_bench(engine: LLMEngine, prompts: Sequence[Sequence[int]], config: TTSConfig,
                  extractor: AnswerExtractor, decode: Decode, progress: bool = False) -> TTSBenchResult:
    """Offline then online DeepConf over `prompts` on `engine` (config.mode is ignored: both run)."""
    online = replace(config, mode="online")
    offline = replace(config, mode="offline")
    # untimed: the first engine call pays allocations and first-call dispatch that the timed runs should not
    run_tts_many(engine, prompts[:1], replace(offline, budget=1, max_new_tokens=2), extractor, decode=decode)
    runs = {}
    for cfg in (offline, online):
        t0 = time.perf_counter()
        results = run_tts_many(engine, prompts, cfg, extractor, decode=decode, progress=progress)
        runs[cfg.mode] = TTSModeRun.of(cfg.mode, time.perf_counter() - t0, results)
    return TTSBenchResult(len(prompts), online.as_dict(), runs["offline"], runs["online"])


def print_tts_table(result: TTSBenchResult, device: str, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not console.is_terminal:
        console = Console(width=160, file=console.file)
    c = result.config
    t = Table(title=f"trtfalcon bench --tts ({device}): {result.prompts} prompts x {c['budget']} traces, warm-up "
                    f"{c['warmup']}, eta {c['eta']:g}, window {c['window']}")
    for col in ("mode", "traces", "stopped", "tokens", "seconds", "output tok/s", "tokens saved"):
        t.add_column(col, justify="right")
    off, on = result.offline, result.online
    t.add_row("offline", str(off.traces), "-", f"{off.tokens_generated:,}", f"{off.seconds:.2f}",
              f"{off.output_tokens_per_s:,.1f}", "-")
    t.add_row("online", str(on.traces), str(on.stopped), f"{on.tokens_generated:,}", f"{on.seconds:.2f}",
              f"{on.output_tokens_per_s:,.1f}", f"{result.tokens_saved:,} ({result.tokens_saved_pct:.1f}%)")
    console.print(t)
    console.print(f"online vote = offline top-{c['eta']:g}% vote on {result.same_answer} of {result.prompts} prompts")
