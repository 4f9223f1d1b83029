"""Fixtures for the serving tests: a tiny checkpoint (with and without a tokenizer), a generated repository, and
its model.py loaded in-process through the pb_utils STAND-IN (tests/serve/pb_utils_stand_in.py, not Triton)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import pb_utils_stand_in  # noqa: E402

from trtfalcon.serve.repository import InstancePlan, write_repository  # noqa: E402

# Small pools so the tests exercise in-flight batching (several requests per step, prefill chunks) quickly.
RUNTIME = {"max_batch_size": 4, "max_num_tokens": 32, "max_seq_len": 64}
SPECIAL = {"<unk>": 0, "<bos>": 1, "<eos>": 2}


def word(i: int) -> str:
    return next((k for k, v in SPECIAL.items() if v == i), f"w{i}")


def save_wordlevel_tokenizer(directory: Path, vocab_size: int) -> None:
    """A WordLevel tokenizer over the tiny vocab ("w3" .. "w255" + 3 specials): tokenizer.json + config."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({word(i): i for i in range(vocab_size)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(list(SPECIAL))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<bos>",
        "eos_token": "<eos>", "model_max_length": 4096}))


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


def load_model_py(repo_model_dir: Path, instance_kind: str = "CPU"):
    """Import the GENERATED model.py (with the stand-in as triton_python_backend_utils) and initialize it with
    the args Triton's Python backend passes."""
    pb_utils_stand_in.install()
    spec = importlib.util.spec_from_file_location(f"generated_model_{id(repo_model_dir)}",
                                                  repo_model_dir / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse((repo_model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    model = module.TritonPythonModel()
    model.initialize({
        "model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
        "model_instance_kind": instance_kind, "model_instance_name": f"{cfg.name}_0_0",
        "model_instance_device_id": "0", "model_repository": str(repo_model_dir), "model_version": "1",
        "model_name": cfg.name,
    })
    return model


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
