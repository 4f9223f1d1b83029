"""The generated repository: config.pbtxt parsed by Triton's own ModelConfig protobuf (shipped in tritonclient),
declaring exactly what model.py reads and writes; trtfalcon.json; the CLI."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from pb_utils_stand_in import InferenceRequest
from serve_helpers import RUNTIME, load_model_py
from tritonclient.grpc import model_config_pb2

from trtfalcon.serve import protocol
from trtfalcon.serve.repository import InstancePlan, ServeSettings, write_repository
from helpers import run_cli as run

DTYPE = model_config_pb2.DataType


def parse(model_dir: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("text", [False, True])
@pytest.mark.parametrize("plan", [InstancePlan(), InstancePlan(count=2, gpus=(0, 1, 3))])
def test_config_parses_with_tritons_schema(text, plan, ids_ckpt, text_ckpt, tmp_path):
    d = write_repository(tmp_path, model_dir=text_ckpt if text else ids_ckpt, backend="torch", plan=plan,
                         model_name="falcon", runtime=RUNTIME)
    cfg = parse(d)
    assert cfg.name == "falcon" and cfg.backend == "python" and cfg.max_batch_size == 0
    assert cfg.model_transaction_policy.decoupled
    assert not cfg.HasField("dynamic_batching") and not cfg.HasField("sequence_batching")
    assert [(i.name, DTYPE.Name(i.data_type), tuple(i.dims), i.optional) for i in cfg.input] == \
        [(s.name, s.data_type, s.dims, True) for s in protocol.inputs(text)]
    assert [(o.name, DTYPE.Name(o.data_type), tuple(o.dims)) for o in cfg.output] == \
        [(s.name, s.data_type, s.dims) for s in protocol.outputs(text)]
    assert ("text_input" in [i.name for i in cfg.input]) == text
    [group] = cfg.instance_group
    assert group.count == plan.count
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == plan.kind
    assert tuple(group.gpus) == plan.gpus


def test_layout_and_settings(ids_ckpt, tmp_path):
    d = write_repository(tmp_path / "repo", model_dir=ids_ckpt, backend="torch", runtime=RUNTIME,
                         limits={"max_logprobs": 5})
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) == \
        ["1", "1/model.py", "1/trtfalcon.json", "config.pbtxt"]
    assert (d / "1" / "model.py").read_text() == \
        resources.files("trtfalcon.serve").joinpath("model.py").read_text()
    s = ServeSettings.load(d / "1")
    assert s.backend == "torch" and Path(s.model_dir) == ids_ckpt.resolve() and s.tokenizer_dir is None
    assert s.runtime == RUNTIME and s.limits == {"max_logprobs": 5}
    # a second model goes beside the first; the same name again needs overwrite
    write_repository(tmp_path / "repo", model_dir=ids_ckpt, backend="torch", model_name="other")
    assert (tmp_path / "repo" / "trtfalcon" / "config.pbtxt").is_file()
    with pytest.raises(Exception, match="already exists"):
        write_repository(tmp_path / "repo", model_dir=ids_ckpt, backend="torch")


def test_copy_model_is_self_contained(text_ckpt, tmp_path):
    d = write_repository(tmp_path / "repo", model_dir=text_ckpt, backend="torch", runtime=RUNTIME, copy_model=True)
    s = ServeSettings.load(d / "1")
    assert s.model_dir == "model" and s.tokenizer_dir == "model"
    assert (d / "1" / "model" / "tokenizer.json").is_file()
    moved = tmp_path / "moved"
    (tmp_path / "repo").rename(moved)
    model = load_model_py(moved / "trtfalcon")  # loads from the copy, wherever the repository now is
    try:
        r = InferenceRequest({"text_input": np.array([b"w5 w6 w7"], dtype=object),
                              "max_tokens": np.array([2], np.int32)})
        model.execute([r])
        assert r.sender.done.wait(60) and not r.sender.responses[-1].has_error()
    finally:
        model.finalize()


def test_model_reads_and_writes_exactly_the_declared_tensors(text_model, monkeypatch):
    """Every name model.py asks for is a declared input; every tensor it sends is a declared output, with the
    declared dtype and rank."""
    import pb_utils_stand_in as pb

    asked: set[str] = set()
    real = pb.get_input_tensor_by_name

    def spy(request, name):
        asked.add(name)
        return real(request, name)

    monkeypatch.setattr(pb, "get_input_tensor_by_name", spy)
    reqs = [InferenceRequest({"input_ids": np.array([4, 5, 6], np.int32), "max_tokens": np.array([3], np.int32),
                              "logprobs": np.array([2], np.int32), "stream": np.array([stream]),
                              "return_confidences": np.array([True])})
            for stream in (True, False)]
    text_model.execute(reqs)
    declared_in = {s.name for s in protocol.inputs(True)}
    assert asked == declared_in
    outs = {s.name: s for s in protocol.outputs(True)}
    for r in reqs:
        assert r.sender.done.wait(60)
        for resp in r.sender.responses:
            for name, arr in resp.outputs().items():
                spec = outs[name]
                assert arr.dtype == spec.numpy_dtype, name
                assert arr.ndim == len(spec.dims), name
            assert set(resp.outputs()) == set(outs)  # logprobs and confidences asked for: every output present


def test_template_imports_only_the_backend_api():
    """The template stays thin: pb_utils plus trtfalcon.serve.backend, nothing else to keep in sync."""
    src = resources.files("trtfalcon.serve").joinpath("model.py").read_text()
    imports = sorted(line.strip() for line in src.splitlines() if line.startswith(("import ", "from ")))
    assert imports == ["from trtfalcon.serve.backend import ServedModel",
                       "import triton_python_backend_utils as pb_utils"]


def test_docs_name_every_input_and_output():
    doc = (Path(__file__).parents[2] / "docs" / "serving.md").read_text()
    for s in protocol.INPUTS + protocol.OUTPUTS:
        assert f"`{s.name}`" in doc, s.name


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_writes_the_repository(ids_ckpt, tmp_path):
    out = run("serve", "triton", "--checkpoint", ids_ckpt, "--out", tmp_path / "repo", "--gpus", "0,1",
              "--instances-per-gpu", "2", "--max-batch-size", "8", "--max-seq-len", "128", "--model-name", "f1").output
    d = tmp_path / "repo" / "f1"
    assert str(d / "config.pbtxt") in out
    group = parse(d).instance_group[0]
    assert (group.count, tuple(group.gpus)) == (2, (0, 1))
    s = json.loads((d / "1" / "trtfalcon.json").read_text())
    assert s["backend"] == "torch" and s["runtime"]["max_batch_size"] == 8 and s["runtime"]["max_seq_len"] == 128
    assert "device" not in s["runtime"] and s["limits"] == {"default_max_tokens": 256, "max_logprobs": 20}
    assert "Example" in run("serve", "triton", "--help").output


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of --engine or --checkpoint"),
    (["--gpus", "0,x"], "expected comma-separated GPU ids"),
    (["--gpus", "1,1"], "expected distinct GPU ids"),
    (["--device", "cuda"], "each instance's device comes from --gpus"),
    (["--backend", "tensorrt"], "the tensorrt backend runs on GPUs only"),
    (["--max-num-tokens", "4", "--max-batch-size", "8"], "must be at least --max-batch-size"),
])
def test_cli_errors(ids_ckpt, tmp_path, args, message):
    ckpt = [] if not args else ["--checkpoint", ids_ckpt]
    assert message in run("serve", "triton", *ckpt, "--out", tmp_path / "repo", *args, ok=False).output
    assert not (tmp_path / "repo" / "trtfalcon").exists()


def test_client_helpers_send_what_the_config_declares(text_ckpt, tmp_path):
    """trtfalcon.serve.client builds tritonclient inputs (gRPC and HTTP) with the declared names, datatypes and
    ranks (test_serve_tritonserver.py sends them to a real server)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from trtfalcon.serve.client import request_arrays, tritonclient_inputs

    cfg = parse(write_repository(tmp_path, model_dir=text_ckpt, backend="torch", runtime=RUNTIME))
    wire = {"TYPE_STRING": "BYTES"}
    declared = {i.name: (wire.get(DTYPE.Name(i.data_type), DTYPE.Name(i.data_type)[5:]), len(i.dims))
                for i in cfg.input}
    arrays = request_arrays(text="w5 w6", max_tokens=4, temperature=0.5, top_p=0.9, top_k=3, seed=1,
                            stop_words=["w9"], stop_token_ids=[2], ignore_eos=True, stream=False, logprobs=2,
                            n=2, confidence_top_k=20, confidence_window=8, confidence_threshold=1.5,
                            return_confidences=True)
    assert set(arrays) == set(declared) - {"input_ids"}
    for module in (grpcclient, httpclient):
        for inp in tritonclient_inputs(module, arrays):
            assert (inp.datatype(), len(inp.shape())) == declared[inp.name()], inp.name()
    with pytest.raises(KeyError, match="'max_new_tokens': not an input of the served model"):
        request_arrays(input_ids=[1], max_new_tokens=3)


def test_instance_device_comes_from_triton(ids_ckpt, tmp_path, monkeypatch):
    """KIND_GPU instance on device 3 -> the executor is built for cuda:3 (checked without a GPU by intercepting
    create_executor); a non-decoupled config is refused at load."""
    import pb_utils_stand_in as pb

    import trtfalcon.runtime.backends as backends
    from trtfalcon.serve.backend import ServedModel

    d = write_repository(tmp_path, model_dir=ids_ckpt, backend="torch", runtime=RUNTIME, plan=InstancePlan(gpus=(3,)))
    seen = {}

    class Stop(Exception):
        pass

    def fake(backend, checkpoint, opts):
        seen.update(backend=backend, checkpoint=Path(checkpoint), device=opts.device, mbs=opts.max_batch_size)
        raise Stop

    monkeypatch.setattr(backends, "create_executor", fake)
    args = {"model_config": json.dumps({"name": "trtfalcon", "model_transaction_policy": {"decoupled": True}}),
            "model_repository": str(d), "model_version": "1", "model_instance_kind": "GPU",
            "model_instance_device_id": "3"}
    with pytest.raises(Stop):
        ServedModel.from_triton_args(pb, args)
    assert seen == {"backend": "torch", "checkpoint": ids_ckpt.resolve(), "device": "cuda:3", "mbs": 4}
    with pytest.raises(RuntimeError, match="expected decoupled: true"):
        ServedModel.from_triton_args(pb, {**args, "model_config": json.dumps({"name": "trtfalcon"})})


def test_the_pinned_tritonserver_wheel_is_the_constraints_pin():
    """constraints/cpu.txt (what CI installs from) and trtfalcon.serve.server (what the tests fetch) pin the same
    nvidia-pytriton release."""
    from trtfalcon.serve.server import PYTRITON_DIR, PYTRITON_WHEEL

    pins = [line.strip() for line in (Path(__file__).parents[2] / "constraints" / "cpu.txt").read_text().splitlines()
            if line.startswith("nvidia-pytriton==")]
    assert pins == [PYTRITON_WHEEL] and PYTRITON_DIR == PYTRITON_WHEEL.replace("==", "-")
