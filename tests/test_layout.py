"""The package's shape (docs/development.md): layered imports with no cycles, the loop imported by nothing it
uses, and files and functions short enough to read."""

import ast
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"
MODULES = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted((SRC / "trainer").rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    """The trainer.* modules `name` imports, at any depth of its code (lazy imports in functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def test_the_loop_is_imported_by_none_of_its_collaborators():
    importers = {name for name, deps in GRAPH.items() if "trainer.trainer" in deps and not name.startswith("trainer.cli.")}
    assert importers <= {"trainer"}, importers  # the package's lazy `trainer.Trainer`; the commands build the loop


def test_the_imports_have_no_cycle():
    done, active = set(), []

    def visit(name):
        if name in active:
            raise AssertionError(" -> ".join(active[active.index(name):] + [name]))
        if name in done:
            return
        active.append(name)
        for dep in GRAPH[name] - {"trainer"}:  # every module imports its package first; that is not a cycle
            visit(dep)
        active.pop()
        done.add(name)

    for name in GRAPH:
        visit(name)


def test_files_and_functions_are_short():
    long_files = {str(p.relative_to(REPO)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 350}
    assert not long_files
    long_functions = {}
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 65:
                long_functions[f"{path.relative_to(REPO)}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
    assert not long_functions


def test_the_loop_class_reads_on_a_few_screens():
    tree = ast.parse((SRC / "trainer" / "trainer.py").read_text())
    loop = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert loop.end_lineno - loop.lineno + 1 <= 270  # 255 before trainer.cuda_graphs and fit_s; issue 26 regroups
