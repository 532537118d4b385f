"""The package's shape (docs/development.md): layered sub-packages, imports with no cycles, and the loop imported
by nothing it uses. Sizes (arguments, statements, branches, line length) are ruff's, configured in pyproject.toml
and run by test_lint.py."""

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
    tree = ast.parse(path.read_text())
    for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]:
        block.body = []  # imports for annotations only
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


# Each layer may import the ones before it, never one after: the base (errors, system, distributed) knows no other
# part; run/ (files, untrusted input, the checkpoint format) only the base; data/ and models/ the base and run/;
# report/ those before it; loop/ and tasks/ (what a run learns: its metrics and losses are the loop's) everything
# but cli/; cli/ (the commands, config building, Hydra) everything.
LAYERS = {"base": 0, "run": 1, "data": 2, "models": 2, "report": 3, "loop": 4, "tasks": 4, "cli": 5}
BASE = {"trainer.errors", "trainer.system", "trainer.distributed"}


def layer(module: str) -> str:
    return "base" if module in BASE else module.split(".")[1]


def test_each_layer_imports_only_the_layers_below_it():
    upward = sorted(f"{name} -> {dep}" for name, deps in GRAPH.items() if name != "trainer" for dep in deps
                    if dep != "trainer" and LAYERS[layer(dep)] > LAYERS[layer(name)])
    assert not upward


def test_the_package_imports_its_commands_lazily_and_only_for_defaults():
    # trainer.Trainer, trainer.TrainerOptions, trainer.defaults
    assert GRAPH["trainer"] == {"trainer.loop.trainer", "trainer.loop.options", "trainer.cli.options"}


def test_the_loop_is_imported_by_none_of_its_collaborators():
    importers = {name for name, deps in GRAPH.items()
                 if "trainer.loop.trainer" in deps and not name.startswith("trainer.cli.")}
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
