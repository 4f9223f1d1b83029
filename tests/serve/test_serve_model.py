"""The generated model.py driven in-process through the pb_utils STAND-IN (not Triton): the same tokens as
`trtfalcon generate`, every request ended exactly once, cancellation, bad requests answered alone."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pb_utils_stand_in import InferenceRequest, TritonError
from serve_helpers import F32, I32, RUNTIME, cli_generate, error, finish, load_model_py, req, tokens, word

from trtfalcon.serve.repository import write_repository


PROMPTS = [([1, 2, 3], 9), ([7] * 20, 5), ([40, 41], 12), (list(range(3, 40)), 6), ([200, 100, 50, 25], 8),
           ([9, 8], 1)]


def test_streams_the_same_tokens_as_generate(ids_model, ids_ckpt):
    """Six greedy requests, more than max_batch_size=4, in two execute() calls (the second while the first run):
    streamed one token per response, and the same tokens again non-streamed, as `trtfalcon generate` gives."""
    want = cli_generate(ids_ckpt, PROMPTS)
    streamed = [req(p, rid=f"s{i}", max_tokens=n, stream=True) for i, (p, n) in enumerate(PROMPTS)]
    whole = [req(p, rid=f"w{i}", max_tokens=n) for i, (p, n) in enumerate(PROMPTS)]
    ids_model.execute(streamed[:3] + whole[:3])
    ids_model.execute(streamed[3:] + whole[3:])
    finish(*streamed, *whole)
    for s, w, ref in zip(streamed, whole, want):
        assert tokens(s) == tokens(w) == ref["token_ids"]
        assert all(len(resp.outputs()["output_ids"]) == 1 for resp in s.sender.responses)  # token by token
        reasons = [resp.outputs()["finish_reason"][0].decode() for resp in s.sender.responses]
        assert reasons == [""] * (len(reasons) - 1) + [ref["finish_reason"]]
        last = w.sender.responses[-1].outputs()
        assert len(w.sender.responses) == 1
        assert last["prompt_tokens"].tolist() == [len(ref["prompt_ids"])]
        assert last["completion_tokens"].tolist() == [len(ref["token_ids"])]
        assert [r.outputs()["completion_tokens"][0] for r in s.sender.responses] == \
            list(range(1, len(ref["token_ids"]) + 1))


def test_sampling_and_logprobs_match_generate(ids_model, ids_ckpt):
    """A seeded sampled request gives generate's tokens whatever shares its batches; logprobs match too."""
    [want] = cli_generate(ids_ckpt, [([5, 6, 7], 10)], "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9",
                          "--seed", "1234", "--logprobs", "3")
    noise = [req([11, 12, 13], max_tokens=10, temperature=1.0, seed=i, stream=True) for i in range(3)]
    r = req([5, 6, 7], max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=1234, logprobs=3, stream=True)
    ids_model.execute(noise[:2] + [r] + noise[2:])
    finish(r, *noise)
    assert tokens(r) == want["token_ids"]
    got_lp = np.concatenate([resp.outputs()["output_logprobs"] for resp in r.sender.responses])
    got_top = np.concatenate([resp.outputs()["top_ids"] for resp in r.sender.responses])
    np.testing.assert_allclose(got_lp, [x["logprob"] for x in want["logprobs"]], rtol=1e-5, atol=1e-6)
    assert got_top.tolist() == [x["top_ids"] for x in want["logprobs"]]


def test_cancellation_mid_stream(ids_model, ids_ckpt):
    """A cancelled request ends at once with CANCELLED (its blocks and slot freed); its neighbours are unaffected."""
    engine = ids_model.model.engine
    free_before = engine.scheduler.blocks.num_free
    [want] = cli_generate(ids_ckpt, [([3, 4, 5], 30)], "--ignore-eos")
    victim = req([9, 9, 9], rid="victim", max_tokens=50, ignore_eos=True, stream=True)
    other = req([3, 4, 5], rid="other", max_tokens=30, ignore_eos=True, stream=True)
    ids_model.execute([victim, other])
    deadline = time.monotonic() + 30
    while len(victim.sender.responses) < 3 and time.monotonic() < deadline:
        time.sleep(0.002)
    victim.sender.cancelled = True
    finish(victim, other)
    *streamed, last = victim.sender.responses
    assert 3 <= len(streamed) < 50 and all(not s.has_error() for s in streamed)
    assert last.has_error() and last.error().code() == TritonError.CANCELLED and "cancelled" in last.error().message()
    assert tokens(other) == want["token_ids"]
    deadline = time.monotonic() + 5
    while engine.scheduler.blocks.num_free != free_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.blocks.num_free == free_before and not engine.scheduler.live


def test_cancelled_before_it_starts(ids_model):
    """Cancelled while still queued behind a full batch: ends with CANCELLED, never a token."""
    busy = [req([3 + i] * 5, max_tokens=20, ignore_eos=True, stream=True) for i in range(RUNTIME["max_batch_size"])]
    late = req([1, 2], rid="late", max_tokens=20, stream=True)
    late.sender.cancelled = True
    ids_model.execute(busy + [late])
    finish(late, *busy)
    assert error(late)[0] == TritonError.CANCELLED


BAD = [
    ({}, "input 'input_ids': expected a prompt, found none"),
    ({"input_ids": np.array([1.0, 2.0], dtype=F32)}, "input 'input_ids': expected TYPE_INT32 (int32), found dtype float32"),
    ({"input_ids": np.array([[1, 2]], dtype=I32)}, "input 'input_ids': expected a 1-D tensor (dims [-1]), found shape [1, 2]"),
    ({"input_ids": np.array([], dtype=I32)}, "input 'input_ids': expected at least 1 token, found an empty prompt"),
    ({"input_ids": np.array([1, 256], dtype=I32)}, "expected token ids in [0, vocab_size=256), found 256 at position 1"),
    ({"input_ids": np.array([-3], dtype=I32)}, "expected token ids in [0, vocab_size=256), found -3 at position 0"),
    ({"input_ids": np.arange(3, 70, dtype=I32)}, "input 'input_ids': expected a prompt of at most 63 tokens"),
    ({"input_ids": np.arange(3, 40, dtype=I32), "max_tokens": np.array([30], I32)},
     "input 'max_tokens': expected at most 27 (max_seq_len=64 - prompt of 37 tokens), found 30"),
    ({"max_tokens": np.array([0], I32)}, "input 'max_tokens': expected an integer >= 1, found 0"),
    ({"max_tokens": np.array([2, 3], I32)}, "input 'max_tokens': expected a single value (shape [1]), found shape [2]"),
    ({"max_tokens": np.array([2], np.int64)}, "input 'max_tokens': expected TYPE_INT32 (int32), found dtype int64"),
    ({"temperature": np.array([-1.0], F32)}, "input 'temperature': expected a finite number >= 0"),
    ({"temperature": np.array([np.nan], F32)}, "input 'temperature': expected a finite number >= 0"),
    ({"top_p": np.array([0.0], F32)}, "input 'top_p': expected a number in (0, 1]"),
    ({"top_k": np.array([257], I32)}, "input 'top_k': expected an integer in [0, vocab_size=256]"),
    ({"seed": np.array([-1], np.int64)}, "input 'seed': expected an integer >= 0, found -1"),
    ({"logprobs": np.array([21], I32)}, "input 'logprobs': expected an integer in [0, 20]"),
    ({"stop_token_ids": np.array([5, 999], I32)}, "input 'stop_token_ids': expected token ids in [0, vocab_size=256)"),
    ({"stop_token_ids": np.arange(65, dtype=I32)}, "input 'stop_token_ids': expected at most 64 ids, found 65"),
    ({"stream": np.array([1], I32)}, "input 'stream': expected TYPE_BOOL (bool), found dtype int32"),
    ({"text_input": np.array([b"w3"], dtype=object)}, "input 'text_input': expected token ids instead (this model has no tokenizer"),
]


def test_each_bad_request_gets_its_own_error(ids_model, ids_ckpt):
    """Bad requests interleaved with good ones in one execute(): each bad one gets exactly one INVALID_ARG error
    response naming the input, expected and found; the good ones complete with generate's tokens."""
    want = cli_generate(ids_ckpt, PROMPTS[:3])
    good = [req(PROMPTS[i % 3][0], max_tokens=PROMPTS[i % 3][1], stream=i % 2 == 0) for i in range(len(BAD))]
    bad = []
    for inputs, _ in BAD:
        arrays = dict(inputs)
        if "input_ids" not in arrays and "text_input" not in arrays and inputs:
            arrays["input_ids"] = np.array([1, 2], I32)
        bad.append(InferenceRequest(arrays, "bad"))
    batch = [x for pair in zip(bad, good) for x in pair]
    ids_model.execute(batch)
    finish(*bad, *good)
    for r, (_, message) in zip(bad, BAD):
        code, text = error(r)
        assert code == TritonError.INVALID_ARG and message in text and text.startswith("trtfalcon: request 'bad'")
    for i, r in enumerate(good):
        assert tokens(r) == want[i % 3]["token_ids"]


def test_several_problems_in_one_message(ids_model):
    r = req([1, 2], max_tokens=0, temperature=-2.0, top_p=1.5)
    ids_model.execute([r])
    finish(r)
    _, text = error(r)
    assert all(f"input '{n}'" in text for n in ("max_tokens", "temperature", "top_p"))


def test_executor_failure_ends_that_step_only(ids_model, ids_ckpt, monkeypatch):
    """An executor exception ends the requests of that step with an error; the next requests are served."""
    executor = ids_model.model.engine.executor
    real = executor.execute
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(batch)

    monkeypatch.setattr(executor, "execute", flaky)
    first = [req([3, 4, 5], max_tokens=6, stream=True), req([6, 7], max_tokens=6)]
    ids_model.execute(first)
    finish(*first)
    for r in first:
        resp = r.sender.responses[-1]
        assert resp.has_error() and "illegal memory access" in resp.error().message()
    monkeypatch.setattr(executor, "execute", real)
    [want] = cli_generate(ids_ckpt, [([3, 4, 5], 6)])
    again = req([3, 4, 5], max_tokens=6, stream=True)
    ids_model.execute([again])
    finish(again)
    assert tokens(again) == want["token_ids"]


def test_finalize_ends_requests_in_flight(ids_ckpt, tmp_path):
    model = load_model_py(write_repository(tmp_path, model_dir=ids_ckpt, backend="torch", runtime=RUNTIME))
    rs = [req([3, 4], max_tokens=60, ignore_eos=True, stream=True) for _ in range(6)]
    model.execute(rs)
    model.finalize()
    finish(*rs)
    for r in rs:
        last = r.sender.responses[-1]
        assert last.has_error() and last.error().code() == TritonError.UNAVAILABLE
    late = req([3, 4], max_tokens=2)
    model.execute([late])
    finish(late)
    assert "unloading" in error(late)[1]


# ---------------------------------------------------------------------------------------------- text
def text_of(r: InferenceRequest) -> str:
    return "".join(resp.outputs()["text_output"][0].decode() for resp in r.sender.responses)


def test_text_in_text_out(text_model, text_ckpt):
    """text_input is tokenized with the checkpoint's tokenizer; text_output streams the detokenized tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(text_ckpt), local_files_only=True)
    prompt = "w5 w17 w200 w33"
    ids = tok.encode(prompt)
    assert ids == [5, 17, 200, 33]
    [want] = cli_generate(text_ckpt, [(ids, 12)])
    s = req(None, text_input=prompt, max_tokens=12, stream=True)
    w = req(None, text_input=prompt, max_tokens=12)
    by_ids = req(ids, max_tokens=12)
    text_model.execute([s, w, by_ids])
    finish(s, w, by_ids)
    assert tokens(s) == tokens(w) == tokens(by_ids) == want["token_ids"]
    # The text continues the prompt: prompt text + text_output = decode(prompt + output), here " w.. w..".
    expected = tok.decode(ids + want["token_ids"], skip_special_tokens=True)[len(tok.decode(ids)):]
    assert expected.startswith(" ") and expected.strip() == tok.decode(want["token_ids"], skip_special_tokens=True)
    assert text_of(s) == text_of(w) == text_of(by_ids) == expected
    assert w.sender.responses[-1].outputs()["prompt_tokens"].tolist() == [4]


def test_stop_words(text_model, text_ckpt):
    """A stop word ends the request with 'stop' (engine request cancelled, so its cache is freed); the text stops
    before it and no part of it was ever streamed."""
    [want] = cli_generate(text_ckpt, [([5, 17, 200, 33], 12)], "--ignore-eos")
    gen = want["token_ids"]
    stop = f"{word(gen[3])} {word(gen[4])}"  # spans two tokens
    s = req(None, text_input="w5 w17 w200 w33", max_tokens=12, ignore_eos=True, stream=True,
            stop_words=np.array([stop.encode(), b"never-generated"], dtype=object))
    text_model.execute([s])
    finish(s)
    assert tokens(s) == gen[:5]
    assert s.sender.responses[-1].outputs()["finish_reason"][0] == b"stop"
    full = " " + " ".join(word(t) for t in gen[:5])
    assert text_of(s) == full[:full.index(stop)]
    assert not text_model.model.engine.scheduler.live


def test_text_requests_validated(text_model):
    rs = [
        req([1, 2], text_input="w3"),
        req(None, text_input=np.array([b"\xff\xfe"], dtype=object)),
        req(None, text_input=""),
        req(None, text_input="w3", stop_words=np.array([b""], dtype=object)),
        req(None, text_input="w3 " * 70),
    ]
    text_model.execute(rs)
    finish(*rs)
    msgs = [error(r)[1] for r in rs]
    assert "inputs 'text_input' and 'input_ids': expected one of them, found both" in msgs[0]
    assert "input 'text_input': expected UTF-8 text" in msgs[1]
    assert "input 'text_input': expected non-empty text" in msgs[2]
    assert "input 'stop_words': expected words of 1 to 256 characters, found 0 characters at position 0" in msgs[3]
    assert "input 'text_input': expected a prompt of at most 63 tokens" in msgs[4]


@pytest.mark.parametrize("chunks", [[b"a\xc3", b"\xa9b"], [b"x", b"\xe2", b"\x82", b"\xac", b"y"]])
def test_text_stream_never_splits_a_character(chunks):
    """A byte-level tokenizer's tokens can end mid-character: such text waits for the next token."""
    from trtfalcon.serve.text import TextStream

    class Bytes:  # token id = byte value
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    ts = TextStream(Bytes(), [])
    parts = []
    for c in chunks:
        ts.add(list(c))
        parts.append(ts.take())
    parts.append(ts.take(final=True))
    assert "\ufffd" not in "".join(parts) and "".join(parts) == b"".join(chunks).decode()


def test_text_stream_holds_back_a_possible_stop_word():
    from trtfalcon.serve.text import TextStream

    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    ts = TextStream(Chars(), [], stop_words=["abc", "zz"])
    out = []
    for ch in "xyab":
        ts.add([ord(ch)])
        out.append(ts.take())
    assert "".join(out) == "xy" and not ts.stopped  # "ab" might start "abc"
    ts.add([ord("x")])
    assert ts.take() == "abx"  # it did not
    ts.add([ord("z")])
    assert ts.take() == ""
    ts.add([ord("z")])
    assert ts.stopped and ts.take() == "" and ts.text == "xyabx"


def test_engine_admission_rejection_and_a_failing_sender(ids_ckpt, tmp_path):
    """A request that passes the model's checks but not the engine's (needs more KV blocks than a small pool has)
    gets INVALID_ARG; a sender that raises (client gone) ends only its own request; the loop keeps serving."""
    model = load_model_py(write_repository(tmp_path, model_dir=ids_ckpt, backend="torch",
                                           runtime={**RUNTIME, "num_blocks": 3, "block_size": 8}))
    try:
        too_big = req(list(range(3, 33)), max_tokens=20)  # 49 cached tokens = 7 blocks > 3
        broken = req([3, 4], max_tokens=5, stream=True)
        calls = {"n": 0}
        real_send = broken.sender.send

        def send(response=None, flags=0):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("stub: client disconnected")
            real_send(response, flags)

        broken.sender.send = send
        ok = req([5, 6], max_tokens=4, stream=True)
        model.execute([too_big, broken, ok])
        finish(too_big, broken, ok)
        code, text = error(too_big)
        assert code == TritonError.INVALID_ARG and "rejected" in text and "blocks" in text
        assert broken.sender.responses[-1].has_error() and "client disconnected" in \
            broken.sender.responses[-1].error().message()
        assert len(tokens(ok)) == 4
        assert not model.model.engine.scheduler.live
    finally:
        model.finalize()


def test_a_sender_whose_is_cancelled_raises_ends_only_its_request(ids_ckpt, tmp_path):
    """is_cancelled() is an IPC call to the server: if it fails for one client, that client is treated as gone
    (its request is cancelled) and every other request streams on."""
    model = load_model_py(write_repository(tmp_path, model_dir=ids_ckpt, backend="torch",
                                           runtime=RUNTIME))
    try:
        broken = req([3, 4], max_tokens=50, stream=True)

        def is_cancelled():
            raise RuntimeError("stub: IPC to the server failed")

        broken.sender.is_cancelled = is_cancelled
        ok = req([5, 6], max_tokens=4, stream=True)
        model.execute([broken, ok])
        finish(broken, ok)
        assert broken.sender.final_count == 1 and broken.sender.responses[-1].has_error()
        assert ok.sender.final_count == 1 and len(tokens(ok)) == 4 and not ok.sender.responses[-1].has_error()
        assert not model.model.engine.scheduler.live
    finally:
        model.finalize()


def test_onnxruntime_backend_serves_the_same_tokens(ids_ckpt, tmp_path):
    """The served model is backend-agnostic: an ONNX export run by onnxruntime streams torch's greedy tokens."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'trtfalcon[onnx]')")
    from trtfalcon.runtime.backends import BACKENDS

    if "onnxruntime" not in BACKENDS:
        pytest.skip("this trtfalcon has no onnxruntime executor")
    from trtfalcon.checkpoint.convert import convert_checkpoint
    from trtfalcon.export import export_onnx

    export = export_onnx(convert_checkpoint(ids_ckpt, tmp_path / "deploy", dtype="fp32"), tmp_path / "onnx")
    want = cli_generate(ids_ckpt, PROMPTS[:3])
    model = load_model_py(write_repository(tmp_path / "repo", model_dir=export, backend="onnxruntime",
                                           runtime=RUNTIME))
    try:
        rs = [req(p, max_tokens=n, stream=True) for p, n in PROMPTS[:3]]
        model.execute(rs)
        finish(*rs)
        assert [tokens(r) for r in rs] == [w["token_ids"] for w in want]
    finally:
        model.finalize()


def test_each_thread_gets_its_own_tokenizer(tmp_path):
    """Encode (Triton's thread) and decode (the engine thread) never share a tokenizer object, so neither waits
    for the other and HF fast tokenizers never see concurrent use."""
    import threading

    from serve_helpers import save_wordlevel_tokenizer

    from trtfalcon.serve.text import ThreadLocalTokenizer, load_tokenizer

    save_wordlevel_tokenizer(tmp_path, 256)
    tok = ThreadLocalTokenizer(tmp_path, first=load_tokenizer(tmp_path))
    mine = tok.tokenizer
    seen = {}
    t = threading.Thread(target=lambda: seen.update(obj=tok.tokenizer, again=tok.tokenizer,
                                                    text=tok.decode(tok.encode("w7 w9"))))
    t.start()
    t.join()
    assert tok.tokenizer is mine and seen["obj"] is seen["again"] and seen["obj"] is not mine
    assert tok.decode(tok.encode("w7 w9")) == seen["text"] == "w7 w9"
