"""Batched sampling: logits (num_seqs, vocab) -> one token per sequence, plus top-k log-probs when asked.

Everything runs on the logits' device; only the chosen ids and the requested top-k log-probs are copied to the
host (a GPU step never ships full-vocab logits back). Per-request randomness: each sampled row draws one uniform
number u from its own request's generator and picks the token by inverse CDF (first token whose cumulative
probability reaches u). A request's tokens therefore depend only on its seed and its own logits, never on which
other requests share the batch or on the batch's row order. The generator is a `random.Random` per request:
drawing from it costs ~0.1 us on the host where a torch.Generator call costs a few us, which matters at batch 64.

Host <-> device traffic per step (a GPU's logits): the rows' settings (temperature, top-k, top-p, u) go over in ONE
copy of one small table, from pinned memory, without waiting for the step's kernels; the filters' branches are
decided on the host from the same settings (no device read); and the result comes back in ONE copy
(`DeviceSample.to_host`). `Sampler.sample_on_device` returns that result while it is still on the device: ids,
chosen log-probs and the top-k log-probs as tensors. Rows with SamplingParams.confidence (DeepConf) also get their
token confidence there, from the tempered logits before truncation (one top-k over those rows); the engine adds its
window's stop flags on the device (runtime/confidence.py), and `DeviceSample.to_host_with_confidence` brings it
all back in the same single copy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from trtfalcon.runtime.request import SamplingParams, TokenLogprobs
from trtfalcon.tts.deepconf import confidence_from_logits


def process_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   *, kmax: int | None = None, any_top_p: bool | None = None) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p; removed tokens become -inf.

    logits: (num_seqs, vocab) fp32; temperature: (num_seqs,) > 0; top_k: (num_seqs,) int64, 0 = off;
    top_p: (num_seqs,) in (0, 1], 1 = off. Ties at the k-th value are all kept (as vLLM and HF do).
    kmax (the largest k in (0, vocab) asked, 0 = none) and any_top_p (some top_p < 1) say which filters run; the
    caller who knows them saves a device-to-host read each (they are read from the tensors when None).
    """
    x = logits / temperature[:, None]
    vocab = x.shape[-1]
    active = (top_k > 0) & (top_k < vocab)
    if kmax is None:
        kmax = int(top_k[active].max()) if bool(active.any()) else 0
    if kmax:
        # One topk for the largest k asked; rows without a filter compare against -inf (keep everything).
        k = torch.where(active, top_k, torch.ones_like(top_k))
        kth = x.topk(kmax, dim=-1).values.gather(1, (k - 1)[:, None])
        kth = kth.masked_fill(~active[:, None], float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))
    if any_top_p is None:
        any_top_p = bool((top_p < 1.0).any())
    if any_top_p:
        # Nucleus: keep the smallest set of most likely tokens whose probability reaches top_p (HF's rule: drop a
        # token when the mass strictly before it already exceeds top_p; the top token always stays). Only the
        # sorted values are needed: the cut becomes a per-row logit threshold (ties at the cut are all kept).
        sorted_x = _sort_descending(x)
        probs = sorted_x.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        keep = (mass_before <= top_p[:, None]).sum(dim=-1, keepdim=True)  # >= 1: mass_before[0] = 0
        threshold = sorted_x.gather(1, keep - 1)
        x = x.masked_fill(x < threshold, float("-inf"))
    return x


def _sort_descending(x: torch.Tensor) -> torch.Tensor:
    """Values of each row, largest first. On the CPU numpy's sort is ~20x faster than torch's (64 x 32k)."""
    if x.device.type == "cpu":
        return torch.from_numpy(-np.sort(-x.detach().numpy(), axis=-1))
    return x.sort(dim=-1, descending=True).values


@dataclass
class ConfidenceStats:
    """DeepConf per row that asked (SamplingParams.confidence), on the host; None for the other rows.

    confidence: the token's confidence; stop: its trace's full window fell below its threshold with this token;
    lowest_group: the trace's min_conf so far. stop and lowest_group come from the engine's GroupConfidence (None
    when the sample was taken without one, e.g. Sampler.sample alone).
    """

    confidence: list[float | None]
    stop: list[bool] | None = None
    lowest_group: list[float | None] | None = None


@dataclass
class DeviceSample:
    """One step's sampling result on the logits' device (row i = params[i]); `to_host` copies it out at once.

    token_ids (n,) int64; with log-probs asked (k = the largest SamplingParams.logprobs of the step):
    chosen_logprobs (n,) the chosen token's, top_logprobs / top_ids (n, k), most likely first, all from the
    distribution sampled from. Rows that did not ask get theirs too; to_host drops them.

    DeepConf (rows with SamplingParams.confidence): `confidence_rows` (host) lists the rows that asked, in order;
    `confidence` (m,) fp32 their token confidences and `confidence_slots` (m,) int64 their ring rows (the
    `slots` the sampler was given), both on the device. The engine adds `stop` (m,) bool and `lowest_group` (m,)
    float64 from its GroupConfidence before the copy, so the stop decisions come back with the token ids.
    """

    token_ids: torch.Tensor
    chosen_logprobs: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    confidence_rows: list[int] | None = None
    confidence: torch.Tensor | None = None
    confidence_slots: torch.Tensor | None = None
    stop: torch.Tensor | None = None
    lowest_group: torch.Tensor | None = None

    def to_host(self, params: Sequence[SamplingParams]) -> tuple[list[int], list[TokenLogprobs | None] | None]:
        """(token ids, per-row TokenLogprobs or None) in one device-to-host copy."""
        ids, logprobs, _ = self.to_host_with_confidence(params)
        return ids, logprobs

    def to_host_with_confidence(self, params: Sequence[SamplingParams]
                                ) -> tuple[list[int], list[TokenLogprobs | None] | None, ConfidenceStats | None]:
        """(token ids, per-row TokenLogprobs or None, ConfidenceStats or None) in one device-to-host copy."""
        parts = [self.token_ids]
        if self.top_logprobs is not None:
            parts += [self.chosen_logprobs, self.top_logprobs.flatten(), self.top_ids.flatten()]
        if self.confidence is not None:
            parts.append(self.confidence)
            if self.stop is not None:
                parts += [self.stop, self.lowest_group]
        if len(parts) == 1:
            if self.token_ids.device.type == "cpu":
                return self.token_ids.tolist(), None, None
            return self.token_ids.cpu().tolist(), None, None
        n = self.token_ids.shape[0]
        # ids < 2**53, fp32 log-probs and confidences (-inf included), bools and fp64 group means are exact in
        # fp64: one tensor, one copy
        packed = torch.cat([x.double() for x in parts]).cpu().numpy()
        ids = packed[:n].astype(np.int64).tolist()
        at = n
        out: list[TokenLogprobs | None] | None = None
        if self.top_logprobs is not None:
            k = self.top_logprobs.shape[1]
            chosen = packed[at: at + n].tolist()
            top_vals = packed[at + n: at + n + n * k].reshape(n, k).tolist()
            top_ids = packed[at + n + n * k: at + n + 2 * n * k].astype(np.int64).reshape(n, k).tolist()
            at += n + 2 * n * k
            out = []
            for i, p in enumerate(params):
                want = p.logprobs
                out.append(TokenLogprobs(ids[i], chosen[i], top_ids[i][:want], top_vals[i][:want]) if want else None)
        stats = None
        if self.confidence is not None:
            rows = self.confidence_rows
            m = len(rows)
            conf: list[float | None] = [None] * n
            for j, c in zip(rows, packed[at: at + m].tolist()):
                conf[j] = c
            stats = ConfidenceStats(conf)
            if self.stop is not None:
                stop = [False] * n
                lowest: list[float | None] = [None] * n
                for j, f, g in zip(rows, packed[at + m: at + 2 * m].tolist(), packed[at + 2 * m: at + 3 * m].tolist()):
                    stop[j] = f != 0.0
                    lowest[j] = g
                stats.stop, stats.lowest_group = stop, lowest
        return ids, out, stats


def token_confidences(logits: torch.Tensor, temperature: torch.Tensor | None, k: torch.Tensor | int,
                      kmax: int) -> torch.Tensor:
    """DeepConf token confidence of each row (tts.deepconf.confidence_from_logits), with a per-row k.

    One top-k of the largest k asked for all rows; a single k (an int) is exactly confidence_from_logits. With
    different k per row (a (rows,) tensor), each row averages its first k of the sorted values.
    """
    if isinstance(k, int):
        return confidence_from_logits(logits, k, temperature)
    x = logits.float()
    if temperature is not None:
        x = x / torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]
    top = x.topk(kmax, dim=-1).values.cumsum(dim=-1)
    return torch.logsumexp(x, dim=-1) - top.gather(1, (k - 1)[:, None]).squeeze(1) / k.float()


class Sampler:
    """Stateless apart from a pinned host table for the rows' settings; call `sample` once per step."""

    def __init__(self) -> None:
        self._settings: torch.Tensor | None = None  # pinned fp64, the rows' settings table for GPU logits

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams], rngs: Sequence[random.Random | None]
               ) -> tuple[list[int], list[TokenLogprobs] | None]:
        """Pick one token per row of `logits` (num_seqs, vocab).

        params[i], rngs[i]: row i's request settings and generator (None for greedy rows). Returns the token ids
        and, if any row asked for logprobs, a list with a TokenLogprobs for those rows (None for the others).
        (Token confidences, for rows with SamplingParams.confidence: sample_on_device + to_host_with_confidence.)
        """
        if logits.device.type == "cpu" and all(p.temperature == 0.0 and not p.logprobs for p in params):
            # Fast path: one argmax; both torch and numpy return the first maximal index (ties -> lowest id).
            # On the CPU numpy's vectorized argmax is ~20x faster than torch's (64 x 32k: 0.4 ms vs 8 ms).
            return logits.detach().numpy().argmax(axis=-1).tolist(), None
        return self.sample_on_device(logits, params, rngs).to_host(params)

    def sample_on_device(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                         rngs: Sequence[random.Random | None], slots: Sequence[int] | None = None) -> DeviceSample:
        """The step's picks (and top-k log-probs when asked) as tensors on the logits' device; nothing is read
        back from the device here. Draws each sampled row's u from its generator (host).

        Rows whose params ask for DeepConf (SamplingParams.confidence) also get their token confidence, computed
        here on the device; `slots[i]` (row i's ring row in the engine's GroupConfidence) goes over in the same
        settings copy and comes back as DeviceSample.confidence_slots, a device tensor the engine indexes with.
        """
        all_greedy = True
        want_logprobs = 0
        conf_rows: list[int] = []
        for i, p in enumerate(params):
            if p.temperature != 0.0:
                all_greedy = False
            if p.logprobs > want_logprobs:
                want_logprobs = p.logprobs
            if p.confidence is not None:
                conf_rows.append(i)
        if all_greedy and not want_logprobs and not conf_rows:
            return DeviceSample(logits.argmax(dim=-1))

        logits = logits.float()
        vocab = logits.shape[-1]
        # The rows' settings in one table: temperature, top_k, top_p, u, greedy (greedy rows: no filter, u = 1,
        # temperature 1); with DeepConf rows also: the asking rows' indices, their k and their slots (first m
        # columns of rows 5-7)
        table = np.ones((8 if conf_rows else 5, len(params)), dtype=np.float64)
        kmax, any_top_p = 0, False
        for i, p in enumerate(params):
            if p.temperature == 0.0:
                table[1, i] = 0
                continue
            table[0, i], table[1, i], table[2, i], table[4, i] = p.temperature, p.top_k, p.top_p, 0.0
            rng = rngs[i]
            if rng is not None:
                table[3, i] = 1.0 - rng.random()
            if 0 < p.top_k < vocab:
                kmax = max(kmax, p.top_k)
            any_top_p = any_top_p or bool(np.float32(p.top_p) < 1.0)  # as the fp32 copy on the device compares
        m = len(conf_rows)
        conf_ks = [params[i].confidence.top_k for i in conf_rows]
        if conf_rows:
            table[5, :m] = conf_rows
            table[6, :m] = conf_ks
            if slots is not None:
                table[7, :m] = [slots[i] for i in conf_rows]
        t = self._to_device(table, logits.device)

        confidence = confidence_slots = None
        if conf_rows:
            # Before truncation: the tempered distribution (deepconf.py says why); greedy rows hold temperature 1
            every_row = m == len(params)
            rows = None if every_row else t[5, :m].long()
            x = logits if every_row else logits[rows]
            temps = t[0] if every_row else t[0][rows]
            k: torch.Tensor | int = conf_ks[0] if min(conf_ks) == max(conf_ks) else t[6, :m].long()
            confidence = token_confidences(x, None if all_greedy else temps.float(), k, max(conf_ks))
            if slots is not None:
                confidence_slots = t[7, :m].long()

        if all_greedy and not want_logprobs:
            # (numpy's argmax on the CPU, as in Sampler.sample's fast path: same ids, ~20x faster)
            token_ids = torch.from_numpy(logits.detach().numpy().argmax(axis=-1)) if logits.device.type == "cpu" \
                else logits.argmax(dim=-1)
            return DeviceSample(token_ids, confidence_rows=conf_rows, confidence=confidence,
                                confidence_slots=confidence_slots)

        greedy = t[4] != 0.0
        processed = process_logits(logits, t[0].float(), t[1].long(), t[2].float(), kmax=kmax, any_top_p=any_top_p)
        logprobs = processed.log_softmax(dim=-1)

        token_ids = logits.argmax(dim=-1)
        if not all_greedy:
            # Inverse CDF with u in (0, 1]: the first token whose cumulative probability reaches u * total.
            # u > 0 keeps a zero-probability (filtered) token from being picked at the start of the vocabulary.
            cdf = logprobs.double().exp().cumsum(dim=-1)
            target = (t[3] * cdf[:, -1]).unsqueeze(1)
            sampled = torch.searchsorted(cdf, target).squeeze(1).clamp_(max=vocab - 1)
            token_ids = torch.where(greedy, token_ids, sampled)
        sample = DeviceSample(token_ids, confidence_rows=conf_rows or None, confidence=confidence,
                              confidence_slots=confidence_slots)
        if want_logprobs:
            top = logprobs.topk(want_logprobs, dim=-1)
            sample.chosen_logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)
            sample.top_logprobs, sample.top_ids = top.values, top.indices
        return sample

    def _to_device(self, table: np.ndarray, device: torch.device) -> torch.Tensor:
        """The settings table on `device`: on a GPU one asynchronous copy from a reused pinned buffer (safe to
        refill next step: to_host's copy back has waited for this step's work, this copy included)."""
        if device.type == "cpu":
            return torch.from_numpy(table)
        if self._settings is None or self._settings.numel() < table.size:
            self._settings = torch.empty(max(table.size, 512), dtype=torch.float64, pin_memory=True)
        host = self._settings[: table.size].view(table.shape)  # contiguous: a non-contiguous source is staged
        host.numpy()[:] = table
        return host.to(device, non_blocking=True)
