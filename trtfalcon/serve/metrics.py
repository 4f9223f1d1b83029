"""The served model's own Prometheus series, published on Triton's metrics port (default 8002, `/metrics`).

Triton already counts requests and latencies per model (nv_inference_*); what it cannot see is inside the
runtime: how many requests each instance holds, how many KV-cache blocks and Mamba state slots are free, how each
request ended. Those are what an operator sizes --num-blocks and --max-batch-size by, and what shows that a
cancelled or disconnected request gave its cache back.

    trtfalcon_requests_in_flight{model,version,instance}           gauge: accepted, not yet ended
    trtfalcon_requests_ended_total{model,version,instance,outcome} counter: completed | cancelled | rejected | failed
    trtfalcon_generated_tokens_total{model,version,instance}       counter
    trtfalcon_kv_blocks_free / trtfalcon_kv_blocks_total{...}      gauges: the paged KV cache of the instance
    trtfalcon_state_slots_free / trtfalcon_state_slots_total{...}  gauges: its Mamba (conv + SSM) state slots

Every update is an IPC round trip from the Python backend's stub to the server, so counts are accumulated here
and published by the engine thread at most every `interval_s` while it is busy, and at once when it goes idle.
pb_utils.MetricFamily exists from Triton 23.05; on an older server (or the tests' stand-in without it) nothing is
published and the counts are still kept.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

OUTCOMES = ("completed", "cancelled", "rejected", "failed")
# Triton error code of an error response -> how the request ended
OUTCOME_OF_CODE = {"INVALID_ARG": "rejected", "CANCELLED": "cancelled"}

IN_FLIGHT = "trtfalcon_requests_in_flight"
ENDED = "trtfalcon_requests_ended_total"
TOKENS = "trtfalcon_generated_tokens_total"
POOLS = {  # gauge name -> description
    "trtfalcon_kv_blocks_free": "KV-cache blocks free in this instance's pool",
    "trtfalcon_kv_blocks_total": "KV-cache blocks in this instance's pool",
    "trtfalcon_state_slots_free": "Mamba state slots free in this instance",
    "trtfalcon_state_slots_total": "Mamba state slots in this instance",
}


@dataclass(frozen=True)
class PoolStats:
    kv_blocks_free: int
    kv_blocks_total: int
    state_slots_free: int
    state_slots_total: int

    def by_gauge(self) -> dict[str, int]:
        return {"trtfalcon_kv_blocks_free": self.kv_blocks_free, "trtfalcon_kv_blocks_total": self.kv_blocks_total,
                "trtfalcon_state_slots_free": self.state_slots_free,
                "trtfalcon_state_slots_total": self.state_slots_total}


class ServeMetrics:
    """Counts kept by both of the instance's threads; published to Triton by the engine thread."""

    def __init__(self, pb: Any, labels: dict[str, str], interval_s: float = 0.05) -> None:
        self.labels = dict(labels)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self.ended = dict.fromkeys(OUTCOMES, 0)  # guarded by _lock (execute() and the engine thread both end requests)
        self.tokens = 0
        self._pending = False
        self._published: dict[str, float] = {}
        self._last_publish = 0.0
        self._families: list[Any] = []
        self._metrics: dict[str, Any] = {}
        family = getattr(pb, "MetricFamily", None)
        if family is None:
            return
        gauge, counter = family.GAUGE, family.COUNTER
        specs = [(IN_FLIGHT, "Requests accepted by this instance and not yet ended", gauge),
                 (ENDED, "Requests ended, by outcome", counter),
                 (TOKENS, "Tokens generated", counter),
                 *((name, text, gauge) for name, text in POOLS.items())]
        for name, text, kind in specs:
            fam = family(name=name, description=text, kind=kind)
            self._families.append(fam)
            if name == ENDED:
                for outcome in OUTCOMES:
                    self._metrics[f"{ENDED}:{outcome}"] = fam.Metric(labels={**self.labels, "outcome": outcome})
            else:
                self._metrics[name] = fam.Metric(labels=self.labels)

    # ---- counting (any thread)
    def request_ended(self, outcome: str) -> None:
        with self._lock:
            self.ended[outcome] += 1
            self._pending = True

    def tokens_generated(self, n: int) -> None:
        with self._lock:
            self.tokens += n
            self._pending = True

    @property
    def pending(self) -> bool:
        """Counts changed since the last publish (the engine thread wakes to publish them)."""
        return self._pending

    # ---- publishing (the engine thread)
    def publish(self, in_flight: int, pools: PoolStats, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_publish < self.interval_s:
            return
        self._last_publish = now
        with self._lock:
            self._pending = False
            values: dict[str, float] = {f"{ENDED}:{o}": n for o, n in self.ended.items()}
            values[TOKENS] = self.tokens
        if not self._metrics:
            return  # no MetricFamily in this Triton: the counts are kept, nothing to publish to
        values[IN_FLIGHT] = in_flight
        values.update(pools.by_gauge())
        for key, value in values.items():
            if self._published.get(key) == value:
                continue  # each call is an IPC round trip: only what changed
            metric = self._metrics[key]
            if key.startswith((ENDED, TOKENS)):
                metric.increment(value - self._published.get(key, 0))
            else:
                metric.set(value)
            self._published[key] = value

    def close(self) -> None:
        """Metrics before their families, as the Python backend requires."""
        self._metrics.clear()
        self._families.clear()


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text exposition -> {(series name, frozenset of label pairs): value} (for tests and benchmarks).

    Handles what Triton writes: `name{a="x",b="y"} 1.5` and `name 2`; comment lines are skipped.
    """
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        labels: list[tuple[str, str]] = []
        if "{" in head:
            name, _, rest = head.partition("{")
            body = rest.rsplit("}", 1)[0]
            i = 0
            while i < len(body):
                eq = body.index("=", i)
                key = body[i:eq].strip().lstrip(",").strip()
                j = eq + 2  # past ="
                chars = []
                while body[j] != '"':
                    if body[j] == "\\":
                        j += 1
                    chars.append(body[j])
                    j += 1
                labels.append((key, "".join(chars)))
                i = j + 1
        else:
            name = head
        out[(name.strip(), frozenset(labels))] = float(value)
    return out


def series(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels` (0 when there is none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == name and want <= ls)
