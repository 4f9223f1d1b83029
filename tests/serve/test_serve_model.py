"""The generated model.py driven in-process through the pb_utils STAND-IN (not Triton), only for what a real
server cannot show (tests/serve/test_serve_tritonserver.py runs everything else against a real tritonserver):
the model's own dtype/shape checks that Triton pre-empts; failures injected inside the instance (an executor
step, a response sender, is_cancelled()); finalize with requests in flight; the engine's own admission
rejection on a tiny pool; the onnxruntime backend; text-stream units; the device of a GPU instance."""

from __future__ import annotations


import numpy as np
import pytest
from pb_utils_stand_in import InferenceRequest, TritonError
from serve_helpers import F32, I32, RUNTIME, cli_generate, error, finish, load_model_py, req, tokens

from trtfalcon.serve.repository import write_repository


PROMPTS = [([1, 2, 3], 9), ([7] * 20, 5), ([40, 41], 12)]

# What a real Triton rejects itself before the model sees it (a dtype, a shape or an input its config does not
# declare): the model's own checks of these are reachable only here. Every other bad request is sent to the real
# server in test_serve_tritonserver.py.
BAD = [
    ({"input_ids": np.array([1.0, 2.0], dtype=F32)}, "input 'input_ids': expected TYPE_INT32 (int32), found dtype float32"),
    ({"input_ids": np.array([[1, 2]], dtype=I32)}, "input 'input_ids': expected a 1-D tensor (dims [-1]), found shape [1, 2]"),
    ({"max_tokens": np.array([2, 3], I32)}, "input 'max_tokens': expected a single value (shape [1]), found shape [2]"),
    ({"max_tokens": np.array([2], np.int64)}, "input 'max_tokens': expected TYPE_INT32 (int32), found dtype int64"),
    ({"stream": np.array([1], I32)}, "input 'stream': expected TYPE_BOOL (bool), found dtype int32"),
    ({"text_input": np.array([b"w3"], dtype=object)}, "input 'text_input': expected token ids instead (this model has no tokenizer"),
]


def test_the_models_own_dtype_and_shape_checks(ids_model, ids_ckpt):
    """Requests Triton would have stopped, handed to model.py directly: each gets exactly one INVALID_ARG error
    response naming the input, expected and found; the good ones interleaved with them complete."""
    want = cli_generate(ids_ckpt, PROMPTS)
    good = [req(PROMPTS[i % 3][0], max_tokens=PROMPTS[i % 3][1], stream=i % 2 == 0) for i in range(len(BAD))]
    bad = []
    for inputs, _ in BAD:
        arrays = dict(inputs)
        if "input_ids" not in arrays and "text_input" not in arrays:
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
