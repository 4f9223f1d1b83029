"""The CLI as a user runs it: exit codes, one-line errors, JSON output."""

import json

import pytest
from click.testing import CliRunner

from trtfalcon import __version__
from trtfalcon.cli import main
from trtfalcon.model.generate import reference_generate
from trtfalcon.model.reference import ReferenceModel
from trtfalcon.model.weights import load_weights
from helpers import run_cli as run




@pytest.mark.parametrize("cmd", [[], ["synth"], ["convert"], ["generate"]])
def test_help_everywhere(cmd):
    out = run(*cmd, "--help").output
    assert "Usage:" in out and ("Example" in out or not cmd)


def test_version():
    assert __version__ in run("--version").output


def test_synth_convert_generate(tmp_path):
    hf, dep = tmp_path / "hf", tmp_path / "dep"
    run("synth", "--preset", "tiny", "--out", hf, "--dtype", "fp32", "--max-shard-size", "40kB")
    assert (hf / "model.safetensors.index.json").is_file()
    run("convert", hf, dep, "--dtype", "fp32")
    out = run("generate", dep, "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json").output
    tokens = json.loads(out.strip().splitlines()[-1])["token_ids"]
    want = reference_generate(ReferenceModel(load_weights(dep)), [1, 2, 3], 5, stop_token_ids=(2,))
    assert tokens == want and 1 <= len(tokens) <= 5
    # an HF checkpoint is converted in memory and gives the same tokens
    out_hf = run("generate", hf, "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json").output
    assert json.loads(out_hf.strip().splitlines()[-1])["token_ids"] == tokens


def test_prompts_file_keeps_input_order(tmp_path):
    hf = tmp_path / "hf"
    run("synth", "--preset", "tiny", "--out", hf, "--dtype", "fp32")
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prompt_ids": p, "max_new_tokens": 3 + i}) for i, p in enumerate(prompts)))
    lines = [json.loads(x) for x in run("generate", hf, "--prompts-file", f, "--json").output.strip().splitlines()]
    model = ReferenceModel(load_weights(hf))
    assert [x["prompt_ids"] for x in lines] == prompts
    for i, (p, line) in enumerate(zip(prompts, lines)):
        assert line["token_ids"] == reference_generate(model, p, 3 + i, stop_token_ids=(2,))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-ids", "1,2,x"], "expected comma-separated integers"),
        (["--prompt-ids", "1,300"], "expected token ids in [0, vocab_size=256), found 300 at position 1"),
        (["--prompt-ids", ","], "expected at least 1 token, found an empty prompt"),
        (["--prompt-ids", "1", "--max-new-tokens", "5000"], "= 5001 tokens, expected at most max_seq_len=4096"),
        ([], "exactly one of --prompt-ids or --prompts-file"),
    ],
)
def test_generate_bad_requests(tmp_path, args, message, backend):
    hf = tmp_path / "hf"
    run("synth", "--preset", "tiny", "--out", hf)
    assert message in run("generate", hf, "--backend", backend, *args, ok=False).output


def test_one_bad_prompt_does_not_stop_the_others(tmp_path):
    hf = tmp_path / "hf"
    run("synth", "--preset", "tiny", "--out", hf, "--dtype", "fp32")
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt_ids": [4, 5]}\n{"prompt_ids": [1, 999]}\n{"prompt_ids": [], "max_new_tokens": 2}\n'
                 '{"prompt_ids": [7], "max_new_tokens": 3}\n')
    r = CliRunner().invoke(main, ["generate", str(hf), "--prompts-file", str(f), "--json", "--max-new-tokens", "4",
                               "--ignore-eos"])
    assert r.exit_code == 1
    lines = [json.loads(x) for x in r.output.strip().splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2, 3]
    assert "found 999" in lines[1]["error"] and "empty prompt" in lines[2]["error"]
    assert len(lines[0]["token_ids"]) == 4 and len(lines[3]["token_ids"]) == 3


def test_bad_prompts_file_names_the_line(tmp_path):
    hf = tmp_path / "hf"
    run("synth", "--preset", "tiny", "--out", hf)
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt_ids": [1]}\n{"prompt_ids": [1, 2\n')
    assert f"{f}:2: not valid JSON" in run("generate", hf, "--prompts-file", f, ok=False).output
    f.write_bytes(b'{"prompt_ids": [1]}\n\xff\xfe\n')  # a binary file: one line naming it, not a traceback
    out = run("generate", hf, "--prompts-file", f, ok=False).output
    assert f"{f}: not UTF-8 (invalid byte at offset 20)" in out and "Traceback" not in out


def test_convert_errors_are_one_line(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pytorch_model.bin").write_bytes(b"x")
    out = run("convert", tmp_path / "bad", tmp_path / "out", ok=False).output
    assert "Error:" in out and "config.json" in out
    assert not (tmp_path / "out").exists()


def test_bad_shard_size(tmp_path):
    assert "expected a size such as" in run("synth", "--preset", "tiny", "--out", tmp_path / "x", "--max-shard-size", "big", ok=False).output


def test_runtime_options_are_the_dataclass_fields():
    """Flags, defaults and ranges come from RuntimeOptions: no value given = RuntimeOptions(); 'auto' = None."""
    import click

    from trtfalcon.cli import runtime_option_flags
    from trtfalcon.runtime.options import RuntimeOptions

    seen = {}

    @click.command()
    @runtime_option_flags
    def cmd(**kw):
        seen["opts"] = RuntimeOptions.from_flags(kw)

    assert CliRunner().invoke(cmd, []).exit_code == 0 and seen["opts"] == RuntimeOptions()
    r = CliRunner().invoke(cmd, ["--kv-cache-dtype", "fp8", "--ssm-state-dtype", "bf16", "--max-seq-len", "99",
                                 "--kernels", "torch", "--dtype", "bf16"])
    assert r.exit_code == 0, r.output
    assert seen["opts"] == RuntimeOptions(kv_dtype="fp8", ssm_dtype="bf16", max_seq_len=99, kernels="torch",
                                          dtype="bf16")
    assert "--max-seq-len" in CliRunner().invoke(cmd, ["--max-seq-len", "1"]).output  # the field's minimum, 2
    for command in (["generate"], ["bench"], ["serve", "triton"]):
        out = run(*command, "--help").output
        assert all(flag.name in out for flag in RuntimeOptions.flags().values()), command


def test_generate_json_line_of_an_output():
    from trtfalcon.runtime.request import RequestOutput, TokenLogprobs

    o = RequestOutput("3", [1, 2], [7, 8], "length", logprobs=[TokenLogprobs(7, -0.5, [7, 9], [-0.5, -1.5])] * 2)
    assert json.dumps(o.to_dict()) == (
        '{"prompt_ids": [1, 2], "token_ids": [7, 8], "finish_reason": "length", "logprobs": [{"token_id": 7, '
        '"logprob": -0.5, "top_ids": [7, 9], "top_logprobs": [-0.5, -1.5]}, {"token_id": 7, "logprob": -0.5, '
        '"top_ids": [7, 9], "top_logprobs": [-0.5, -1.5]}]}')
    bad = RequestOutput("4", [], finish_reason="error", error="prompt_ids: expected at least 1 token")
    assert json.dumps(bad.to_dict()) == ('{"prompt_ids": [], "token_ids": [], "finish_reason": "error", "error": '
                                         '"prompt_ids: expected at least 1 token"}')
