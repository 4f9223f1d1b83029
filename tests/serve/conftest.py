"""Fixtures for the serving tests: a tiny checkpoint (with and without a tokenizer) and a generated repository
whose model.py is loaded in-process through the pb_utils STAND-IN (see serve_helpers.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serve_helpers import RUNTIME, load_model_py, save_wordlevel_tokenizer  # noqa: E402

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
