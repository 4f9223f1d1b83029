"""Every TensorRT name the builder, the TensorRT executor and the plugin registration use exists in TensorRT
11.4's Python bindings, read from the wheel without loading it:
- tensorrt.so: pybind11 registers every class, method, property and enum value by its name, a NUL-terminated
  string in the binary. The linker merges a string that is the tail of another ("Logger" inside "ILogger"), so a
  name counts as present if some NUL-terminated string equals it or ends with it. Removed APIs
  (execute_async_v2, get_binding_index) are absent: the check discriminates.
- tensorrt_bindings/plugin/*.py (tensorrt.plugin, pure Python): names defined there, read with ast.
"""

import ast
import re
import zipfile
from pathlib import Path

import pytest
from helpers import wheel_plugin_api_names

ROOT = Path(__file__).parents[2]
# file -> names of variables (and self.<attr>) that hold TensorRT objects in that file
SOURCES = {
    "trtfalcon/engine/build.py": {"trt", "builder", "network", "parser", "config", "profile"},
    "trtfalcon/runtime/executors/tensorrt.py": {"trt", "self._runtime", "self.engine", "self.context"},
    "plugins/tensorrt.py": {"trt", "trtp", "launch", "expr", "src", "desc", "network"},
}
PYTHON_NAMES = {"__version__", "__name__", "__signature__"}


@pytest.fixture(scope="module")
def bindings(trt_bindings_wheel):
    with zipfile.ZipFile(trt_bindings_wheel) as z:
        so = z.read("tensorrt_bindings/tensorrt.so")
    plugin_names = wheel_plugin_api_names(trt_bindings_wheel, attributes=True)
    strings = set(re.findall(rb"[\x21-\x7e]{2,}(?=\x00)", so))
    return strings, plugin_names


def _in_so(strings, name: str) -> bool:
    b = name.encode()
    return b in strings or any(s.endswith(b) for s in strings)


def _root(node):
    """'trt' for trt.A.B, 'self.engine' for self.engine.X, a Name's id otherwise."""
    while isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            return f"self.{node.attr}"
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def used_names(path: Path, holders: set[str]) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        root = _root(node)
        if root in holders and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
            names.add(node.attr)
    return names - PYTHON_NAMES


def test_used_names_are_collected():
    build = used_names(ROOT / "trtfalcon/engine/build.py", SOURCES["trtfalcon/engine/build.py"])
    assert {"create_network", "STRONGLY_TYPED", "OnnxParser", "parse_from_file", "set_memory_pool_limit",
            "create_optimization_profile", "set_shape", "build_serialized_network", "ALIASED_PLUGIN_IO_10_03"} <= build
    ex = used_names(ROOT / "trtfalcon/runtime/executors/tensorrt.py", SOURCES["trtfalcon/runtime/executors/tensorrt.py"])
    assert {"deserialize_cuda_engine", "create_execution_context", "set_tensor_address", "set_input_shape",
            "execute_async_v3", "num_io_tensors", "get_tensor_name"} <= ex


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_tensorrt_name_exists_in_the_11_4_bindings(bindings, source):
    strings, plugin_names = bindings
    used = used_names(ROOT / source, SOURCES[source])
    assert used, source
    missing = sorted(n for n in used if not _in_so(strings, n) and n not in plugin_names)
    assert not missing, f"{source} uses names TensorRT 11.4 does not have: {missing}"


def test_the_check_rejects_removed_apis(bindings):
    strings, plugin_names = bindings
    for gone in ("execute_async_v2", "get_binding_index", "max_workspace_size_bytes", "set_calibration_profile_v2"):
        assert not _in_so(strings, gone) and gone not in plugin_names, gone
