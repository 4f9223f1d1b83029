"""DeepConf online in the engine: each trace's sliding-window group confidence, kept on the logits' device.

One tts.deepconf.GroupConfidence ring row per state slot (the scheduler's slot is also the sequence's row in the
block-table matrix), one GroupConfidence per window size in use (a request picks its window; usually all share
one). A trace's row is (re)started when it takes a slot: admission and fork start it empty; a trace re-admitted
after a recompute preemption restores it from the confidences it has recorded, so it stops exactly where it
would have without the preemption.

Per step, after the sampler put the token confidences of the rows that asked on the device
(DeviceSample.confidence, .confidence_slots), `track` pushes them and puts each row's stop flag and lowest group
into the DeviceSample, still on the device: DeviceSample.to_host_with_confidence brings them back in the one copy
that carries the token ids, and Scheduler.update ends the stopped traces in that same step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq

import torch

from trtfalcon.runtime.request import SamplingParams
from trtfalcon.runtime.sampler import DeviceSample
from trtfalcon.runtime.scheduler import Sequence
from trtfalcon.tts.deepconf import GroupConfidence


class OnlineConfidence:
    """Group confidences of the engine's traces, created on first use on the device their logits live on."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.groups: dict[int, GroupConfidence] = {}  # window -> its GroupConfidence (num_slots rows)
        self.device: torch.device | None = None

    def group(self, window: int) -> GroupConfidence:
        """The GroupConfidence of traces with this window (created on first use, on self.device)."""
        g = self.groups.get(window)
        if g is None:
            g = self.groups[window] = GroupConfidence(self.num_slots, window, self.device)
        return g

    def begin(self, seqs: Seq[Sequence], device: torch.device, running: Seq[Sequence] = ()) -> None:
        """Start (or restore) the rows of `seqs`, sequences that took a state slot since the last call; those no
        longer running (ended, preempted again) are skipped: their slot is not theirs now.

        `running` (the scheduler's running sequences) lets a new window size drop the GroupConfidences no running
        trace uses any more: memory stays bounded by the windows in flight, whatever windows clients sent before
        (a re-admitted trace restores its row from its recorded confidences, so nothing is lost).
        """
        if self.device is None:
            self.device = device
        if any(s.state_slot >= 0 and s.params.confidence.window not in self.groups for s in seqs) and self.groups:
            in_use = {s.params.confidence.window for s in running if s.params.confidence is not None}
            for window in [w for w in self.groups if w not in in_use]:
                del self.groups[window]
        fresh: dict[int, tuple[list[int], list[float]]] = {}
        for seq in seqs:
            if seq.state_slot < 0:
                continue
            conf = seq.params.confidence
            threshold = -math.inf if conf.threshold is None else float(conf.threshold)
            recorded = seq.output.confidences
            if recorded:
                self.group(conf.window).restore(seq.state_slot, recorded, threshold)
            else:
                slots, thresholds = fresh.setdefault(conf.window, ([], []))
                slots.append(seq.state_slot)
                thresholds.append(threshold)
        for window, (slots, thresholds) in fresh.items():
            self.group(window).start(torch.tensor(slots, device=self.device),
                                      torch.tensor(thresholds, dtype=torch.float64, device=self.device))

    def track(self, sample: DeviceSample, params: Seq[SamplingParams]) -> None:
        """Push the step's token confidences (sample.confidence, one per row in sample.confidence_rows) into their
        traces' rows and set sample.stop / sample.lowest_group, on the device (no host synchronisation)."""
        rows = sample.confidence_rows
        if not rows:
            return
        windows = [params[i].confidence.window for i in rows]
        first = windows[0]
        if all(w == first for w in windows):
            g = self.group(first)
            slots = sample.confidence_slots
            group = g.push(slots, sample.confidence)
            sample.stop = g.stop(slots, group)
            sample.lowest_group = g.lowest_group(slots)
            return
        # Several window sizes in one step (rare): each GroupConfidence takes its own rows.
        m = len(rows)
        stop = torch.zeros(m, dtype=torch.bool, device=sample.confidence.device)
        lowest = torch.zeros(m, dtype=torch.float64, device=sample.confidence.device)
        for window in sorted(set(windows)):
            at = torch.tensor([j for j, w in enumerate(windows) if w == window], device=stop.device)
            g = self.group(window)
            slots = sample.confidence_slots[at]
            group = g.push(slots, sample.confidence[at])
            stop[at] = g.stop(slots, group)
            lowest[at] = g.lowest_group(slots)
        sample.stop, sample.lowest_group = stop, lowest
