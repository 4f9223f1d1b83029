"""The sampler on the device: nothing is read back from the logits' device until DeviceSample.to_host's one copy,
and that copy carries exactly what the per-row lists hold. (On a GPU, tests/gpu/ checks the same with CUDA's
sync debug mode.)"""

from __future__ import annotations

import contextlib
import random

import torch

from trtfalcon.runtime.request import SamplingParams
from trtfalcon.runtime.sampler import DeviceSample, Sampler

V = 300
READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu")


@contextlib.contextmanager
def count_host_reads():
    """Counts the Tensor methods that bring device values to the host (on a GPU: a sync each)."""
    counts = dict.fromkeys(READS, 0)
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)
        return wrapper

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _params():
    return [SamplingParams(temperature=0.8, top_k=20, logprobs=3, seed=1), SamplingParams(logprobs=5),
            SamplingParams(temperature=1.3, top_k=0, seed=2), SamplingParams(temperature=0.5, top_k=7, logprobs=2)]


def test_sample_on_device_reads_nothing_back_and_to_host_copies_once():
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    params = _params()
    with count_host_reads() as reads:
        result = Sampler().sample_on_device(logits, params, [random.Random(i) for i in range(4)])
    assert sum(reads.values()) == 0, reads
    with count_host_reads() as reads:
        ids, lps = result.to_host(params)
    assert reads["cpu"] == 1 and sum(reads.values()) == 1, reads
    assert ids == result.token_ids.tolist()
    assert lps[2] is None  # a row that asked for no log-probs gets none
    for i, p in enumerate(params):  # the others their own k, cut from the step's largest
        if not p.logprobs:
            continue
        assert len(lps[i].top_ids) == p.logprobs == len(lps[i].top_logprobs)
        assert lps[i].top_ids == result.top_ids[i, : p.logprobs].tolist()
        assert lps[i].logprob == float(result.chosen_logprobs[i])


def test_all_greedy_is_one_argmax_copy():
    logits = torch.randn(3, V)
    params = [SamplingParams()] * 3
    result = Sampler().sample_on_device(logits, params, [None] * 3)
    assert isinstance(result, DeviceSample) and result.top_logprobs is None
    assert result.to_host(params) == (logits.argmax(-1).tolist(), None)


def test_top_p_filter_decided_on_the_host_as_the_device_compares():
    """A top_p that rounds to 1.0 in fp32 filters nothing, as the fp32 copy on the device would compare it."""
    torch.manual_seed(1)
    logits = torch.randn(2, V)
    p = [SamplingParams(temperature=1.0, top_p=1.0 - 1e-9, logprobs=V, seed=3)] * 2
    lps = Sampler().sample(logits, p, [random.Random(3), random.Random(4)])[1]
    assert all(v > float("-inf") for lp in lps for v in lp.top_logprobs)


def test_confidence_rows_read_nothing_back_and_come_back_in_the_one_copy():
    """DeepConf rows (mixed k, temperature, greedy) get confidence_from_logits of their own tempered logits; the
    engine's group-confidence push stays on the device; ids, log-probs, confidences and stop flags come back in one
    copy."""
    from trtfalcon.runtime.confidence import OnlineConfidence
    from trtfalcon.runtime.request import ConfidenceParams
    from trtfalcon.tts.deepconf import confidence_from_logits

    torch.manual_seed(2)
    logits = torch.randn(5, V)
    params = [SamplingParams(temperature=0.8, top_p=0.5, seed=1, confidence=ConfidenceParams(top_k=20, window=2)),
              SamplingParams(logprobs=3),
              SamplingParams(confidence=ConfidenceParams(top_k=5, window=2, threshold=1e9)),
              SamplingParams(temperature=1.3, top_k=4, seed=2, confidence=ConfidenceParams(top_k=20, window=2)),
              SamplingParams(temperature=0.6, seed=3)]
    slots = [4, 0, 2, 1, 3]
    online = OnlineConfidence(num_slots=5)
    online.begin([], torch.device("cpu"))
    online.group(2).start(torch.tensor([4, 2, 1]), torch.tensor([-float("inf"), 1e9, -float("inf")],
                                                                 dtype=torch.float64))
    with count_host_reads() as reads:
        result = Sampler().sample_on_device(logits, params, [random.Random(i) for i in range(5)], slots)
        online.track(result, params)
    assert sum(reads.values()) == 0, reads
    with count_host_reads() as reads:
        ids, lps, stats = result.to_host_with_confidence(params)
    assert reads["cpu"] == 1 and sum(reads.values()) == 1, reads
    assert ids == result.token_ids.tolist() and lps[1] is not None and lps[0] is None
    for i, (k, t) in {0: (20, 0.8), 2: (5, 1.0), 3: (20, 1.3)}.items():
        want = float(confidence_from_logits(logits[i: i + 1], k, t)[0])
        assert abs(stats.confidence[i] - want) < 1e-5, i
        assert stats.lowest_group[i] == stats.confidence[i]  # one token: the whole-trace mean
    assert stats.confidence[1] is None and stats.confidence[4] is None
    assert stats.stop == [False] * 5  # the window (2) is not full after one token, whatever the threshold
