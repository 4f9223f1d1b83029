"""Shared by the serving tests: runtime sizing, a tiny tokenizer, loading the GENERATED model.py through the
pb_utils STAND-IN (tests/serve/pb_utils_stand_in.py, not Triton), building requests, checking how they ended, and
`trtfalcon generate` as the reference."""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pb_utils_stand_in
from click.testing import CliRunner
from pb_utils_stand_in import InferenceRequest

from trtfalcon.cli import main

I32, F32 = np.int32, np.float32

# Small pools so the tests exercise in-flight batching (several requests per step, prefill chunks) quickly.
RUNTIME = {"max_batch_size": 4, "max_num_tokens": 32, "max_seq_len": 64}
# The real server's models: room for requests long enough to cancel mid-stream, and a batch small enough to queue.
SERVER_RUNTIME = {"max_batch_size": 4, "max_num_tokens": 32, "max_seq_len": 256}
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


def req(ids=None, *, rid="", **inputs) -> InferenceRequest:
    arrays = {}
    if ids is not None:
        arrays["input_ids"] = np.asarray(ids, dtype=I32)
    for name, value in inputs.items():
        if isinstance(value, np.ndarray):
            arrays[name] = value
        elif isinstance(value, bool):
            arrays[name] = np.array([value])
        elif isinstance(value, float):
            arrays[name] = np.array([value], dtype=F32)
        elif isinstance(value, str):
            arrays[name] = np.array([value.encode()], dtype=object)
        elif name == "seed":
            arrays[name] = np.array([value], dtype=np.int64)
        else:
            arrays[name] = np.array([value], dtype=I32)
    return InferenceRequest(arrays, rid)


def finish(*requests: InferenceRequest, timeout: float = 60.0) -> None:
    """Wait for every request's FINAL flag; then check it came exactly once, last, with no protocol errors."""
    for r in requests:
        assert r.sender.done.wait(timeout), f"request {r.id!r} never ended"
    time.sleep(0.05)  # a second FINAL (a bug) would arrive now
    for r in requests:
        assert r.sender.final_count == 1, (r.id, r.sender.final_count)
        assert r.sender.errors == [], (r.id, r.sender.errors)


def tokens(r: InferenceRequest) -> list[int]:
    assert not r.sender.responses[-1].has_error(), r.sender.responses[-1].error().message()
    return [t for resp in r.sender.responses for t in resp.outputs()["output_ids"].tolist()]


def error(r: InferenceRequest) -> tuple[int, str]:
    [resp] = r.sender.responses
    assert resp.has_error() and resp.outputs() == {}
    return resp.error().code(), resp.error().message()


def sizing_args(runtime: dict) -> list[str]:
    """Runtime sizing as the CLI's options (generate, serve triton)."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in runtime.items()]


def cli_generate(ckpt, prompts: list[tuple[list[int], int]], *extra, runtime: dict = RUNTIME) -> list[dict]:
    """`trtfalcon generate --prompts-file` with the repository's runtime sizing: the reference for the server."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "p.jsonl"
        f.write_text("\n".join(json.dumps({"prompt_ids": p, "max_new_tokens": n}) for p, n in prompts))
        sizing = sizing_args(runtime)
        r = CliRunner().invoke(main, ["generate", str(ckpt), "--prompts-file", str(f), "--json", *sizing, *extra])
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.output.strip().splitlines()]
