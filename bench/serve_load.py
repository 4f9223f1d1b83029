"""Load and faults against a real Triton Inference Server serving the tiny model, with nothing lost.

    python bench/serve_load.py --streams 64 --requests 512

Starts `tritonserver` (trtfalcon.serve.server.TritonServer: --tritonserver, else whatever find_tritonserver finds,
else the pinned nvidia-pytriton wheel fetched once) on 127.0.0.1 with a repository written by `trtfalcon serve
triton` for a random tiny checkpoint, and drives it with tritonclient's gRPC streaming client, each request on
its own stream, --streams of them at a time:

  load      --requests requests in a shuffled mix: prompts of 1..--max-prompt tokens and outputs of
            1..--max-output tokens; greedy and seeded sampling (temperature 0.8, top_p 0.95); mostly streamed, some
            one-response; some cancelled by the client after a few tokens; some clients killed mid-stream (child
            processes, SIGKILL: a dropped connection, nothing sent); and bad requests interleaved (wrong dtype,
            empty prompt, ids out of the vocab, max_tokens over the limit, an unknown request parameter, an unknown
            input).
  reload    once idle: the model is unloaded and loaded again, timed.
  after     a second, smaller wave (--requests-after) against the reloaded instance.

Every completed request's tokens (and every cancelled request's tokens so far, as a prefix) are compared with
`trtfalcon generate` run on the same checkpoint with the same sizing, prompt, sampling parameters and seed.
Counts: sent, completed, cancelled, disconnected, rejected with a clear error, failed, lost (no end within the
time limit, or not exactly one FINAL), mismatched; and the model's own metrics (trtfalcon_requests_ended_total by
outcome, pools free at the end) must agree with the client's counts. Latency: requests/s and output tokens/s of
the load wave, time to first token and per-token latency (the gap between streamed tokens) percentiles.

Writes bench/results/serve_load.json and .md. Exit status 1 if anything was lost, mismatched or unaccounted for.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtfalcon.bench.throughput import percentile
from trtfalcon.serve.client import StreamCall, request_arrays
from trtfalcon.serve.metrics import parse_prometheus, series

MODEL = "tiny"
SAMPLING = {"temperature": 0.8, "top_p": 0.95}
SAMPLED_SEED_BASE = 1000
WAIT_S = 300.0  # the most any one request may take before it counts as lost

# bad request kind -> (what it sends, a text its error must contain); "model": the model rejects it (counted in
# its metrics), "triton": Triton's own input checks reject it before the model sees it
BAD_KINDS: dict[str, tuple[str, str]] = {
    "wrong dtype": ("triton", "INT64"),
    "empty prompt": ("model", "expected at least 1 token, found an empty prompt"),
    "ids out of vocab": ("model", "expected token ids in [0, vocab_size=256)"),
    "max_tokens over the limit": ("model", "input 'max_tokens': expected at most"),
    "unknown parameter": ("model", "parameter 'max_new_tokens': expected no request parameters"),
    "unknown input": ("triton", "bogus_input"),
}

DISCONNECTING_CLIENT = r"""
import sys, time
from trtfalcon.serve.client import StreamCall
call = StreamCall(sys.argv[1], sys.argv[2], input_ids=[int(t) for t in sys.argv[3].split(",")],
                  max_tokens=int(sys.argv[4]), ignore_eos=True, stream=True).start()
deadline = time.monotonic() + 120
while len(call.chunks) < 2 and call.error is None and time.monotonic() < deadline:
    time.sleep(0.002)
print("streaming" if call.error is None and len(call.chunks) >= 2 else f"failed: {call.error}", flush=True)
time.sleep(600)
"""


@dataclass
class Job:
    index: int
    kind: str  # greedy | sampled | cancel | disconnect | bad
    prompt: list[int]
    max_tokens: int
    stream: bool = True
    seed: int | None = None
    bad: str | None = None  # a BAD_KINDS key
    cancel_after: int = 0
    # results
    outcome: str = "lost"  # completed | cancelled | disconnected | rejected | failed | lost
    detail: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    finals: int = 0


def make_jobs(n: int, rng: random.Random, max_prompt: int, max_output: int, max_seq_len: int, vocab: int,
              start: int, disconnects: int, with_faults: bool) -> list[Job]:
    jobs: list[Job] = []
    for i in range(n):
        plen = rng.randint(1, max_prompt)
        prompt = [rng.randrange(3, vocab) for _ in range(plen)]
        out = rng.randint(1, min(max_output, max_seq_len - plen))
        r = rng.random()
        if with_faults and i < disconnects:
            jobs.append(Job(start + i, "disconnect", prompt, max(out, 64)))
        elif with_faults and r < 0.08:
            jobs.append(Job(start + i, "bad", prompt, out, bad=list(BAD_KINDS)[i % len(BAD_KINDS)]))
        elif with_faults and r < 0.16:
            jobs.append(Job(start + i, "cancel", prompt, max(out, 48), cancel_after=rng.randint(1, 8)))
        elif r < 0.55:
            jobs.append(Job(start + i, "greedy", prompt, out, stream=rng.random() < 0.85))
        else:  # its seed is set once both waves exist (consecutive, for one generate run)
            jobs.append(Job(start + i, "sampled", prompt, out, stream=rng.random() < 0.85))
    rng.shuffle(jobs)  # bad requests, cancellations and disconnects interleaved with the rest
    return jobs


def bad_request(job: Job, max_seq_len: int, vocab: int) -> tuple[dict[str, np.ndarray], dict | None]:
    prompt = job.prompt
    if job.bad == "wrong dtype":
        return {"input_ids": np.asarray(prompt, np.int64), **request_arrays(max_tokens=job.max_tokens)}, None
    if job.bad == "empty prompt":
        return {"input_ids": np.zeros(0, np.int32), **request_arrays(max_tokens=job.max_tokens)}, None
    if job.bad == "ids out of vocab":
        return request_arrays(input_ids=prompt + [vocab + 7], max_tokens=job.max_tokens), None
    if job.bad == "max_tokens over the limit":
        return request_arrays(input_ids=prompt, max_tokens=max_seq_len - len(prompt) + 1), None
    if job.bad == "unknown parameter":
        return request_arrays(input_ids=prompt, max_tokens=job.max_tokens), {"max_new_tokens": job.max_tokens}
    assert job.bad == "unknown input"
    return {**request_arrays(input_ids=prompt, max_tokens=job.max_tokens), "bogus_input": np.ones(1, np.int32)}, None


def run_job(job: Job, url: str, max_seq_len: int, vocab: int) -> None:
    if job.kind == "disconnect":
        child = subprocess.Popen([sys.executable, "-c", DISCONNECTING_CLIENT, url, MODEL,
                                  ",".join(map(str, job.prompt)), str(job.max_tokens)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline().strip()
        finally:
            child.kill()  # SIGKILL: the connection drops without a word to the server
            child.wait(60)
        job.outcome, job.detail = ("disconnected", "") if line == "streaming" else ("failed", line)
        return
    parameters = None
    if job.kind == "bad":
        arrays, parameters = bad_request(job, max_seq_len, vocab)
    else:
        params = dict(SAMPLING, seed=job.seed) if job.kind == "sampled" else {}
        ignore_eos = job.kind == "cancel"  # long enough to be cancelled mid-stream
        arrays = request_arrays(input_ids=job.prompt, max_tokens=job.max_tokens, stream=job.stream,
                                ignore_eos=ignore_eos or None, **params)
    call = StreamCall(url, MODEL, request_id=f"r{job.index}", arrays=arrays, parameters=parameters).start()
    try:
        if job.cancel_after:
            deadline = time.monotonic() + WAIT_S
            while len(call.chunks) < job.cancel_after and not call.done.is_set() and time.monotonic() < deadline:
                time.sleep(0.001)
            if not call.done.is_set():
                call.cancel()
        ended = call.wait(WAIT_S)
        time.sleep(0.05)  # a response after the FINAL one (a bug) would arrive now
    finally:
        call.close()
    job.tokens, job.finals = call.token_ids, call.finals
    job.ttft_s, job.gaps_s = call.ttft_s, call.token_gaps_s
    job.finish_reason = call.finish_reason
    if not ended or call.finals != 1 or len(call.chunks) != call.chunks_at_end:
        job.outcome, job.detail = "lost", f"ended={ended} finals={call.finals}"
    elif job.kind == "bad":
        expected = BAD_KINDS[job.bad][1]
        job.outcome = "rejected" if call.error and expected in call.error else "failed"
        job.detail = call.error or "completed"
    elif job.kind == "cancel" and call.error is not None and "cancel" in call.error.lower():
        job.outcome = "cancelled"
    elif call.error is None and call.finish_reason in ("length", "stop"):
        job.outcome = "completed"
    else:
        job.outcome, job.detail = "failed", call.error or f"finish_reason={call.finish_reason!r}"


def run_wave(jobs: list[Job], url: str, streams: int, max_seq_len: int, vocab: int) -> float:
    todo: queue.Queue = queue.Queue()
    for j in jobs:
        todo.put(j)

    def worker() -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            try:
                run_job(job, url, max_seq_len, vocab)
            except Exception as e:  # noqa: BLE001 - a client-side failure is a result, not a crash
                job.outcome, job.detail = "failed", f"client: {type(e).__name__}: {e}"

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def server_counts(server) -> dict[str, float]:
    parsed = parse_prometheus(server.metrics())
    out = {o: series(parsed, "trtfalcon_requests_ended_total", model=MODEL, outcome=o)
           for o in ("completed", "cancelled", "rejected", "failed")}
    for name in ("requests_in_flight", "kv_blocks_free", "kv_blocks_total", "state_slots_free", "state_slots_total",
                 "generated_tokens_total"):
        out[name] = series(parsed, f"trtfalcon_{name}", model=MODEL)
    return out


def wait_idle(server, timeout_s: float = 120.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        s = server_counts(server)
        if s["requests_in_flight"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"] > 0 and \
                s["state_slots_free"] == s["state_slots_total"]:
            return s
        if time.monotonic() > deadline:
            return s  # reported as not idle
        time.sleep(0.1)


def reference(ckpt: Path, jobs: list[Job], sizing: list[str], work: Path) -> dict[int, list[int]]:
    """`trtfalcon generate` on the same prompts: one run for the greedy jobs, one for the cancelled ones (sent with
    ignore_eos), one for the sampled ones (generate seeds prompt i with --seed + i: the seeds the server got)."""
    cli = [sys.executable, "-c", "from trtfalcon.cli import main; main()", "generate", str(ckpt), "--json", *sizing]
    sampled = sorted((j for j in jobs if j.kind == "sampled"), key=lambda j: j.seed)
    assert [j.seed for j in sampled] == list(range(SAMPLED_SEED_BASE, SAMPLED_SEED_BASE + len(sampled)))
    groups = [("greedy", [j for j in jobs if j.kind == "greedy"], []),
              ("cancel", [j for j in jobs if j.kind == "cancel"], ["--ignore-eos"]),
              ("sampled", sampled, ["--temperature", str(SAMPLING["temperature"]), "--top-p", str(SAMPLING["top_p"]),
                                    "--seed", str(SAMPLED_SEED_BASE)])]
    out: dict[int, list[int]] = {}
    for name, group, flags in groups:
        if not group:
            continue
        f = work / f"{name}.jsonl"
        f.write_text("".join(json.dumps({"prompt_ids": j.prompt, "max_new_tokens": j.max_tokens}) + "\n"
                             for j in group))
        r = subprocess.run([*cli, "--prompts-file", str(f), *flags], capture_output=True, text=True, timeout=3600)
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        if r.returncode != 0 or len(lines) != len(group):
            raise RuntimeError(f"trtfalcon generate ({name}) failed: {r.stderr[-2000:]}")
        for j, line in zip(group, lines):
            out[j.index] = line["token_ids"]
    return out


def summarize(jobs: list[Job], ref: dict[int, list[int]], seconds: float) -> dict[str, Any]:
    counts = {k: sum(j.outcome == k for j in jobs) for k in
              ("completed", "cancelled", "disconnected", "rejected", "failed", "lost")}
    mismatched = [j for j in jobs if j.outcome == "completed" and j.tokens != ref.get(j.index)]
    mismatched += [j for j in jobs if j.outcome == "cancelled" and j.tokens != ref.get(j.index, [])[:len(j.tokens)]]
    streamed = [j for j in jobs if j.outcome == "completed" and j.stream]
    ttft = [j.ttft_s * 1e3 for j in streamed if j.ttft_s is not None]
    gaps = [g * 1e3 for j in streamed for g in j.gaps_s]
    tokens = sum(len(j.tokens) for j in jobs if j.outcome == "completed")
    pct = lambda v: {f"p{q}": round(percentile(v, q), 2) if v else None for q in (50, 90, 99)}  # noqa: E731
    return {
        "sent": len(jobs), **counts, "mismatched": len(mismatched),
        "by_kind": {k: sum(j.kind == k for j in jobs) for k in ("greedy", "sampled", "cancel", "disconnect", "bad")},
        "bad_by_kind": {b: sum(j.bad == b for j in jobs) for b in BAD_KINDS},
        "seconds": round(seconds, 2),
        "requests_per_s": round(counts["completed"] / seconds, 2),
        "output_tokens_per_s": round(tokens / seconds, 1),
        "ttft_ms": pct(ttft), "per_token_latency_ms": pct(gaps),
        "problems": [f"r{j.index} ({j.kind}{'/' + j.bad if j.bad else ''}): {j.outcome}: {j.detail[:300]}"
                     for j in jobs if j.outcome in ("failed", "lost")][:20]
        + [f"r{j.index} ({j.kind}): tokens differ from trtfalcon generate" for j in mismatched][:20],
    }


def server_agrees(jobs: list[Job], before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The model's own count of how requests ended, against the client's."""
    d = {k: after[k] - before[k] for k in ("completed", "cancelled", "rejected", "failed")}
    expect = {
        "completed": sum(j.outcome == "completed" for j in jobs),
        "cancelled": sum(j.outcome in ("cancelled", "disconnected") for j in jobs),
        "rejected": sum(j.outcome == "rejected" and BAD_KINDS[j.bad][0] == "model" for j in jobs),
        "failed": 0,
    }
    idle = after["requests_in_flight"] == 0 and after["kv_blocks_free"] == after["kv_blocks_total"] and \
        after["state_slots_free"] == after["state_slots_total"]
    return {"server_ended": d, "client_expects": expect, "agree": d == expect, "idle_after": idle,
            "pools_after": {k: after[k] for k in ("kv_blocks_free", "kv_blocks_total", "state_slots_free",
                                                  "state_slots_total", "requests_in_flight")}}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Load and faults against a real tritonserver ({result['server']})", "",
             f"Command: `{result['command']}`", "", f"Model: {result['model']}; sizing: `{result['sizing']}`; "
             f"{result['machine']}.", ""]
    for phase in ("load", "after_reload"):
        r = result[phase]
        lines += [f"## {phase.replace('_', ' ')}: {r['sent']} requests, {result['streams']} concurrent streams", "",
                  "| sent | completed | cancelled | disconnected | rejected | failed | lost | mismatched |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {r['sent']} | {r['completed']} | {r['cancelled']} | {r['disconnected']} | {r['rejected']} | "
                  f"{r['failed']} | {r['lost']} | {r['mismatched']} |", "",
                  f"- {r['requests_per_s']} requests/s, {r['output_tokens_per_s']} output tokens/s over "
                  f"{r['seconds']} s",
                  f"- time to first token (ms): p50 {r['ttft_ms']['p50']}, p90 {r['ttft_ms']['p90']}, "
                  f"p99 {r['ttft_ms']['p99']}",
                  f"- per-token latency (ms): p50 {r['per_token_latency_ms']['p50']}, "
                  f"p90 {r['per_token_latency_ms']['p90']}, p99 {r['per_token_latency_ms']['p99']}",
                  f"- server-side ended counts {r['server']['server_ended']} "
                  f"{'agree with' if r['server']['agree'] else 'DIFFER from'} the client's "
                  f"{r['server']['client_expects']}; idle with every pool free afterwards: "
                  f"{r['server']['idle_after']}", ""]
        if r["problems"]:
            lines += ["Problems:", *(f"- {p}" for p in r["problems"]), ""]
    lines += [f"Unload + reload while idle: {result['reload_s']} s.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64, help="Concurrent gRPC streams (one request each at a time).")
    ap.add_argument("--requests", type=int, default=512, help="Requests in the load wave.")
    ap.add_argument("--requests-after", type=int, default=128, help="Requests after the reload.")
    ap.add_argument("--disconnects", type=int, default=8, help="Clients killed mid-stream in the load wave.")
    ap.add_argument("--max-prompt", type=int, default=96)
    ap.add_argument("--max-output", type=int, default=96)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-num-tokens", type=int, default=512)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tritonserver", help="tritonserver binary or unpacked nvidia-pytriton wheel [default: found, "
                                           "else fetched]")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    args = ap.parse_args()

    from trtfalcon.checkpoint.synth import synth_checkpoint
    from trtfalcon.config import preset_dict
    from trtfalcon.errors import MissingDependencyError
    from trtfalcon.serve.server import TritonServer, fetch_pytriton_server, find_tritonserver

    try:
        install = find_tritonserver(args.tritonserver)
    except MissingDependencyError:
        install = fetch_pytriton_server()
    sizing = [f"--max-batch-size={args.max_batch_size}", f"--max-num-tokens={args.max_num_tokens}",
              f"--max-seq-len={args.max_seq_len}"]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = preset_dict("tiny")
        ckpt = synth_checkpoint(cfg, work / "ckpt", dtype="fp32", seed=args.seed)
        vocab = cfg["vocab_size"]
        subprocess.run([sys.executable, "-c", "from trtfalcon.cli import main; main()", "serve", "triton",
                        "--checkpoint", str(ckpt), "--out", str(work / "repo"), "--model-name", MODEL, *sizing],
                       check=True, capture_output=True, timeout=600)
        load = make_jobs(args.requests, rng, args.max_prompt, args.max_output, args.max_seq_len, vocab, 0,
                         args.disconnects, with_faults=True)
        after = make_jobs(args.requests_after, rng, args.max_prompt, args.max_output, args.max_seq_len, vocab,
                          args.requests, 0, with_faults=False)
        # the sampled seeds must run consecutively across both waves for one generate run
        for k, j in enumerate(sorted((j for j in load + after if j.kind == "sampled"), key=lambda j: j.index)):
            j.seed = SAMPLED_SEED_BASE + k
        with TritonServer(work / "repo", install=install, model_control="explicit", announce=print) as server:
            print(f"tritonserver ready ({install.origin}); load wave: {len(load)} requests, {args.streams} streams")
            s0 = wait_idle(server)
            load_s = run_wave(load, server.grpc_url, args.streams, args.max_seq_len, vocab)
            s1 = wait_idle(server)
            t = time.perf_counter()
            server.unload_model(MODEL)
            server.load_model(MODEL)
            reload_s = time.perf_counter() - t
            print(f"unloaded and reloaded in {reload_s:.1f} s; second wave: {len(after)} requests")
            s2 = wait_idle(server)
            after_s = run_wave(after, server.grpc_url, args.streams, args.max_seq_len, vocab)
            s3 = wait_idle(server)
        print("reference: trtfalcon generate ...")
        ref = reference(ckpt, load + after, sizing, work)
    result = {
        "server": f"tritonserver from {install.origin}",
        "command": "python bench/serve_load.py " + " ".join(sys.argv[1:]),
        "model": "tiny preset (random weights, fp32), torch backend on CPU, one instance",
        "machine": f"{os.cpu_count()} CPU cores, shared with other work (client, server and reference on one machine)",
        "sizing": " ".join(sizing), "streams": args.streams,
        "load": {**summarize(load, ref, load_s), "server": server_agrees(load, s0, s1)},
        "after_reload": {**summarize(after, ref, after_s), "server": server_agrees(after, s2, s3)},
        "reload_s": round(reload_s, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    bad = any(result[p][k] for p in ("load", "after_reload") for k in ("lost", "mismatched", "failed")) or \
        not all(result[p]["server"]["agree"] and result[p]["server"]["idle_after"] for p in ("load", "after_reload"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
