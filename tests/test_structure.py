"""The tree's structure, read from the AST: no import cycle between trtfalcon's modules (plugins/ installed as
trtfalcon.plugins), and no private (_underscore) name imported from another module, in the package, its tests and
the bench scripts.

Every import counts wherever it stands (module level, inside a function, under `if TYPE_CHECKING:`): a
function-level import hides a cycle from Python, not from the next reader. Importing `a.b.c` also runs the
package `a.b`'s __init__, so it counts as importing that package too (unless the importer is inside it).
A private name is one that starts with one underscore: a `_module`, a `from m import _name`, or `m._name` read
through an imported module.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where each package's modules live: plugins/ is installed as trtfalcon.plugins (pyproject.toml's package-dir)
PACKAGES = {"trtfalcon": ROOT / "trtfalcon", "trtfalcon.plugins": ROOT / "plugins"}
# trees of scripts and tests that import trtfalcon but are not part of it: only their private imports are checked
CLIENTS = (ROOT / "tests", ROOT / "bench")

# Known private imports, each (file relative to the repository root, the private module or name it imports); nothing
# else may be added, and the test fails on an entry nothing needs any more. None today.
ALLOWED_PRIVATE: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    """One name an import statement takes: `target` the module it imports (and runs), `name` the name it takes
    from that module where the statement takes one that is not a module itself (`from m import name`)."""

    file: Path
    line: int
    importer: str | None  # the importing module's name; None for a test or script outside the packages
    target: str
    name: str | None = None

    def where(self, root: Path) -> str:
        what = f"{self.target}.{self.name}" if self.name else self.target
        return f"{_relative(self.file, root)}:{self.line} imports {what}"


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def find_modules(packages: dict[str, Path]) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__) for every .py file under each package's folder."""
    modules: dict[str, tuple[Path, bool]] = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            modules[".".join([package, *parts])] = (path, is_package)
    return modules


def read_imports(path: Path, importer: str | None, is_package: bool, modules: dict) -> list[Import]:
    """Every import of a module in `modules` that the file at `path` makes, wherever the statement stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []
    bound: dict[str, str] = {}  # local name -> the module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules or any(m.startswith(alias.name + ".") for m in modules):
                    found.append(Import(path, node.lineno, importer, alias.name))
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importer's package
                base = (importer or "").split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in modules:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:  # `from package import module`
                    found.append(Import(path, node.lineno, importer, sub))
                    bound[alias.asname or alias.name] = sub
                else:
                    found.append(Import(path, node.lineno, importer, source, alias.name))
    # `module._name` read through a name an import bound to one of the modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                module = ".".join([bound[value.id], *chain])
                if module in modules:
                    found.append(Import(path, node.lineno, importer, module, node.attr))
    return found


def import_graph(packages: dict[str, Path]) -> tuple[dict[str, dict[str, Import]], list[Import]]:
    """(module -> the modules it imports, each with the first import statement that does; every import made)."""
    modules = find_modules(packages)
    graph: dict[str, dict[str, Import]] = {name: {} for name in modules}
    every: list[Import] = []
    for name, (path, is_package) in modules.items():
        for imp in read_imports(path, name, is_package, modules):
            every.append(imp)
            parts = imp.target.split(".")
            # the target and the packages above it that the importer is not inside (their __init__ runs too)
            for n in range(len(parts), 0, -1):
                target = ".".join(parts[:n])
                if target == name or name.startswith(target + "."):
                    break
                if target in modules:
                    graph[name].setdefault(target, imp)
    return graph, every


def find_cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One shortest cycle (a, b, ..., a) through each group of modules that import each other (Tarjan's strongly
    connected components, then a breadth-first search back to the group's first module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:
        start, members = group[0], set(group)
        came_from: dict[str, str] = {}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            if start in graph[v]:
                path = [start]
                while v != start:
                    path.insert(1, v)
                    v = came_from[v]
                cycles.append([*path, start])
                break
            for w in sorted(graph[v]):
                if w in members and w not in came_from and w != start:
                    came_from[w] = v
                    queue.append(w)
    return cycles


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, Import]], root: Path) -> str:
    steps = "; ".join(graph[a][b].where(root) for a, b in zip(cycle, cycle[1:]))
    return f"{' -> '.join(cycle)} ({steps})"


def private_imports(imports: list[Import]) -> list[Import]:
    """The imports that take a private name or module from another module."""
    out = []
    for imp in imports:
        private_module = any(is_private(part) for part in imp.target.split("."))
        if private_module or (imp.name and is_private(imp.name)):
            out.append(imp)
    return out


def client_imports(trees: tuple[Path, ...], modules: dict) -> list[Import]:
    return [imp for tree in trees for path in sorted(tree.rglob("*.py"))
            for imp in read_imports(path, None, False, modules)]


def check_tree(packages: dict[str, Path], clients: tuple[Path, ...], root: Path,
               allowed: set[tuple[str, str]] = frozenset()) -> list[str]:
    """What is wrong with the tree, one line each: cycles, private imports not in `allowed`, and entries of
    `allowed` nothing needs any more (so that an allowance goes when what needed it goes)."""
    graph, imports = import_graph(packages)
    problems = [f"import cycle: {describe_cycle(c, graph, root)}" for c in find_cycles(graph)]
    used = set()
    for imp in private_imports(imports + client_imports(clients, find_modules(packages))):
        key = (_relative(imp.file, root), imp.target)
        if key in allowed:
            used.add(key)
        else:
            problems.append(f"private name imported across modules: {imp.where(root)}")
    problems += [f"allowance no longer needed (remove it from ALLOWED_PRIVATE): {f} imports {t}"
                 for f, t in sorted(set(allowed) - used)]
    return problems


def test_no_import_cycle_and_no_private_import_across_modules():
    problems = check_tree(PACKAGES, CLIENTS, ROOT, ALLOWED_PRIVATE)
    assert not problems, "\n".join(problems)


def test_the_graph_sees_the_whole_package():
    """A checker that read nothing would pass: the graph holds every module and the imports everyone knows of."""
    graph, _ = import_graph(PACKAGES)
    assert {"trtfalcon.cli", "trtfalcon.plugins.spec", "trtfalcon.checkpoint.deploy"} <= set(graph)
    assert "trtfalcon.checkpoint.deploy" in graph["trtfalcon.checkpoint.convert"]
    assert "trtfalcon.plugins.spec" in graph["trtfalcon.plugins.ops"]  # a function-level import
    assert "trtfalcon.export" in graph["trtfalcon.engine.build"]  # the package's __init__ runs too


# The checker on a synthetic package: it finds what it is meant to find, and names it.

def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def toy(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import helper\n\ndef _hidden():\n    pass\n",
        "pkg/b.py": "def helper():\n    from pkg import c  # a function-level import\n    return c\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import _hidden\n",
        "pkg/d.py": "import pkg._impl as impl\nfrom . import e\nx = e._secret\n",
        "pkg/e.py": "_secret = 1\n_own = _secret\n",
        "pkg/_impl.py": "",
        "pkg/sub/__init__.py": "from pkg.sub.impl import run\n",
        "pkg/sub/impl.py": "from pkg.g import g\ndef run():\n    pass\n",
        "pkg/sub/other.py": "",
        "pkg/g.py": "import pkg.sub.other  # runs pkg/sub/__init__.py\ng = None\n",
        "tests/test_x.py": "from pkg.e import _secret\nfrom pkg.a import helper\n",
    })
    return tmp_path


def test_checker_names_each_cycle_with_its_import_statements(toy):
    graph, _ = import_graph({"pkg": toy / "pkg"})
    cycles = find_cycles(graph)
    assert sorted(cycles) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.g", "pkg.sub", "pkg.sub.impl", "pkg.g"]]
    text = describe_cycle(cycles[0], graph, toy)
    assert "pkg/b.py:2 imports pkg.c" in text and "pkg/c.py:3 imports pkg.a._hidden" in text


def test_checker_names_each_private_import(toy):
    problems = check_tree({"pkg": toy / "pkg"}, (toy / "tests",), toy)
    privates = sorted(p.split(": ", 1)[1] for p in problems if p.startswith("private"))
    assert privates == [
        "pkg/c.py:3 imports pkg.a._hidden",
        "pkg/d.py:1 imports pkg._impl",
        "pkg/d.py:3 imports pkg.e._secret",  # read through the imported module
        "tests/test_x.py:1 imports pkg.e._secret",
    ]
    assert sum(p.startswith("import cycle") for p in problems) == 2


def test_an_allowance_covers_exactly_its_import_and_goes_stale(toy):
    allowed = {("pkg/d.py", "pkg._impl"), ("pkg/gone.py", "pkg._impl")}
    problems = check_tree({"pkg": toy / "pkg"}, (), toy, allowed)
    assert not any("pkg/d.py:1" in p for p in problems)
    assert "pkg/d.py:3 imports pkg.e._secret" in "\n".join(problems)  # same file, another private name
    assert any(p.startswith("allowance no longer needed") and "pkg/gone.py" in p for p in problems)
