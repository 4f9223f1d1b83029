"""`trtfalcon export`, then `generate` / `bench --backend onnxruntime` on the export, as a user runs them."""

import json

from helpers import run_cli as run


def test_export_then_generate_and_bench_on_onnxruntime(deploy_checkpoints, hf_checkpoints, tmp_path):
    assert "Example" in run("export", "--help").output
    dep, out = deploy_checkpoints("base"), tmp_path / "onnx"
    assert "wrote ONNX export" in run("export", dep, out).output
    tokens = {}
    for backend, path in (("torch", dep), ("onnxruntime", out)):
        r = run("generate", path, "--backend", backend, "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "6", "--json",
                "--max-batch-size", "2", "--max-seq-len", "32")
        tokens[backend] = json.loads(r.output.strip().splitlines()[-1])["token_ids"]
    assert tokens["onnxruntime"] == tokens["torch"] and len(tokens["torch"]) == 6
    run("bench", out, "--backend", "onnxruntime", "--concurrency", "2", "--num-requests", "2", "--warmup", "0",
        "--isl", "4", "--osl", "3", "--max-seq-len", "16", "--out", tmp_path / "bench")
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert report["meta"]["backend"] == "onnxruntime" and report["results"][0]["num_requests"] == 2
    r = run("export", hf_checkpoints("base"), tmp_path / "bad", ok=False)
    assert "not a deploy checkpoint" in r.output and "trtfalcon convert" in r.output
    assert not (tmp_path / "bad").exists()
