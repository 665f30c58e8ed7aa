"""No import cycle among lsurf's modules, counting the package ``__init__`` modules imports run.

import-linter's layer contracts look at module-to-module imports; they do not see that importing
``lsurf.cli.common`` first runs ``lsurf/cli/__init__.py``. A package ``__init__`` that imports one of
its own modules which imports the package back is a loop that works only as long as the import
order happens to suit it. Here a module-level import of ``a.b.c`` counts as importing ``a`` and
``a.b`` too (their ``__init__`` runs first) unless they are the importer's own parents; imports
inside functions (lazy on purpose) and under ``TYPE_CHECKING`` do not run at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lsurf

ROOT = Path(lsurf.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def run_at_import(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements of ``body`` that run when the module is imported (not ``if TYPE_CHECKING:``)."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            typing_only = "TYPE_CHECKING" in ast.unparse(node.test)
            out += run_at_import(node.orelse if typing_only else node.body + node.orelse)
        elif isinstance(node, ast.Try):
            handlers = [s for h in node.handlers for s in h.body]
            out += run_at_import([*node.body, *handlers, *node.orelse, *node.finalbody])
        else:
            out.append(node)
    return out


def imported(name: str, tree: ast.Module) -> set[str]:
    """Every lsurf module the import of ``name`` runs directly: those it names, and their parent
    packages except its own (whose ``__init__`` is already running when ``name`` is imported)."""
    targets: set[str] = set()
    for node in run_at_import(tree.body):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}: lsurf imports absolutely"
            base = node.module or ""
            targets.add(base)
            targets |= {f"{base}.{a.name}" for a in node.names}
    ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}  # already running
    parents = {t.rsplit(".", k)[0] for t in targets for k in range(1, t.count(".") + 1)}
    return {t for t in targets | (parents - ancestors) if t.split(".")[0] == "lsurf" and t != name}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {m: imported(m, ast.parse(p.read_text())) & set(modules)
            for m, p in modules.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return [*path[path.index(n):], n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_lsurf_imports_have_no_cycle():
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found or [])


def test_the_check_sees_a_loop_through_a_package_init():
    """What lsurf.cli once was: its __init__ imported main, main the commands, a command lsurf.cli.common."""
    init = ast.parse("from lsurf.cli.main import main")
    command = ast.parse("from lsurf.cli import common")
    edges = {"lsurf.cli": imported("lsurf.cli", init), "lsurf.cli.main": {"lsurf.cli.plot"},
             "lsurf.cli.plot": imported("lsurf.cli.plot", command)}
    assert cycle(edges) == ["lsurf.cli", "lsurf.cli.main", "lsurf.cli.plot", "lsurf.cli"]
    lazy = ast.parse("def f():\n    from lsurf.cli import common\n")
    assert imported("lsurf.cli.plot", lazy) == set()
