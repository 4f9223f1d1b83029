"""trtfalcon.serve.server without starting a server: where it finds tritonserver, the stub environment it makes,
the metrics text it reads. (Starting and stopping the real one: test_serve_tritonserver.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trtfalcon.errors import MissingDependencyError
from trtfalcon.serve.metrics import parse_prometheus, series
from trtfalcon.serve.server import find_tritonserver, make_stub_env


def fake_wheel(root: Path) -> Path:
    """The layout of an unpacked (or installed) nvidia-pytriton wheel, with empty files."""
    server = root / "pytriton" / "tritonserver"
    for f in ("bin/tritonserver", "backends/python/libtriton_python.so",
              "backends/python/triton_python_backend_utils.py", "python_backend_stubs/3.11/triton_python_backend_stub",
              "python_backend_stubs/3.12/triton_python_backend_stub"):
        (server / f).parent.mkdir(parents=True, exist_ok=True)
        (server / f).write_bytes(b"")
    (root / "nvidia_pytriton.libs").mkdir()
    return root


@pytest.mark.parametrize("given", ["", "pytriton", "pytriton/tritonserver", "pytriton/tritonserver/bin/tritonserver"])
def test_a_wheel_is_found_from_any_of_its_paths(tmp_path, given):
    root = fake_wheel(tmp_path / "w")
    found = find_tritonserver(root / given if given else root)
    assert found.is_pytriton_wheel and found.binary == root / "pytriton/tritonserver/bin/tritonserver"
    assert found.libs == (root / "nvidia_pytriton.libs",) and found.origin == "--tritonserver"
    assert found.stub_for((3, 12)).parent.name == "3.12"
    with pytest.raises(MissingDependencyError, match=r"stub for Python 3\.9 .*found stubs for 3\.11, 3\.12"):
        found.stub_for((3, 9))


def test_search_order_and_what_it_says_when_nothing_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("TRTFALCON_TRITON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("TRTFALCON_TRITONSERVER", raising=False)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # no installed nvidia-pytriton
    container = Path("/opt/tritonserver/bin/tritonserver")
    if not container.exists():
        with pytest.raises(MissingDependencyError, match="pip install --no-deps nvidia-pytriton==0.7.0"):
            find_tritonserver()
    # a container-style install on PATH: no stubs to assemble, its own Python backend
    (tmp_path / "opt/bin").mkdir(parents=True)
    (tmp_path / "opt/bin/tritonserver").write_bytes(b"")
    (tmp_path / "opt/bin/tritonserver").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "opt/bin"))
    found = find_tritonserver()
    assert found.origin == "PATH" and not found.is_pytriton_wheel
    # $TRTFALCON_TRITONSERVER comes first
    fake_wheel(tmp_path / "w")
    monkeypatch.setenv("TRTFALCON_TRITONSERVER", str(tmp_path / "w"))
    assert find_tritonserver().origin == "$TRTFALCON_TRITONSERVER"
    assert find_tritonserver(tmp_path / "opt").binary == tmp_path / "opt/bin/tritonserver"  # an install directory
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingDependencyError, match="expected the tritonserver binary"):
        find_tritonserver(tmp_path / "empty")  # neither a binary, bin/tritonserver, nor a wheel


def test_the_stub_environment_imports_the_active_one(tmp_path):
    """A python3 started from the stub environment's bin/ (what the stub's embedded interpreter resolves on PATH)
    has that environment as its prefix, the overlay first, and imports trtfalcon from the active environment."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "overlay_marker.py").write_text("WHERE = 'overlay'\n")
    bin_dir = make_stub_env(tmp_path / "stub-env", overlay)
    code = ("import sys, overlay_marker, trtfalcon; print(sys.prefix); print(overlay_marker.WHERE); "
            "print(trtfalcon.__file__); print(sys.path.index(%r) < min(i for i, p in enumerate(sys.path) "
            "if p.endswith('site-packages') and 'stub-env' not in p))" % str(overlay))
    out = subprocess.run([str(bin_dir / "python3"), "-I", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    prefix, where, trtfalcon_file, overlay_first = out.stdout.split()
    import trtfalcon

    assert Path(prefix) == tmp_path / "stub-env" and where == "overlay" and overlay_first == "True"
    assert Path(trtfalcon_file) == Path(trtfalcon.__file__) and sys.prefix != prefix


def test_prometheus_text_is_read_by_series_and_labels():
    text = """# HELP trtfalcon_kv_blocks_free KV-cache blocks free
# TYPE trtfalcon_kv_blocks_free gauge
trtfalcon_kv_blocks_free{instance="ids_0_0",model="ids",version="1"} 120
trtfalcon_kv_blocks_free{instance="text_0_0",model="text",version="1"} 7
trtfalcon_requests_ended_total{instance="ids_0_0",model="ids",outcome="cancelled",version="1"} 3
trtfalcon_requests_ended_total{instance="ids_1_0",model="ids",outcome="cancelled",version="1"} 2
nv_cpu_utilization 0.25
odd{label="a \\"quoted\\" value, with comma"} 1
"""
    parsed = parse_prometheus(text)
    assert series(parsed, "trtfalcon_kv_blocks_free", model="ids") == 120
    assert series(parsed, "trtfalcon_kv_blocks_free") == 127
    assert series(parsed, "trtfalcon_requests_ended_total", model="ids", outcome="cancelled") == 5
    assert series(parsed, "trtfalcon_requests_ended_total", outcome="completed") == 0
    assert series(parsed, "nv_cpu_utilization") == 0.25
    assert series(parsed, "odd", label='a "quoted" value, with comma') == 1
