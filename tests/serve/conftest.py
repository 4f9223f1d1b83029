"""Fixtures for the serving tests: a tiny checkpoint (with and without a tokenizer); a REAL Triton Inference Server
(tritonserver from the nvidia-pytriton wheel, or a container's) serving repositories written by `trtfalcon serve
triton`, started once per session; and repositories whose model.py is loaded in-process through the pb_utils
STAND-IN (see serve_helpers.py), for the few checks a real server cannot make."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import run_cli  # noqa: E402
from serve_helpers import RUNTIME, SERVER_RUNTIME, load_model_py, save_wordlevel_tokenizer, sizing_args  # noqa: E402

from trtfalcon.serve.repository import InstancePlan, write_repository  # noqa: E402


@pytest.fixture(scope="session")
def ids_ckpt(tiny_hf) -> Path:
    """The tiny HF checkpoint, no tokenizer: the model takes and returns token ids."""
    return tiny_hf


@pytest.fixture(scope="session")
def text_ckpt(tiny_hf, tmp_path_factory) -> Path:
    """The same checkpoint plus a tokenizer (as `convert` would copy one from an HF directory)."""
    d = tmp_path_factory.mktemp("hf-tok") / "ckpt"
    shutil.copytree(tiny_hf, d)
    save_wordlevel_tokenizer(d, vocab_size=256)
    return d


@pytest.fixture(scope="module")
def ids_model(ids_ckpt, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo-ids")
    d = write_repository(repo, model_dir=ids_ckpt, backend="torch", runtime=RUNTIME, plan=InstancePlan())
    model = load_model_py(d)
    yield model
    model.finalize()


@pytest.fixture(scope="module")
def text_model(text_ckpt, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo-text")
    d = write_repository(repo, model_dir=text_ckpt, backend="torch", runtime=RUNTIME)
    model = load_model_py(d)
    yield model
    model.finalize()


# ---------------------------------------------------------------------------------------------- the real server
@pytest.fixture(scope="session")
def triton_install():
    """A tritonserver: whatever find_tritonserver finds (a container's, an installed nvidia-pytriton), else the
    pinned nvidia-pytriton wheel fetched once into TRTFALCON_TRITON_CACHE (~/.cache/trtfalcon/triton), with the
    numpy its stub needs. Skipped, saying why, only when neither is here nor can be downloaded (no index)."""
    from trtfalcon.errors import MissingDependencyError
    from trtfalcon.serve.server import (PYTRITON_WHEEL, fetch_pytriton_server, find_tritonserver, old_stub_numpy,
                                        stub_needs_old_numpy)

    try:
        try:
            install = find_tritonserver()
        except MissingDependencyError:
            install = fetch_pytriton_server()
        if stub_needs_old_numpy(install):
            old_stub_numpy()
    except (MissingDependencyError, subprocess.TimeoutExpired) as e:
        why = f"no tritonserver here and {PYTRITON_WHEEL} cannot be fetched: {e}"
        if os.environ.get("TRTFALCON_REQUIRE_TRITONSERVER") == "1":  # CI: the real server is part of the suite
            pytest.fail(f"{why} (TRTFALCON_REQUIRE_TRITONSERVER=1)")
        pytest.skip(why)
    return install


@pytest.fixture(scope="session")
def triton(triton_install, ids_ckpt, text_ckpt, tmp_path_factory):
    """One real tritonserver for the session on 127.0.0.1 (free ports), serving two models written by the CLI:
    `ids` (no tokenizer) and `text` (with one), SERVER_RUNTIME sizing, explicit model control (for unload/reload).
    Stopped, with its stub processes and shared memory, at the end of the session."""
    from trtfalcon.serve.server import TritonServer

    repo = tmp_path_factory.mktemp("triton") / "repo"
    for name, ckpt in (("ids", ids_ckpt), ("text", text_ckpt)):
        run_cli("serve", "triton", "--checkpoint", ckpt, "--out", repo, "--model-name", name,
                *sizing_args(SERVER_RUNTIME))
    t0 = time.monotonic()
    with TritonServer(repo, install=triton_install, model_control="explicit",
                      log_path=repo.parent / "tritonserver.log") as server:
        server.startup_s = time.monotonic() - t0
        yield server
