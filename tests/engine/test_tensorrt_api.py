"""The TensorRT API the builder, the TensorRT executor and the plugins use, checked against real TensorRT code:

- TensorRT for RTX (installed here, `.[rtx]`): every call on a TensorRT object in the shared build path, the
  TensorRT-for-RTX-only parts and the executor is checked against the real bindings' signature (pybind11's
  docstring: the method exists on that class, positional count and keyword names fit), every assigned attribute is a
  settable property, every module-level name chain (trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) resolves, and
  every method the IPluginV3 classes override exists on their bases with the arity TensorRT calls it with. The same
  build path then really runs in tests/engine/test_tensorrt_rtx.py.
- TensorRT 11.4 (its builder cannot be installed here): the quickly deployable plugin API is TensorRT 11.4's real
  Python package, run with its validators in tests/plugins/test_tensorrt.py; the names used on its objects are
  looked up on its real classes below. Names the TensorRT 11 path shares with TensorRT for RTX must also be in
  11.4's compiled bindings: pybind11 registers every name as a NUL-terminated string in tensorrt.so; the linker
  merges a string that is the tail of another ("Logger" inside "ILogger"), so that is a presence check only, backed
  by the signature check above. Removed APIs (execute_async_v2, get_binding_index) are absent: it discriminates.
"""

import ast
import inspect
import re
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BUILD, EXECUTOR, RTX_PLUGINS = "trtfalcon/engine/build.py", "trtfalcon/runtime/executors/tensorrt.py", "plugins/tensorrt_rtx.py"
# variable (or self.<attr>) -> the TensorRT class it holds; "" = the module itself
HOLDERS = {
    BUILD: {"trt": "", "self.trt": "", "builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser",
            "config": "IBuilderConfig", "profile": "IOptimizationProfile"},
    EXECUTOR: {"trt": "", "self._runtime": "Runtime", "self.engine": "ICudaEngine", "self.context": "IExecutionContext"},
    RTX_PLUGINS: {"trt": "", "registry": "IPluginRegistry"},
}
RTX_ONLY_CLASS = "TensorRTForRTX"  # build.py's TensorRT-for-RTX-only code; the rest of build.py is TensorRT 11's too


def _root(node):
    """'trt' for trt.A.B, 'self.engine' for self.engine.X, a Name's id otherwise."""
    while isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            return f"self.{node.attr}"
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _chain(node) -> list[str]:
    """trt.A.B -> ['A', 'B'] (the attributes after the holder)."""
    names = []
    while isinstance(node, ast.Attribute) and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
        names.append(node.attr)
        node = node.value
    return names[::-1]


def api_uses(path: Path, holders: dict[str, str]) -> dict[str, list]:
    """What a file does with TensorRT objects: attribute chains, calls (chain, #positional, keywords), assignments;
    each tagged with whether it is inside build.py's TensorRT-for-RTX-only class."""
    tree = ast.parse(path.read_text())
    rtx_only = {id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == RTX_ONLY_CLASS
                for n in ast.walk(c)}
    uses: dict[str, list] = {"chains": [], "calls": [], "sets": []}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _root(node) in holders:
            chain = _chain(node)
            if chain:
                uses["chains"].append((_root(node), chain, id(node) in rtx_only))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _root(node.func) in holders:
            if not any(isinstance(a, ast.Starred) for a in node.args):
                uses["calls"].append((_root(node.func), _chain(node.func), len(node.args),
                                      {k.arg for k in node.keywords}, id(node) in rtx_only))
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Attribute) and _root(t) in holders and _chain(t):
                    uses["sets"].append((_root(t), _chain(t), id(node) in rtx_only))
    return uses


@pytest.fixture(scope="module")
def rtx():
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT for RTX: pip install 'trtfalcon[rtx]'")
    from trtfalcon.tensorrt_import import import_tensorrt

    return import_tensorrt("tensorrt-rtx")


def _signatures(fn) -> list[tuple[int, int, set[str]]]:
    """Per overload in a pybind11 docstring: (min positional, max positional, keyword names), self excluded."""
    out = []
    for line in (getattr(fn, "__doc__", None) or "").strip().splitlines():
        m = re.match(r"^(?:\d+\. )?\w+\((.*)\)\s*->", line.strip())
        if not m:
            continue
        depth, cur, params = 0, "", []
        for ch in m.group(1):
            depth += 1 if ch in "[(" else -1 if ch in "])" else 0
            if ch == "," and depth == 0:
                params.append(cur.strip())
                cur = ""
            else:
                cur += ch
        if cur.strip():
            params.append(cur.strip())
        if params and params[0].startswith("self"):
            params = params[1:]
        out.append((sum("=" not in p for p in params), len(params), {p.split(":")[0].strip() for p in params}))
    return out


def _resolve(trt, holders, root, chain):
    obj = trt if holders[root] == "" else getattr(trt, holders[root])
    for name in chain:
        obj = getattr(obj, name)
    return obj


def test_uses_are_collected():
    build = api_uses(ROOT / BUILD, HOLDERS[BUILD])
    called = {c[1][-1] for c in build["calls"]}
    assert {"create_network", "OnnxParser", "parse_from_file", "set_memory_pool_limit", "create_optimization_profile",
            "set_shape", "build_serialized_network", "set_compute_capability", "set_preview_feature"} <= called
    assert {s[1][-1] for s in build["sets"]} >= {"builder_optimization_level", "num_compute_capabilities"}
    ex = api_uses(ROOT / EXECUTOR, HOLDERS[EXECUTOR])
    assert {"deserialize_cuda_engine", "create_execution_context", "set_tensor_address", "set_input_shape",
            "execute_async_v3", "get_tensor_name"} <= {c[1][-1] for c in ex["calls"]}


@pytest.mark.parametrize("source", sorted(HOLDERS))
def test_calls_fit_tensorrt_for_rtx_signatures(rtx, source):
    uses = api_uses(ROOT / source, HOLDERS[source])
    problems = []
    for root, chain, rtx_only in uses["chains"]:
        cls = HOLDERS[source][root]
        # module chains resolve fully; on an object only its first attribute is known to be of that class
        try:
            _resolve(rtx, HOLDERS[source], root, chain if cls == "" else chain[:1])
        except AttributeError:
            problems.append(f"{root}.{'.'.join(chain)}: no such name in TensorRT for RTX {rtx.__version__}")
    for root, chain, nargs, kwargs, _ in uses["calls"]:
        if (HOLDERS[source][root] != "" and len(chain) > 1) or chain[-1] == "__init__":
            continue  # a method of what an earlier call returned; an explicit base-class __init__(self)
        try:
            fn = _resolve(rtx, HOLDERS[source], root, chain)
        except AttributeError:
            continue  # reported above
        sigs = _signatures(fn.__init__ if inspect.isclass(fn) else fn)
        if sigs and not any(lo <= nargs + len(kwargs) and nargs <= hi and kwargs <= names for lo, hi, names in sigs):
            problems.append(f"{root}.{'.'.join(chain)}({nargs} positional, keywords {sorted(kwargs)}): TensorRT for "
                            f"RTX takes {[(lo, hi, sorted(n)) for lo, hi, n in sigs]} (min, max, names)")
    for root, chain, _ in uses["sets"]:
        if HOLDERS[source][root] == "" or len(chain) > 1:
            continue
        prop = getattr(getattr(rtx, HOLDERS[source][root]), chain[0], None)
        if not (isinstance(prop, property) and prop.fset is not None):
            problems.append(f"{root}.{chain[0]} = ...: not a settable property in TensorRT for RTX")
    assert not problems, f"{source}:\n" + "\n".join(problems)


def test_plugin_overrides_exist_on_the_ipluginv3_interfaces(rtx):
    """Every method the TensorRT for RTX plugin classes define is one TensorRT calls (it exists on a base interface),
    with the number of arguments TensorRT passes (enqueue included, which no test here can run)."""
    from trtfalcon.plugins.tensorrt_rtx import plugin_classes

    for cls in plugin_classes(rtx):
        bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("tensorrt_rtx")]
        for name, fn in vars(cls).items():
            if name.startswith("_") or not callable(fn):
                continue
            base = next((getattr(b, name) for b in bases if hasattr(b, name)), None)
            assert base is not None, f"{cls.__name__}.{name} overrides nothing TensorRT calls"
            doc = (base.__doc__ or "").strip().splitlines()[0]
            if "self: tensorrt_rtx" not in doc:
                continue  # pybind11 documents a few virtuals without their parameters
            takes = {hi for _, hi, _ in _signatures(base)}
            ours = len(inspect.signature(getattr(fn, "__wrapped__", fn)).parameters) - 1
            assert ours in takes, f"{cls.__name__}.{name}: TensorRT passes {takes} arguments, it takes {ours}"


# ---- TensorRT 11.4


@pytest.fixture(scope="module")
def bindings_strings(trt_bindings_wheel):
    with zipfile.ZipFile(trt_bindings_wheel) as z:
        so = z.read("tensorrt_bindings/tensorrt.so")
    return set(re.findall(rb"[\x21-\x7e]{2,}(?=\x00)", so))


def _in_so(strings, name: str) -> bool:
    b = name.encode()
    return b in strings or any(s.endswith(b) for s in strings)


@pytest.mark.parametrize("source", [BUILD, EXECUTOR])
def test_tensorrt_11_path_names_are_in_the_11_4_bindings(bindings_strings, source):
    uses = api_uses(ROOT / source, HOLDERS[source])
    names = {n for root, chain, rtx_only in uses["chains"] if not rtx_only for n in chain}
    assert names, source
    missing = sorted(n for n in names if not _in_so(bindings_strings, n))
    assert not missing, f"{source} uses names TensorRT 11.4 does not have: {missing}"


def test_the_presence_check_discriminates(bindings_strings):
    for gone in ("execute_async_v2", "get_binding_index", "max_workspace_size_bytes", "set_calibration_profile_v2",
                 "set_compute_capability"):  # the last: TensorRT for RTX only
        assert not _in_so(bindings_strings, gone), gone


def test_quickly_deployable_plugin_names_are_on_tensorrt_11_4_classes(trt_bindings_wheel, tmp_path):
    """What plugins/tensorrt.py uses of tensorrt.plugin, looked up exactly on TensorRT 11.4's real classes."""
    from helpers import tensorrt_plugin_api

    holders = {"trtp": "", "launch": "KernelLaunchParams", "desc": "TensorDesc", "src": "TensorDesc",
               "expr": "ShapeExpr"}
    uses = api_uses(ROOT / "plugins/tensorrt.py", holders)
    with tensorrt_plugin_api(trt_bindings_wheel, tmp_path) as trtp:
        missing = []
        for root, chain, _ in uses["chains"]:
            obj = trtp if holders[root] == "" else getattr(trtp, holders[root])
            name = chain[0]
            if holders[root] == "KernelLaunchParams":  # its attributes are set in __init__, validated in __setattr__
                ok = name in inspect.signature(obj.__init__).parameters
            else:
                ok = hasattr(obj, name)
            if not ok:
                missing.append(f"{root}.{name}")
    assert len(uses["chains"]) >= 10
    assert not missing, f"plugins/tensorrt.py uses names TensorRT 11.4's tensorrt.plugin does not have: {missing}"
