"""The package's shape: modules small enough to read, and an import graph that flows one way.

- No module in ``grok/`` over ``MAX_MODULE_LINES`` lines, no function over
  ``MAX_FUNCTION_LINES``.
- No module reaches, at any depth and through any import (top-level, inside a function, or
  ``importlib.import_module`` of a literal name), a module that reaches it back. A package's
  ``__init__`` counts as imported by its modules' importers (Python runs it first); the
  top-level ``grok/__init__.py`` is the one exception, since it is the API's front door and
  imports everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "grok"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 125


def oversized(root: Path = PACKAGE) -> list[str]:
    """Every module over ``MAX_MODULE_LINES`` and function over ``MAX_FUNCTION_LINES``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(root.parent)
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            found.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_modules_and_functions_stay_readable():
    assert oversized() == []


def test_the_size_check_sees_a_long_module_and_a_long_function(tmp_path):
    pkg = tmp_path / "grok"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "long.py").write_text(f"def f():\n{body}\n" + "\n" * MAX_MODULE_LINES)
    assert [s.split(":")[0] for s in oversized(pkg)] == ["grok/long.py", "grok/long.py"]


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imported_names(tree: ast.AST, package: str) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names += [f"{base}.{a.name}" for a in node.names] + [base]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.append(node.args[0].value)
    return names


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the grok modules it imports, with the sub-packages Python runs first}."""
    modules = _modules(root)
    top = root.name

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for name in _imported_names(ast.parse(path.read_text()), package):
            if not (name == top or name.startswith(top + ".")):
                continue
            target = resolve(name)
            while target and target != top:
                if target != module and not module.startswith(target + "."):
                    graph[module].add(target)
                target = target.rpartition(".")[0]
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("deferred", [False, True])
def test_a_circle_is_found_even_when_deferred(tmp_path, deferred):
    pkg = tmp_path / "grok"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from grok import a\n")
    (pkg / "a.py").write_text("from grok.sub.b import f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    body = "import importlib\ndef g():\n    importlib.import_module('grok.a')\n"
    (pkg / "sub" / "b.py").write_text(body if deferred else "from grok import a\n")
    assert find_cycle(import_graph(pkg)) == ["grok.a", "grok.sub.b", "grok.a"]
    (pkg / "sub" / "b.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None
