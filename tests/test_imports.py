"""The import graph, read from the source (nothing is imported): the runtime imports nothing above it, and no
package's modules import each other in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = "irece_runtime"
ABOVE_RUNTIME = ("server", "export", "benchmarks", "miniworld", "erasure", "irece_cli", "protos")
PACKAGES = (RUNTIME,) + ABOVE_RUNTIME


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages (generated stubs included if present)."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, module_level_only: bool) -> list[tuple[int, str | None, list[str], str]]:
    """(line, absolute module, imported names, source text) of every import in the module: import and from-import
    statements (inside functions too, unless module_level_only) and importlib.import_module / __import__ calls
    with a literal name. The module is None where a relative import climbs out of the top package."""
    source = path.read_text()
    tree = ast.parse(source, str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if module_level_only:  # what runs on import: the module body, its if/try/with/class blocks, not functions
        nodes, stack = [], list(tree.body)
        while stack:
            node = stack.pop()
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                nodes.append(node)
                stack.extend(ast.iter_child_nodes(node))
    else:
        nodes = list(ast.walk(tree))
    out = []

    def text(node):  # only for imports: get_source_segment splits the whole source on every call
        return ast.get_source_segment(source, node)
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, [], text(node)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module
            if node.level:
                base = package.split(".")
                up = node.level - 1
                if up >= len(base):  # `from ...x import y` above the top package
                    out.append((node.lineno, None, [], text(node)))
                    continue
                target = ".".join(base[:len(base) - up] + ([node.module] if node.module else []))
            out.append((node.lineno, target, [a.name for a in node.names], text(node)))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                     or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module"))):
            out.append((node.lineno, node.args[0].value, [], text(node)))
    return out


def upward_imports(root: Path) -> list[str]:
    """Every import in the runtime's modules (anywhere in them) of a package above it, or out of it by a relative
    import."""
    bad = []
    for name, path in modules(root, (RUNTIME,)).items():
        where = path.relative_to(root)
        for line, target, _, text in imports(name, path, module_level_only=False):
            if target is None:
                bad.append(f"{where}:{line}: {text}  (relative import above {RUNTIME})")
            elif target.split(".")[0] in ABOVE_RUNTIME:
                bad.append(f"{where}:{line}: {text}  (imports {target.split('.')[0]})")
    return sorted(set(bad))


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the repo modules whose code it needs when it is imported: module-level statements only (an import
    inside a function runs later, when the modules it needs are complete). `from pkg import name` needs the
    submodule pkg.name where there is one, else pkg itself."""
    mods = modules(root)
    graph = {}
    for name, path in mods.items():
        edges = set()
        for _, target, names, _ in imports(name, path, module_level_only=True):
            for t in [f"{target}.{n}" if f"{target}.{n}" in mods else target for n in names] or [target]:
                if t in mods and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_every_package_is_seen():
    mods = modules(ROOT)
    for pkg in PACKAGES:
        assert pkg in mods, f"{pkg}/__init__.py missing: the checks below would pass vacuously"
    assert f"{RUNTIME}.pipeline" in mods and f"{RUNTIME}.backends.torch_backend" in mods
    # the graph is not empty: the runtime's modules import each other
    assert f"{RUNTIME}.irece" in import_graph(ROOT)[f"{RUNTIME}.pipeline"]


def test_runtime_imports_nothing_above_it():
    bad = upward_imports(ROOT)
    assert not bad, f"{RUNTIME}/ is inference only and must not import {', '.join(ABOVE_RUNTIME)}:\n" + "\n".join(bad)


def test_module_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, "import cycle (module-level imports): " + " -> ".join(cycle)


def test_the_checks_see_what_they_look_for(tmp_path):
    """The checker itself, on a small fake tree: an upward import inside a function, a relative import out of the
    package, and a two-module circle are all found."""
    rt = tmp_path / RUNTIME
    (rt / "sub").mkdir(parents=True)
    (tmp_path / "server").mkdir()
    (rt / "__init__.py").write_text("")
    (rt / "sub" / "__init__.py").write_text("")
    (rt / "a.py").write_text("from . import b\n\ndef f():\n    from server import app\n")
    (rt / "b.py").write_text("import irece_runtime.a\n")
    (rt / "sub" / "c.py").write_text("from ...server import app\nimport importlib\n"
                                     "importlib.import_module('export.x')\n")
    (tmp_path / "server" / "__init__.py").write_text("")
    bad = upward_imports(tmp_path)
    assert len(bad) == 3 and "a.py:4" in bad[0] and "above irece_runtime" in bad[1] and "imports export" in bad[2], bad
    assert find_cycle(import_graph(tmp_path)) == ["irece_runtime.a", "irece_runtime.b", "irece_runtime.a"]
    (rt / "b.py").write_text("def g():\n    import irece_runtime.a\n")  # deferred: no circle at import time
    assert find_cycle(import_graph(tmp_path)) is None
