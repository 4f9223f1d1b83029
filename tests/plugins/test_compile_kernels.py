"""plugins/aot.py compile_kernels, what `plugins compile`, the demo and `build` run: the interpreter refused before
anything is written, the directory written atomically, spilling kernels an error naming them, the report."""

import json

import pytest

pytest.importorskip("triton")

from trtfalcon.errors import ConfigError  # noqa: E402
from trtfalcon.plugins import aot  # noqa: E402


def _record(plugin: str, config: str, spill: int) -> dict:
    return {"plugin": plugin, "config": config, "arch": "sm_90", "kernel_name": plugin,
            "launch": {"grid": ["N", "1", "1"], "block_x": 128, "num_warps": 4, "shared_mem": 1024},
            "resources": {"registers": 64, "spill_stores": spill, "spill_loads": spill}}


def test_the_interpreter_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ConfigError, match="unset TRITON_INTERPRET"):
        aot.compile_kernels(["sm_90"], tmp_path / "k")
    assert not (tmp_path / "k").exists()


def test_spilling_kernels_fail_once_the_directory_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    manifest = {"archs": ["sm_90"], "kernels": [_record("ssd", "x-fp32", 0), _record("ssd_recurrent", "x-bf16", 8)]}

    def compile_all(archs, out_dir, progress=None, *, config=None, selection=None):
        assert archs == ["sm_90"] and out_dir != tmp_path / "k"  # a temporary directory, renamed when complete
        (out_dir / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    monkeypatch.setattr(aot, "compile_all", compile_all)
    with pytest.raises(ConfigError, match=r"1 kernel\(s\) spill registers: sm_90 ssd_recurrent x-bf16 \(8\+8 B\)"):
        aot.compile_kernels(["sm_90"], tmp_path / "k")
    assert json.loads((tmp_path / "k" / "manifest.json").read_text()) == manifest  # kept, to inspect
    manifest["kernels"].pop()
    assert aot.compile_kernels(["sm_90"], tmp_path / "k", overwrite=True) == manifest


def test_the_report_has_a_row_per_kernel_and_says_where_they_went(capsys, tmp_path):
    manifest = {"archs": ["sm_90"], "kernels": [_record("ssd", "x-fp32", 0), _record("causal_conv1d", "x-bf16", 0)]}
    aot.print_kernel_report(manifest, tmp_path)
    out = capsys.readouterr().out
    assert "plugin kernels: sm_90" in out and "spill_stores" in out and "grid" not in out
    assert "causal_conv1d" in out and "x-bf16" in out
    assert out.rstrip().endswith(f"wrote 2 kernels to {tmp_path}")
