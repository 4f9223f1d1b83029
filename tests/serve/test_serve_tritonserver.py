"""End to end with a real Triton Inference Server: start `tritonserver` on a generated repository, talk to it with
tritonclient over gRPC (streaming, cancellation) and HTTP. Runs where a tritonserver binary is on PATH (NVIDIA's
container nvcr.io/nvidia/tritonserver:<yy.mm>-py3 with trtfalcon pip-installed); skips elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from serve_helpers import RUNTIME, cli_generate

from trtfalcon.serve.repository import write_repository

TRITONSERVER = shutil.which("tritonserver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TRITONSERVER is None, reason="no tritonserver binary on PATH: Triton Inference Server is not "
                       "pip-installable; run these tests inside nvcr.io/nvidia/tritonserver:<yy.mm>-py3 with "
                       "trtfalcon installed (docs/serving.md)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(text_ckpt, tmp_path_factory):
    import tritonclient.http as httpclient

    repo = tmp_path_factory.mktemp("triton-repo")
    write_repository(repo, model_dir=text_ckpt, backend="torch", runtime=RUNTIME)
    http, grpc, metrics = _free_port(), _free_port(), _free_port()
    log = open(repo / "server.log", "w")
    # The Python backend's stub runs model.py with the Python that has trtfalcon: this interpreter's site-packages.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([TRITONSERVER, f"--model-repository={repo}", f"--http-port={http}",
                             f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--log-verbose=0"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    client = httpclient.InferenceServerClient(f"localhost:{http}")
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited with {proc.returncode}:\n{(repo / 'server.log').read_text()[-4000:]}")
            try:
                if client.is_model_ready("trtfalcon"):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"model not ready in 180 s:\n{(repo / 'server.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"http": f"localhost:{http}", "grpc": f"localhost:{grpc}"}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_grpc_streaming_and_http(server, text_ckpt):
    from trtfalcon.serve.client import grpc_stream, http_generate

    [want] = cli_generate(text_ckpt, [([5, 17, 200, 33], 10)])
    chunks = list(grpc_stream(server["grpc"], "trtfalcon", input_ids=[5, 17, 200, 33], max_tokens=10))
    assert [t for c in chunks for t in c["output_ids"]] == want["token_ids"]
    assert chunks[-1]["finish_reason"] == want["finish_reason"] and all(len(c["output_ids"]) == 1 for c in chunks)
    whole = http_generate(server["http"], "trtfalcon", text="w5 w17 w200 w33", max_tokens=10)
    assert whole["output_ids"] == want["token_ids"]
    assert whole["text_output"] == "".join(c["text_output"] for c in chunks)


def test_bad_request_and_cancellation(server):
    from trtfalcon.serve.client import grpc_stream, http_generate

    with pytest.raises(Exception, match="expected token ids in \\[0, vocab_size=256\\), found 999"):
        http_generate(server["http"], "trtfalcon", input_ids=[1, 999], max_tokens=4)
    stream = grpc_stream(server["grpc"], "trtfalcon", input_ids=[3, 4], max_tokens=60, ignore_eos=True)
    first = [next(stream) for _ in range(3)]
    stream.close()  # cancels on the server
    assert len(first) == 3
    # the server keeps serving
    assert len(http_generate(server["http"], "trtfalcon", input_ids=[3, 4], max_tokens=3)["output_ids"]) == 3
