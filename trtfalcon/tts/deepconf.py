"""DeepConf's confidence math (Fu et al., "Deep Think with Confidence", arXiv 2508.15260), with no engine in it.

Token confidence (paper eq. 2): the negative mean of the top-k log-probabilities at a generated position,

    C_i = -(1/k) * sum_{j=1..k} log P_i(j)          k = 20 by default; higher = a more peaked distribution.

Group confidence: the mean of C over a sliding window of the last `window` tokens (2048 by default; the whole trace
while it is shorter). A trace is scored by its mean, its tail (the last `window` tokens), the mean of its lowest
10% of full windows ("bottom-10%"), and its lowest window ("lowest group", DeepConf's min_conf). Online, warm-up
traces set a threshold at the (100 - eta) percentile of their lowest-group confidences (eta = 10: DeepConf-low,
eta = 90: DeepConf-high); a later trace is stopped as soon as a full window's mean falls below it.

Choices where the published implementations differ (../shared/reference/deepconf.md; facebookresearch/deepconf):
- k entries exactly. vLLM's logprobs dict also holds the sampled token when it is outside the top k, and
  helper.compute_confidence averages over the dict (k + 1 entries then); its early-stop patch and the paper use
  the k top entries only. So do we.
- No rounding. helper.py rounds each C and each window mean to 3 decimals; we keep full precision (differences
  stay below 5e-4, see the tests).
- Which distribution: the one the sampler draws from after temperature, but BEFORE top-k/top-p truncation.
  deepconf.md says "the processed distribution"; truncated tokens have log-probability -inf, which would make C
  infinite whenever fewer than k tokens survive top_p = 0.95 (DeepConf's default sampling), so truncation is left
  out. (The published runs used vLLM V1's default raw log-probs, i.e. temperature 1: pass temperature=None.)
  The runtime's returned TokenLogprobs equal ours when top_k = 0 and top_p = 1.
- Online stop only once the window is full, when its mean is strictly below the threshold (the vLLM patch and
  deepconf.md); the lowest group of a trace shorter than the window is its whole-trace mean (helper.py).
- Percentiles are numpy's default (linear interpolation), as np.percentile in deepconf-online.py.

Everything on the per-token path is torch, batched over sequences and computed on the logits' device: no host
copy of the vocabulary and no host synchronisation (the tests run it on the meta device, which has no data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

DEFAULT_TOP_K = 20
DEFAULT_WINDOW = 2048
DEFAULT_BOTTOM_FRACTION = 0.1
DEEPCONF_LOW_ETA = 10.0  # keep the top 10% (threshold at the 90th percentile of warm-up lowest groups)
DEEPCONF_HIGH_ETA = 90.0  # keep the top 90%


# ---- per token ---------------------------------------------------------------------------------------------------


def token_confidence(top_logprobs: torch.Tensor) -> torch.Tensor:
    """C = -mean over the last dim. top_logprobs: (..., k) log-probabilities of the k most likely tokens; the
    result is fp32, or fp64 for fp64 input."""
    return -top_logprobs.to(torch.promote_types(top_logprobs.dtype, torch.float32)).mean(dim=-1)


def confidence_from_logits(logits: torch.Tensor, k: int = DEFAULT_TOP_K,
                           temperature: torch.Tensor | float | None = None) -> torch.Tensor:
    """Token confidence of each row's distribution: (num_seqs, vocab) logits -> (num_seqs,) fp32, on logits.device.

    temperature: None (raw logits), a number, or a (num_seqs,) tensor on the logits' device; rows with
    temperature <= 0 (greedy) use 1. log P = x - logsumexp(x), so C = logsumexp(x) - mean(top-k of x): one top-k
    and one reduction over the vocabulary, no log-softmax of the whole row kept.
    """
    vocab = logits.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"DeepConf top-k: expected an integer in [1, vocab_size={vocab}], found {k!r}")
    x = logits.float()
    if temperature is not None:
        t = torch.as_tensor(temperature, dtype=torch.float32, device=x.device)
        t = torch.where(t > 0, t, torch.ones_like(t))
        x = x / (t[..., None] if t.ndim else t)
    return torch.logsumexp(x, dim=-1) - x.topk(k, dim=-1).values.mean(dim=-1)


# ---- per trace, incrementally (online) ---------------------------------------------------------------------------


def check_window(window: int) -> None:
    """A DeepConf window is a whole number of tokens, at least one."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"DeepConf window: expected an integer >= 1, found {window!r}")


def window_sums(confs: Sequence[float] | torch.Tensor, window: int = DEFAULT_WINDOW) -> list[float]:
    """GroupConfidence.push's running sum, replayed on the host: after each token, the float64 sum of the last
    `window` confidences, each first rounded to the ring's fp32, updated by total += new - leaving. The same IEEE
    operations in the same order as push, so the values equal what push leaves in `total`, bit for bit, on any
    device (restore and tts.online_sim rely on it). The group confidence after token i is sums[i] / min(i+1, window).
    """
    check_window(window)
    c = torch.as_tensor(confs, dtype=torch.float64).flatten().to(torch.float32).double().tolist()
    sums: list[float] = []
    total = 0.0
    for i, x in enumerate(c):
        total += x - (c[i - window] if i >= window else 0.0)
        sums.append(total)
    return sums


class GroupConfidence:
    """Sliding-window group confidence of many traces at once, O(1) per token: one ring buffer row per slot.

    A slot holds one trace (the engine's state slot, say): `start` it when a trace takes the slot, `push` each
    new token's confidence, read `stop` for DeepConf's online decision. All state lives on `device`; every method
    takes and returns device tensors (slots: (n,) int64), so a step needs no host synchronisation.

    thresholds: per slot; -inf (the default, and warm-up traces) never stops. The running sum is float64 so that
    32k add/subtract pairs do not drift.
    """

    def __init__(self, num_slots: int, window: int = DEFAULT_WINDOW, device: torch.device | str = "cpu") -> None:
        check_window(window)
        self.window = window
        self.ring = torch.zeros(num_slots, window, dtype=torch.float32, device=device)
        self.total = torch.zeros(num_slots, dtype=torch.float64, device=device)  # sum over the current window
        self.count = torch.zeros(num_slots, dtype=torch.int64, device=device)  # tokens pushed since start
        self.lowest = torch.full((num_slots,), math.inf, dtype=torch.float64, device=device)  # over full windows
        self.threshold = torch.full((num_slots,), -math.inf, dtype=torch.float64, device=device)

    def start(self, slots: torch.Tensor, threshold: torch.Tensor | float = -math.inf) -> None:
        """A new trace in each of `slots` (its threshold: a number or (n,) tensor; -inf = never stop)."""
        self.total[slots] = 0.0
        self.count[slots] = 0
        self.lowest[slots] = math.inf
        self.threshold[slots] = torch.as_tensor(threshold, dtype=torch.float64, device=self.threshold.device)

    def push(self, slots: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
        """Append one token's confidence (n,) to each slot's trace; return each slot's group confidence (n,)
        float64: the mean of its last `window` confidences (of all of them while fewer)."""
        pos = self.count[slots] % self.window
        full = self.count[slots] >= self.window
        conf = conf.to(self.ring.dtype)
        leaving = torch.where(full, self.ring[slots, pos], torch.zeros_like(conf))
        self.total[slots] += conf.double() - leaving.double()
        self.ring[slots, pos] = conf
        self.count[slots] += 1
        n = self.count[slots]
        group = self.total[slots] / n.clamp(max=self.window)
        now_full = n >= self.window
        self.lowest[slots] = torch.where(now_full, torch.minimum(self.lowest[slots], group), self.lowest[slots])
        return group

    def stop(self, slots: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """DeepConf's online stop for the group confidences `push` just returned: (n,) bool, True where the window
        is full and its mean is strictly below the slot's threshold."""
        return (self.count[slots] >= self.window) & (group < self.threshold[slots])

    def restore(self, slot: int, confs: Sequence[float], threshold: float = -math.inf) -> None:
        """Put into `slot` a trace that already has the token confidences `confs` (say, one re-admitted after a
        recompute preemption): the state `start` then a `push` per value would leave, bit for bit, so the trace
        stops where it would have without the interruption.

        The running sum is replayed on the host (window_sums: push's own operations, which IEEE rounds alike on
        every device), then one copy per tensor; O(len(confs)).
        """
        w = self.window
        vals = torch.as_tensor(list(confs), dtype=torch.float64).to(self.ring.dtype)  # as push stores them
        sums = window_sums(vals, w)
        total = sums[-1] if sums else 0.0
        lowest = min((t / w for t in sums[w - 1:]), default=math.inf)
        ring = torch.zeros(w, dtype=self.ring.dtype)
        n = len(sums)
        if n:
            first = max(0, n - w)
            ring[torch.arange(first, n) % w] = vals[first:]
        dev = self.ring.device
        self.ring[slot] = ring.to(dev)
        self.total[slot] = total
        self.count[slot] = n
        self.lowest[slot] = lowest
        self.threshold[slot] = threshold

    def lowest_group(self, slots: torch.Tensor) -> torch.Tensor:
        """Each trace's lowest group confidence so far (its min_conf): the lowest full window, or the mean of the
        whole trace while it is shorter than the window (NaN for a trace with no token yet)."""
        n = self.count[slots]
        partial = self.total[slots] / n.clamp(min=1)
        partial = torch.where(n > 0, partial, torch.full_like(partial, math.nan))
        return torch.where(n >= self.window, self.lowest[slots], partial)


# ---- per trace, after the fact (offline) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceScores:
    """The four DeepConf trace confidences (higher = more confident)."""

    mean: float  # all tokens
    tail: float  # the last `tail` tokens
    bottom_window: float  # mean of the lowest `bottom_fraction` of full windows (at least one)
    lowest_window: float  # the lowest full window: min_conf

    def get(self, name: str) -> float:
        if name not in SCORE_NAMES:
            raise ValueError(f"DeepConf trace score: expected one of {', '.join(SCORE_NAMES)}, found {name!r}")
        return float(getattr(self, name))


SCORE_NAMES = ("mean", "tail", "bottom_window", "lowest_window")


def window_means(confs: torch.Tensor, window: int = DEFAULT_WINDOW) -> torch.Tensor:
    """Means of every full window of `window` consecutive confidences, float64; a trace shorter than the window
    has one group, its whole mean (DeepConf's compute_least_grouped)."""
    c = confs.double().flatten()
    if c.numel() == 0:
        raise ValueError("DeepConf window means of an empty trace: a trace needs at least one generated token")
    if c.numel() < window:
        return c.mean().reshape(1)
    cs = torch.cat([c.new_zeros(1), c.cumsum(0)])
    return (cs[window:] - cs[:-window]) / window


def trace_scores(confs: Sequence[float] | torch.Tensor, window: int = DEFAULT_WINDOW, tail: int | None = None,
                 bottom_fraction: float = DEFAULT_BOTTOM_FRACTION) -> TraceScores:
    """Scores of one trace from its token confidences; tail defaults to the window (2048 both in DeepConf)."""
    c = torch.as_tensor(confs, dtype=torch.float64).flatten()
    groups = window_means(c, window)
    n_bottom = max(1, int(groups.numel() * bottom_fraction))
    return TraceScores(
        mean=float(c.mean()),
        tail=float(c[-(tail or window):].mean()),
        bottom_window=float(groups.topk(n_bottom, largest=False).values.mean()),
        lowest_window=float(groups.min()),
    )


def percentile(values: Sequence[float], q: float) -> float:
    """numpy's default percentile (linear interpolation between closest ranks), q in [0, 100]."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile: expected q in [0, 100], found {q!r}")
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def warmup_threshold(lowest_windows: Sequence[float], eta: float = DEEPCONF_LOW_ETA) -> float:
    """The online stop threshold from the warm-up traces' lowest-group confidences: their (100 - eta) percentile,
    so that about eta% of such traces would survive (eta 10: DeepConf-low, 90: DeepConf-high)."""
    if not 0.0 < eta < 100.0:
        raise ValueError(f"DeepConf eta: expected a percentage in (0, 100), found {eta!r}")
    return percentile(lowest_windows, 100.0 - eta)
