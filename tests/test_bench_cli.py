"""`trtfalcon bench` and `trtfalcon demo`: reports with the fields users compare, numbers that add up."""

import json
import os
import subprocess
import sys

import pytest

from click.testing import CliRunner

from trtfalcon.bench.dataset import load_jsonl, token_norm_dist
from trtfalcon.bench.throughput import percentile, run_concurrency
from trtfalcon.cli import main
from trtfalcon.errors import ConfigError


def test_token_norm_dist_is_deterministic_and_fixed_length_with_zero_stdev():
    a = token_norm_dist(5, 16, 8, vocab_size=100, seed=1)
    assert a == token_norm_dist(5, 16, 8, vocab_size=100, seed=1)
    assert all(len(r.input_ids) == 16 and r.output_tokens == 8 for r in a)
    b = token_norm_dist(50, 16, 8, 4.0, 2.0, vocab_size=100, seed=1)
    assert len({len(r.input_ids) for r in b}) > 3 and min(r.output_tokens for r in b) >= 1


def test_jsonl_dataset_errors_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"task_id": 1, "input_ids": [1, 2], "output_tokens": 3}\n{"input_ids": [1], "output_tokens": 0}\n')
    try:
        load_jsonl(f)
    except Exception as e:  # noqa: BLE001
        assert f"{f}:2" in str(e) and "output_tokens" in str(e)
    else:
        raise AssertionError("expected an error")


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0  # not 3 (rounding an interpolated index)
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 99) == 99.0 and percentile(values, 90) == 90.0 and percentile(values, 1) == 1.0


def test_levels_on_one_engine_schedule_as_on_an_engine_per_level():
    """bench runs every concurrency level on one engine sized for the largest: each level's steps (and outputs) are
    those an engine with max_batch_size = concurrency gives, the larger batch limit never binding."""
    from trtfalcon.runtime.executors.null import NullExecutor, null_cache_spec
    from trtfalcon.runtime.llm import LLMEngine

    def engine(batch):
        return LLMEngine(NullExecutor(100, 16, null_cache_spec(512, 4, 16)), max_batch_size=batch, max_num_tokens=24,
                         max_seq_len=64)

    def schedule(result):
        return [(s["num_tokens"], s["num_seqs"], s["num_decode"], s["num_prefill"]) for s in result.steps]

    shared = engine(16)
    for c in (4, 16, 8):
        reqs = token_norm_dist(2 * c + 3, 12, 6, 5.0, 3.0, vocab_size=100, seed=c)
        a = run_concurrency(shared, reqs, concurrency=c, warmup=3)
        b = run_concurrency(engine(c), reqs, concurrency=c, warmup=3)
        assert schedule(a) == schedule(b) and len(schedule(a)) > 5
        assert (a.num_requests, a.total_output_tokens, a.errors) == (b.num_requests, b.total_output_tokens, [])
    with pytest.raises(ConfigError, match="concurrency 8: expected an engine .* found max_batch_size 4"):
        run_concurrency(engine(4), reqs, concurrency=8)


def test_bench_writes_a_consistent_report(tmp_path):
    hf = tmp_path / "hf"
    assert CliRunner().invoke(main, ["synth", "--preset", "tiny", "--out", str(hf), "--dtype", "fp32"]).exit_code == 0
    out = tmp_path / "bench"
    r = CliRunner().invoke(main, ["bench", str(hf), "--isl", "12", "--osl", "6", "--concurrency", "4",
                                  "--concurrency", "8", "--num-requests", "10", "--warmup", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [x["concurrency"] for x in report["results"]] == [4, 8]
    for res in report["results"]:
        assert res["num_requests"] == 10 and res["errors"] == []
        assert res["total_output_tokens"] == 10 * 6  # EOS ignored: exactly osl tokens each
        assert abs(res["output_tokens_per_s"] - 60 / res["duration_s"]) < 1e-6 * res["output_tokens_per_s"]
        assert 1 <= res["mean_live_batch"] <= res["concurrency"]
        assert max(s["num_seqs"] for s in res["steps"]) <= res["concurrency"]
        assert res["ttft_ms"]["p50"] <= res["ttft_ms"]["p99"] and res["tpot_ms"]["p50"] > 0
        # warm-up requests are not in the measured step log: measured decode tokens = outputs minus first tokens
        assert sum(s["num_decode"] for s in res["steps"]) == 10 * (6 - 1)
    assert "concurrency" in r.output and "report:" in r.output


def test_demo_runs_the_whole_cpu_pipeline(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--isl", "8", "--osl", "4", "--skip-kernels"])
    assert r.exit_code == 0, r.output
    assert "8/8 prompts in flight give the reference model's greedy tokens exactly" in r.output
    assert "skipped (--skip-kernels)" in r.output
    assert "DeepConf online (budget 12, warm-up 4, eta 10, window 8) on 3 held-out problems" in r.output
    assert "tokens vs offline's" in r.output and "saved" in r.output
    report = json.loads((out / "bench" / "report.json").read_text())
    assert [x["concurrency"] for x in report["results"]] == [32, 64]
    assert (out / "tiny-deploy" / "config.json").is_file() and (out / "bench" / "throughput.png").is_file()


@pytest.mark.slow
def test_plugins_compile_cli_writes_ptx_and_a_spill_free_report(tmp_path):
    out = tmp_path / "k"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler, not the interpreter
    cmd = [sys.executable, "-m", "trtfalcon.cli", "plugins", "compile", "--preset", "tiny", "--arch", "sm_90"]
    r = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["archs"] == ["sm_90"] and len(manifest["kernels"]) >= 6
    for rec in manifest["kernels"]:
        ptx = (out / rec["files"]["ptx"]).read_text()
        assert ".target sm_90" in ptx and rec["resources"]["spill_stores"] == 0
    assert "spill_stores" in r.stdout
    again = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
    assert again.returncode != 0 and "already exists" in again.stderr
    interp = subprocess.run([*cmd, "--out", str(tmp_path / "k2")], env={**env, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True)
    assert interp.returncode != 0 and "unset TRITON_INTERPRET" in interp.stderr


def test_demo_never_deletes_a_directory_it_did_not_make(tmp_path):
    victim = tmp_path / "work"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    r = CliRunner().invoke(main, ["demo", "--out", str(victim), "--skip-kernels"])
    assert r.exit_code != 0 and "was not made by `trtfalcon demo`" in r.output
    assert (victim / "thesis.tex").read_text() == "years of work"


def test_artifact_directories_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from trtfalcon.checkpoint.synth import synth_checkpoint
    from trtfalcon.config import preset_dict

    old = os.umask(0o022)
    try:
        out = synth_checkpoint(preset_dict("tiny"), tmp_path / "hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_measure_reads_a_chatty_child_without_blocking_and_reports_its_peak_rss():
    from trtfalcon.bench.process import measure

    code = "import sys; x = bytearray(200 * 2**20); sys.stdout.write('a' * 300000); sys.stderr.write('e'); sys.exit(3)"
    r = measure("chatty", [sys.executable, "-c", code])
    assert r["exit_code"] == 3 and r["stderr_tail"] == "e" and r["stdout_tail"] == "a" * 600
    assert r["peak_rss_bytes"] > 200 * 2**20  # the child's own 200 MiB, from the kernel's accounting
