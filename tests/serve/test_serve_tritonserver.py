"""End to end against a REAL Triton Inference Server (the `triton` fixture: tritonserver from the nvidia-pytriton
wheel, started once per session on 127.0.0.1) serving repositories written by `trtfalcon serve triton`, driven
with tritonclient's gRPC streaming client and Triton's HTTP generate endpoint.

Observed from outside only: tokens and responses on the wire, Triton's FINAL flags, error messages and HTTP
status codes, and the model's own series on the metrics port (KV blocks and state slots free, requests in flight,
how requests ended). Each test leaves the server idle, with every pool free, for the next.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from serve_helpers import SERVER_RUNTIME, cli_generate, sizing_args, word

from trtfalcon.serve.client import RequestFailed, StreamCall, http_generate
from trtfalcon.serve.metrics import parse_prometheus, series

pytestmark = pytest.mark.slow

PROMPTS = [([1, 2, 3], 9), ([7] * 20, 5), ([40, 41], 12), (list(range(3, 40)), 6), ([200, 100, 50, 25], 8),
           ([9, 8], 1)]


def generate(ckpt, prompts, *extra):
    return cli_generate(ckpt, prompts, *extra, runtime=SERVER_RUNTIME)


def start(server, model: str, rid: str = "", **inputs) -> StreamCall:
    return StreamCall(server.grpc_url, model, request_id=rid or None, **inputs).start()


def finish(*calls: StreamCall, timeout_s: float = 120.0) -> None:
    """Every request ended, exactly once (one response flagged FINAL, or one error), and nothing came after."""
    for c in calls:
        assert c.wait(timeout_s), f"request {c.request_id!r} never ended"
    time.sleep(0.2)  # a second FINAL or a late response (bugs) would arrive now
    for c in calls:
        assert c.finals == 1, (c.request_id, c.finals)
        assert len(c.chunks) == c.chunks_at_end, (c.request_id, "responses after the FINAL one")


def close(*calls: StreamCall) -> None:
    for c in calls:
        c.close()


def stats(server, model: str) -> dict[str, float]:
    parsed = parse_prometheus(server.metrics())
    out = {name: series(parsed, name, model=model) for name in (
        "trtfalcon_requests_in_flight", "trtfalcon_kv_blocks_free", "trtfalcon_kv_blocks_total",
        "trtfalcon_state_slots_free", "trtfalcon_state_slots_total", "trtfalcon_generated_tokens_total")}
    for outcome in ("completed", "cancelled", "rejected", "failed"):
        out[outcome] = series(parsed, "trtfalcon_requests_ended_total", model=model, outcome=outcome)
    return out


def wait_for(server, model: str, check, timeout_s: float = 60.0) -> dict[str, float]:
    """Poll the metrics until check(stats) holds (bounded); return the stats that satisfied it."""
    import inspect

    deadline = time.monotonic() + timeout_s
    while True:
        s = stats(server, model)
        if check(s):
            return s
        assert time.monotonic() < deadline, \
            f"{model}: metrics never satisfied {inspect.getsource(check).strip()!r} in {timeout_s:.0f} s: {s}"
        time.sleep(0.05)


def idle(s: dict[str, float]) -> bool:
    """Nothing in flight and every KV block and state slot free."""
    return (s["trtfalcon_requests_in_flight"] == 0 and s["trtfalcon_kv_blocks_total"] > 0
            and s["trtfalcon_kv_blocks_free"] == s["trtfalcon_kv_blocks_total"]
            and s["trtfalcon_state_slots_free"] == s["trtfalcon_state_slots_total"])


def test_streams_the_same_tokens_as_generate(triton, ids_ckpt):
    """Six greedy requests (more than max_batch_size=4) streamed concurrently, and the same six non-streamed: each
    streams one token per response and ends with exactly one FINAL; all give `trtfalcon generate`'s tokens."""
    want = generate(ids_ckpt, PROMPTS)
    before = stats(triton, "ids")
    streamed = [start(triton, "ids", f"s{i}", input_ids=p, max_tokens=n, stream=True) for i, (p, n) in
                enumerate(PROMPTS)]
    whole = [start(triton, "ids", f"w{i}", input_ids=p, max_tokens=n) for i, (p, n) in enumerate(PROMPTS)]
    try:
        finish(*streamed, *whole)
    finally:
        close(*streamed, *whole)
    for s, w, ref in zip(streamed, whole, want):
        assert s.error is None and w.error is None, (s.error, w.error)
        assert s.token_ids == w.token_ids == ref["token_ids"]
        assert [len(c["output_ids"]) for c in s.chunks] == [1] * len(ref["token_ids"])  # token by token
        assert [c["finish_reason"] for c in s.chunks] == [""] * (len(s.chunks) - 1) + [ref["finish_reason"]]
        assert [c["completion_tokens"] for c in s.chunks] == list(range(1, len(ref["token_ids"]) + 1))
        assert len(w.chunks) == 1 and w.chunks[0]["prompt_tokens"] == len(ref["prompt_ids"])
    after = wait_for(triton, "ids", idle)
    assert after["completed"] - before["completed"] == 2 * len(PROMPTS)
    assert after["trtfalcon_generated_tokens_total"] - before["trtfalcon_generated_tokens_total"] == \
        2 * sum(len(r["token_ids"]) for r in want)


def test_seeded_sampling_and_logprobs_match_generate(triton, ids_ckpt):
    """A seeded sampled request gives generate's tokens and log-probs whatever shares its batches."""
    [want] = generate(ids_ckpt, [([5, 6, 7], 10)], "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9",
                      "--seed", "1234", "--logprobs", "3")
    noise = [start(triton, "ids", input_ids=[11, 12, 13], max_tokens=10, temperature=1.0, seed=i, stream=True)
             for i in range(3)]
    r = start(triton, "ids", "sampled", input_ids=[5, 6, 7], max_tokens=10, temperature=0.9, top_k=40, top_p=0.9,
              seed=1234, logprobs=3, stream=True)
    try:
        finish(r, *noise)
    finally:
        close(r, *noise)
    assert r.token_ids == want["token_ids"]
    got_lp = [x for c in r.chunks for x in c["output_logprobs"]]
    got_top = [row for c in r.chunks for row in c["top_ids"]]
    np.testing.assert_allclose(got_lp, [x["logprob"] for x in want["logprobs"]], rtol=1e-5, atol=1e-6)
    assert got_top == [x["top_ids"] for x in want["logprobs"]]


def test_text_over_grpc_and_the_generate_endpoint(triton, text_ckpt):
    """text_input is tokenized in the model; text_output streams the detokenized tokens; the generate endpoint
    (HTTP, one response) gives the same; a stop word ends the text before it with reason 'stop'."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(text_ckpt), local_files_only=True)
    prompt = "w5 w17 w200 w33"
    ids = tok.encode(prompt)
    [want] = generate(text_ckpt, [(ids, 12)], "--ignore-eos")
    s = start(triton, "text", text=prompt, max_tokens=12, ignore_eos=True, stream=True)
    gen = want["token_ids"]
    stop = f"{word(gen[3])} {word(gen[4])}"  # spans two tokens
    stopped = start(triton, "text", text=prompt, max_tokens=12, ignore_eos=True, stream=True,
                    stop_words=[stop, "never-generated"])
    try:
        finish(s, stopped)
    finally:
        close(s, stopped)
    whole = http_generate(triton.http_url, "text", text=prompt, max_tokens=12, ignore_eos=True)
    expected = tok.decode(ids + gen, skip_special_tokens=True)[len(tok.decode(ids)):]
    assert s.token_ids == whole["output_ids"] == gen
    assert s.text == whole["text_output"] == expected and expected.startswith(" ")
    assert whole["finish_reason"] == "length" and whole["prompt_tokens"] == 4 and whole["completion_tokens"] == 12
    assert stopped.token_ids == gen[:5] and stopped.finish_reason == "stop"
    full = " " + " ".join(word(t) for t in gen[:5])
    assert stopped.text == full[:full.index(stop)]
    wait_for(triton, "text", idle)  # the stop word's request was cancelled in the engine: its cache is free


# (model, inputs as arrays or keyword values, request parameters, text the error must contain): the model's checks
BAD = [
    ("ids", {}, None, "input 'input_ids': expected a prompt, found none"),
    ("ids", {"input_ids": np.array([], np.int32)}, None, "input 'input_ids': expected at least 1 token, found an empty prompt"),
    ("ids", {"input_ids": [1, 256]}, None, "input 'input_ids': expected token ids in [0, vocab_size=256), found 256 at position 1"),
    ("ids", {"input_ids": [-3]}, None, "expected token ids in [0, vocab_size=256), found -3 at position 0"),
    ("ids", {"input_ids": list(range(3, 253)) * 2}, None, "input 'input_ids': expected a prompt of at most 255 tokens"),
    ("ids", {"input_ids": list(range(3, 40)), "max_tokens": 230}, None,
     "input 'max_tokens': expected at most 219 (max_seq_len=256 - prompt of 37 tokens), found 230"),
    ("ids", {"input_ids": [1, 2], "max_tokens": 0}, None, "input 'max_tokens': expected an integer >= 1, found 0"),
    ("ids", {"input_ids": [1, 2], "temperature": float("nan")}, None, "input 'temperature': expected a finite number >= 0"),
    ("ids", {"input_ids": [1, 2], "top_p": 0.0}, None, "input 'top_p': expected a number in (0, 1]"),
    ("ids", {"input_ids": [1, 2], "top_k": 257}, None, "input 'top_k': expected an integer in [0, vocab_size=256]"),
    ("ids", {"input_ids": [1, 2], "seed": -1}, None, "input 'seed': expected an integer >= 0, found -1"),
    ("ids", {"input_ids": [1, 2], "logprobs": 21}, None, "input 'logprobs': expected an integer in [0, 20]"),
    ("ids", {"input_ids": [1, 2], "stop_token_ids": list(range(65))}, None,
     "input 'stop_token_ids': expected at most 64 ids, found 65"),
    ("ids", {"input_ids": [1, 2]}, {"max_new_tokens": 5}, "parameter 'max_new_tokens': expected no request parameters"),
    ("ids", {"input_ids": [1, 2], "max_tokens": 0, "temperature": -2.0, "top_p": 1.5}, None,
     "input 'max_tokens': expected an integer >= 1, found 0; input 'temperature'"),
    ("text", {"input_ids": [1, 2], "text": "w3"}, None, "inputs 'text_input' and 'input_ids': expected one of them, found both"),
    ("text", {"text_input": np.array([b"\xff\xfe"], dtype=object)}, None, "input 'text_input': expected UTF-8 text"),
    ("text", {"text": ""}, None, "input 'text_input': expected non-empty text"),
    ("text", {"text": "w3", "stop_words": [""]}, None,
     "input 'stop_words': expected words of 1 to 256 characters, found 0 characters at position 0"),
]
# rejected by Triton itself before the model sees them: a dtype, a rank or an input its config does not declare
# (the model's own checks of these are reachable only through the stand-in: test_serve_model.py)
TRITON_REJECTS = [
    ("ids", {"input_ids": np.array([1, 2], np.int64)}, None, "input_ids"),
    ("ids", {"input_ids": np.array([[1, 2]], np.int32)}, None, "input_ids"),
    ("ids", {"input_ids": [1, 2], "text_input": "w3"}, None, "text_input"),
]


def _bad_call(server, i: int, model: str, inputs: dict, parameters) -> StreamCall:
    from trtfalcon.serve.client import request_arrays

    arrays = {k: v for k, v in inputs.items() if isinstance(v, np.ndarray)}
    values = {k: v for k, v in inputs.items() if not isinstance(v, np.ndarray)}
    arrays = {**request_arrays(**values), **arrays}
    return StreamCall(server.grpc_url, model, request_id=f"bad{i}", arrays=arrays, parameters=parameters).start()


def test_n_samples_with_a_deepconf_threshold_match_the_engine(triton, ids_ckpt):
    """One request with n = 4 and a DeepConf threshold that stops some samples, streamed and not (and once without
    return_confidences): per sample_index, the tokens, finish reasons ('confidence' for the stopped ones),
    per-token confidences and lowest group confidences equal the in-process engine's for the same seeds; each
    Triton request ends with exactly one FINAL; bad DeepConf inputs are rejected naming the input; the generate
    endpoint carries the stats too; the pools are all free afterwards."""
    from trtfalcon.runtime.llm import LLMEngine
    from trtfalcon.runtime.options import RuntimeOptions
    from trtfalcon.runtime.request import ConfidenceParams, Request, SamplingParams

    prompt, window, n = [5, 6, 7], 4, 4

    def engine_run(threshold):
        engine = LLMEngine.from_options("torch", ids_ckpt, RuntimeOptions(**SERVER_RUNTIME))
        return engine.generate([Request("r", prompt, SamplingParams(
            max_new_tokens=20, temperature=1.0, seed=7, n=n, confidence=ConfidenceParams(20, window, threshold)))])

    lows = sorted(o.lowest_group_confidence for o in engine_run(None))
    threshold = (lows[1] + lows[2]) / 2  # the two least confident samples fall below it
    want = engine_run(threshold)
    assert sorted(o.finish_reason for o in want) == ["confidence", "confidence", "length", "length"]

    before = stats(triton, "ids")
    inputs = dict(input_ids=prompt, max_tokens=20, temperature=1.0, seed=7, n=n, confidence_window=window,
                  confidence_threshold=threshold)
    streamed = start(triton, "ids", "deepconf-stream", **inputs, return_confidences=True, stream=True)
    whole = start(triton, "ids", "deepconf-whole", **inputs, return_confidences=True)
    bare = start(triton, "ids", "deepconf-no-confidences", **inputs)
    bad = start(triton, "ids", "deepconf-bad", input_ids=prompt, n=0, confidence_window=0, confidence_top_k=999)
    try:
        finish(streamed, whole, bare, bad)
    finally:
        close(streamed, whole, bare, bad)
    for call in (streamed, whole, bare):
        assert call.error is None, call.error
        got = call.samples()
        assert sorted(got) == list(range(n))
        for k, o in enumerate(want):
            assert (got[k]["token_ids"], got[k]["finish_reason"]) == (o.token_ids, o.finish_reason), (call, k)
            assert got[k]["lowest_group_confidence"] == pytest.approx(o.lowest_group_confidence, abs=1e-9)
            if call is bare:
                assert "confidences" not in got[k]
            else:
                np.testing.assert_allclose(got[k]["confidences"], o.confidences, rtol=0, atol=1e-6)
    assert len(whole.chunks) == n and all(len(c["output_ids"]) == 1 for c in streamed.chunks)
    assert streamed.chunks_at_end == len(streamed.chunks)  # FINAL on the last sample's last token
    for name in ("input 'n'", "input 'confidence_window'", "input 'confidence_top_k'"):
        assert bad.error is not None and name in bad.error, bad.error

    one = http_generate(triton.http_url, "ids", input_ids=prompt, max_tokens=20, temperature=1.0, seed=9,
                        confidence_window=window, return_confidences=True)
    assert len(one["confidences"]) == len(one["output_ids"]) and one["sample_index"] == 0
    assert one["lowest_group_confidence"] == pytest.approx(min(
        np.convolve(one["confidences"], np.ones(window) / window, "valid")), abs=1e-5)
    after = wait_for(triton, "ids", lambda s: idle(s) and s["completed"] - before["completed"] >= 4)
    assert after["completed"] - before["completed"] == 4  # a Triton request each, whatever its n
    assert after["rejected"] - before["rejected"] == 1


def test_bad_requests_are_rejected_while_good_ones_complete(triton, ids_ckpt):
    """Bad requests interleaved with good ones: each bad one ends with exactly one error naming the problem (the
    model's INVALID_ARG, or Triton's own check), the good ones complete with generate's tokens, and the generate
    endpoint answers the model's rejections with HTTP 400 (= INVALID_ARG); then it keeps serving."""
    want = generate(ids_ckpt, PROMPTS[:3])
    before = stats(triton, "ids"), stats(triton, "text")
    calls, good = [], []
    for i, (model, inputs, parameters, _) in enumerate(BAD + TRITON_REJECTS):
        calls.append(_bad_call(triton, i, model, inputs, parameters))
        p, n = PROMPTS[i % 3]
        good.append(start(triton, "ids", f"good{i}", input_ids=p, max_tokens=n, stream=i % 2 == 0))
    try:
        finish(*calls, *good)
    finally:
        close(*calls, *good)
    for c, (_, _, _, message) in zip(calls, BAD + TRITON_REJECTS):
        assert c.error is not None and message in c.error and c.chunks == [], (c.request_id, c.error)
    for c in calls[:len(BAD)]:  # the model's own errors name the model and the request
        assert c.error.startswith(f"{c.model}: request '{c.request_id}': "), c.error
    for i, g in enumerate(good):
        assert g.error is None and g.token_ids == want[i % 3]["token_ids"]
    for k, model in enumerate(("ids", "text")):
        n = sum(b[0] == model for b in BAD)  # Triton's own rejections never reach the model
        after = wait_for(triton, model, lambda s: idle(s) and s["rejected"] - before[k]["rejected"] >= n)
        assert after["rejected"] - before[k]["rejected"] == n
    for body, message in [({"input_ids": [1, 256], "max_tokens": 2}, "found 256 at position 1"),
                          ({"input_ids": list(range(3, 40)), "max_tokens": 230}, "expected at most 219"),
                          ({"input_ids": [1, 2], "max_new_tokens": 4}, "parameter 'max_new_tokens'")]:
        status, text = _post_generate(triton, "ids", body)
        assert status == 400 and message in text, (status, text)
    with pytest.raises(RequestFailed, match="HTTP 400") as e:
        http_generate(triton.http_url, "ids", input_ids=[], max_tokens=2)
    assert e.value.status == 400 and "found an empty prompt" in str(e.value)
    assert http_generate(triton.http_url, "ids", input_ids=PROMPTS[0][0], max_tokens=PROMPTS[0][1])["output_ids"] \
        == want[0]["token_ids"]


def _post_generate(server, model: str, body: dict) -> tuple[int, str]:
    """A raw generate-endpoint request (any JSON body, e.g. a field that names no input, which Triton passes on as
    a request parameter): (HTTP status, body)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/generate",
                                 data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_cancellation_frees_the_requests_blocks_and_slot(triton, ids_ckpt):
    """A request cancelled mid-stream, and one cancelled while queued behind a full batch: the server's metrics
    show their KV blocks and state slots returned and each counted as cancelled; the others complete unchanged."""
    [want] = generate(ids_ckpt, [([3, 4, 5], 240)], "--ignore-eos")
    before = wait_for(triton, "ids", idle)
    victim = start(triton, "ids", "victim", input_ids=[9, 9, 9], max_tokens=240, ignore_eos=True, stream=True)
    calls = [victim]
    try:
        deadline = time.monotonic() + 60
        while len(victim.chunks) < 3:
            assert time.monotonic() < deadline and victim.error is None, victim.error
            time.sleep(0.005)
        busy = wait_for(triton, "ids", lambda s: s["trtfalcon_requests_in_flight"] == 1)
        assert busy["trtfalcon_kv_blocks_free"] < before["trtfalcon_kv_blocks_free"]
        assert busy["trtfalcon_state_slots_free"] == before["trtfalcon_state_slots_free"] - 1
        victim.cancel()
        after = wait_for(triton, "ids", lambda s: idle(s) and s["cancelled"] > before["cancelled"])
        assert after["cancelled"] - before["cancelled"] == 1 and after["completed"] == before["completed"]
        assert 3 <= len(victim.token_ids) < 240 and victim.finish_reason is None
        assert after["trtfalcon_generated_tokens_total"] - before["trtfalcon_generated_tokens_total"] < 240

        # queued: max_batch_size long requests take every state slot; the next one waits, and is cancelled there
        full = [start(triton, "ids", f"busy{i}", input_ids=[3, 4, 5], max_tokens=240, ignore_eos=True, stream=True)
                for i in range(SERVER_RUNTIME["max_batch_size"])]
        calls += full
        wait_for(triton, "ids", lambda s: s["trtfalcon_state_slots_free"] == 0)
        queued = start(triton, "ids", "queued", input_ids=[1, 2], max_tokens=20, stream=True)
        calls.append(queued)
        wait_for(triton, "ids", lambda s: s["trtfalcon_requests_in_flight"] >= len(full) + 1)
        assert all(len(r.token_ids) < 240 for r in full)  # still running: the queued one cannot have started
        queued.cancel()
        finish(*full)
    finally:
        close(*calls)
    assert queued.token_ids == []
    for r in full:
        assert r.token_ids == want["token_ids"]
    end = wait_for(triton, "ids", lambda s: idle(s) and s["cancelled"] - after["cancelled"] == 1)
    assert end["completed"] - after["completed"] == len(full)


CLIENT = r"""
import sys
from trtfalcon.serve.client import StreamCall
call = StreamCall(sys.argv[1], "ids", input_ids=[5, 6, 7], max_tokens=240, ignore_eos=True, stream=True).start()
import time
deadline = time.monotonic() + 120
while len(call.chunks) < 3 and time.monotonic() < deadline:
    time.sleep(0.005)
print("streaming", flush=True)
time.sleep(120)
"""


def test_a_disconnected_client_frees_its_request(triton):
    """A client process killed mid-stream (its TCP connection dropped, nothing sent): Triton cancels its request,
    the engine frees its cache, and the server keeps serving."""
    before = wait_for(triton, "ids", idle)
    child = subprocess.Popen([sys.executable, "-c", CLIENT, triton.grpc_url], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "streaming"
    finally:
        child.kill()
        child.wait(30)
    after = wait_for(triton, "ids", lambda s: idle(s) and s["cancelled"] > before["cancelled"])
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["trtfalcon_generated_tokens_total"] - before["trtfalcon_generated_tokens_total"] < 240
    assert len(http_generate(triton.http_url, "ids", input_ids=[3, 4], max_tokens=3)["output_ids"]) == 3


def test_unload_and_reload_while_idle(triton, ids_ckpt):
    """Unloading the idle model ends its instance (requests for it are refused by Triton); loading it again
    brings a fresh instance that serves generate's tokens, with every pool free."""
    [want] = generate(ids_ckpt, [PROMPTS[2]])
    wait_for(triton, "ids", idle)
    triton.unload_model("ids")
    assert not triton.model_ready("ids")
    with pytest.raises(RequestFailed):
        http_generate(triton.http_url, "ids", input_ids=[1, 2], max_tokens=2)
    assert http_generate(triton.http_url, "text", input_ids=[1, 2], max_tokens=2)["completion_tokens"] == 2
    triton.load_model("ids")
    assert triton.model_ready("ids")
    s = start(triton, "ids", input_ids=PROMPTS[2][0], max_tokens=PROMPTS[2][1], stream=True)
    try:
        finish(s)
    finally:
        close(s)
    assert s.token_ids == want["token_ids"]
    fresh = wait_for(triton, "ids", idle)
    assert fresh["completed"] == 1  # a new instance: its counters start again


def test_cli_launch_serves_until_interrupted(triton_install, ids_ckpt, tmp_path):
    """`trtfalcon serve triton --launch` writes the repository, starts tritonserver on it (here on free loopback
    ports), serves, and on Ctrl-C stops the server and exits 0."""
    import re
    import signal
    import threading

    cmd = [sys.executable, "-c", "from trtfalcon.cli import main; main()", "serve", "triton",
           "--checkpoint", str(ids_ckpt), "--out", str(tmp_path / "repo"), *sizing_args(SERVER_RUNTIME), "--launch",
           "--tritonserver", str(triton_install.binary), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("gRPC" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        ports = re.search(r"gRPC 127\.0\.0\.1:(\d+)\s+HTTP 127\.0\.0\.1:(\d+)", "".join(lines))
        assert ports, "".join(lines)
        http = f"127.0.0.1:{ports.group(2)}"
        assert http_generate(http, "trtfalcon", input_ids=[3, 4], max_tokens=3)["completion_tokens"] == 3
        call = StreamCall(f"127.0.0.1:{ports.group(1)}", "trtfalcon", input_ids=[3, 4], max_tokens=3,
                          stream=True).start()
        finish(call)
        call.close()
        assert len(call.token_ids) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
    reader.join(10)
    assert code == 0, "".join(lines)
    with pytest.raises(OSError):  # nothing listens there any more
        http_generate(http, "trtfalcon", input_ids=[3, 4], max_tokens=3, timeout_s=5)
