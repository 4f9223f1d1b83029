"""runtime/backends.py: limits capped by the executor, pools sized to memory, options a backend would ignore."""

import json

import pytest
from click.testing import CliRunner

from trtfalcon.cli import main
from trtfalcon.config import preset
from trtfalcon.errors import ConfigError
from trtfalcon.runtime.backends import RuntimeOptions, default_kv_blocks, create_executor, runtime_limits
from trtfalcon.runtime.contract import CacheSpec


class _EngineLike:
    """An executor with fixed limits, as a TensorRT engine's optimization profile gives them."""

    def __init__(self, **limits):
        self.cache_spec = CacheSpec.for_model(preset("tiny"), num_blocks=8, block_size=16, num_slots=48,
                                              kv_dtype=None, conv_dtype=None, ssm_dtype=None)
        self.__dict__.update(limits)


def test_limits_are_capped_by_the_executor():
    cfg = preset("tiny")
    lim = runtime_limits(_EngineLike(max_batch_size=32, max_num_tokens=128, max_seq_len=1000),
                         RuntimeOptions(max_batch_size=64, max_num_tokens=512, device="cuda"), cfg)
    assert (lim.max_batch_size, lim.max_num_tokens, lim.max_seq_len) == (32, 128, 1000)
    # no engine limits: the options, the state slots and the CPU cap of max_seq_len apply
    lim = runtime_limits(_EngineLike(), RuntimeOptions(max_batch_size=64, max_num_tokens=512), cfg)
    assert (lim.max_batch_size, lim.max_num_tokens, lim.max_seq_len) == (48, 512, 4096)
    lim = runtime_limits(_EngineLike(max_seq_len=1000), RuntimeOptions(max_seq_len=600), cfg)
    assert lim.max_seq_len == 600


def test_default_kv_pool_fits_the_memory_left():
    opts = RuntimeOptions(max_batch_size=64, block_size=16)
    full = 64 * 2048 // 16
    assert default_kv_blocks(opts, 2048, 1000, 0, None, "cpu") == full  # unknown memory: full length
    assert default_kv_blocks(opts, 2048, 1000, 0, 10**12, "cpu") == full
    assert default_kv_blocks(opts, 2048, 1000, 0, 2_000_000, "cuda") == int(0.9 * 2_000_000) // 1000
    with pytest.raises(ConfigError, match="one sequence needs 128 KV blocks .* lower --max-seq-len"):
        default_kv_blocks(opts, 2048, 1000, 50_000, 100_000, "cuda")


@pytest.mark.parametrize("backend, opts, flag", [
    ("onnxruntime", RuntimeOptions(device="cuda:0"), "--device"),
    ("onnxruntime", RuntimeOptions(dtype="bf16"), "--dtype"),
    ("onnxruntime", RuntimeOptions(ssm_dtype="bf16"), "--ssm-state-dtype"),
    ("tensorrt", RuntimeOptions(block_size=64), "--block-size"),
    ("tensorrt", RuntimeOptions(kernels="reference"), "--kernels"),
])
def test_options_a_backend_cannot_honour_are_errors(tmp_path, backend, opts, flag):
    with pytest.raises(ConfigError, match=f"{flag}: not used by the {backend} backend"):
        create_executor(backend, tmp_path, opts)


def test_engine_from_options_is_sized_by_the_options_and_the_executor(tmp_path):
    from trtfalcon.runtime.backends import RuntimeLimits
    from trtfalcon.runtime.llm import LLMEngine

    opts = RuntimeOptions(max_batch_size=4, max_num_tokens=16, max_seq_len=64)
    engine = LLMEngine.from_options("torch", _synth(tmp_path), opts, seed=3)
    assert engine.limits == RuntimeLimits(4, 16, 64) and engine.options is opts and engine.config.vocab_size == 256
    s = engine.scheduler
    assert (s.max_batch_size, s.max_num_tokens, s.max_seq_len) == (4, 16, 64)
    assert s.eos_token_ids == frozenset(engine.config.eos_token_id) and engine.executor.cache_spec.num_slots == 4


def _synth(tmp_path):
    hf = tmp_path / "hf"
    assert CliRunner().invoke(main, ["synth", "--preset", "tiny", "--out", str(hf), "--dtype", "fp32"]).exit_code == 0
    return hf


def test_reference_backend_refuses_sampling_options_it_would_drop(tmp_path):
    hf = _synth(tmp_path)
    for extra in (["--top-k", "5"], ["--top-p", "0.9"], ["--logprobs", "2"], ["--kv-cache-dtype", "fp8"]):
        r = CliRunner().invoke(main, ["generate", str(hf), "--prompt-ids", "1,2", "--backend", "reference", *extra])
        assert r.exit_code == 2 and "not supported by --backend reference" in r.output, (extra, r.output)


def test_bench_exits_1_when_a_request_failed_and_reports_the_rest(tmp_path):
    hf = _synth(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"task_id": i, "input_ids": ids, "output_tokens": 3})
                              for i, ids in enumerate([[1, 2, 3], [4, 999], [5, 6]])))
    out = tmp_path / "bench"
    r = CliRunner().invoke(main, ["bench", str(hf), "--dataset", str(data), "--concurrency", "2", "--warmup", "0",
                                  "--out", str(out)])
    assert r.exit_code == 1 and "1 request(s) failed" in r.output
    report = json.loads((out / "report.json").read_text())
    assert report["results"][0]["num_requests"] == 2 and report["meta"]["device"] == "cpu"


def test_bench_refuses_a_concurrency_the_executor_cannot_run(tmp_path, monkeypatch):
    import trtfalcon.runtime.backends as backends

    hf = _synth(tmp_path)
    real = backends.create_executor

    def engine_of_batch_2(backend, checkpoint, opts):
        executor, cfg = real(backend, checkpoint, opts)
        executor.max_batch_size = 2  # as a TensorRT engine built for batch 2 reports it
        return executor, cfg

    monkeypatch.setattr(backends, "create_executor", engine_of_batch_2)
    r = CliRunner().invoke(main, ["bench", str(hf), "--concurrency", "4", "--isl", "4", "--osl", "2",
                                  "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--concurrency 4: this torch executor runs at most 2 sequences" in r.output
    assert not (tmp_path / "b").exists()
