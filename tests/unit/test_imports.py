"""The import graph of lh_dist, read from the sources (nothing is imported): it has no cycle, its
layers point down, no module imports a command-line module, and DeepSpeed stays in three modules.

Every import counts, those inside functions too: a lazy import still ties the two modules together."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Lowest first; a module belongs to its longest prefix here. A module may import modules of its own
# package or of a lower layer. The kernels' argument rules (and what they name: the attention
# backends, the Lighthouse layout and scorers) sit below the config, which applies them while it validates.
LAYERS = {
    "lh_dist.ops.lighthouse.params": 0, "lh_dist.ops.lighthouse.layout": 0, "lh_dist.ops.lighthouse.scorers": 0,
    "lh_dist.ops.attention": 0,
    "lh_dist.config": 1,
    "lh_dist.model": 2, "lh_dist.ops": 2, "lh_dist.data": 2,
    "lh_dist.parallel": 3,
    "lh_dist.runtime": 4,
    "lh_dist.train": 5, "lh_dist.eval": 5,
    # Import and export write and read checkpoints as training does; the mapping itself sits beside the model.
    "lh_dist.hf": 6, "lh_dist.hf.mapping": 2,
}
DEEPSPEED_MODULES = {"lh_dist.train.engine", "lh_dist.runtime.distributed", "lh_dist.runtime.checkpoint"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((REPO / "lh_dist").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _imported_names(name: str, path: Path) -> set[str]:
    """Every module name that `name` imports, as written (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import module` imports the module; `from module import name`, the module.
            names |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return names


def _lh_dist_imports(name: str) -> set[str]:
    """The lh_dist modules `name` imports (the module itself, for `from . import x` in a package, left out)."""
    found = set()
    for imported in _imported_names(name, MODULES[name]):
        while imported and imported not in MODULES:
            imported = imported.rpartition(".")[0]  # `from lh_dist.a.b import func`: module lh_dist.a.b
        if imported and imported != name:
            found.add(imported)
    return found


GRAPH = {name: _lh_dist_imports(name) for name in MODULES}


def _layer(name: str) -> int:
    prefixes = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    assert prefixes, f"{name} belongs to no layer of LAYERS"
    return LAYERS[max(prefixes, key=len)]


def _package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_the_graph_is_read_from_the_sources():
    # The reader finds what is there, so an empty graph cannot pass the checks below.
    assert "lh_dist.parallel.mesh" in GRAPH["lh_dist.train.loop"]
    assert "lh_dist.ops.lighthouse.api" in GRAPH["lh_dist.ops.lighthouse"]  # from .api import ...
    assert "lh_dist.runtime.checkpoint" in GRAPH["lh_dist.eval.runner"]


def test_imports_have_no_cycle():
    done, path = set(), []

    def visit(name: str) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        path.append(name)
        for imported in sorted(GRAPH[name]):
            visit(imported)
        path.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)


def test_imports_point_down_the_layers():
    wrong = [f"{name} -> {imported}" for name, imports in sorted(GRAPH.items()) for imported in sorted(imports)
             if _package(imported) != _package(name) and _layer(imported) >= _layer(name)]
    assert not wrong, "imports that do not point to a lower layer: " + ", ".join(wrong)


def _script_modules() -> set[str]:
    """The modules of pyproject.toml's [project.scripts] (read by hand: tomllib is Python 3.11+)."""
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r'^\s*[\w-]+\s*=\s*"([\w.]+):\w+"', section, re.M))


def test_no_module_imports_a_command_line_module():
    clis = _script_modules() | {name for name in MODULES if name.endswith(".cli")}
    assert {"lh_dist.train.cli", "lh_dist.eval.cli", "lh_dist.data.cli", "lh_dist.hf.export",
            "lh_dist.hf.importer"} <= clis
    wrong = [f"{name} -> {cli}" for name, imports in sorted(GRAPH.items()) for cli in sorted(imports & clis)]
    assert not wrong, "modules importing a command-line module: " + ", ".join(wrong)


def test_evaluation_needs_nothing_of_training():
    wrong = [f"{name} -> {imported}" for name, imports in sorted(GRAPH.items()) if name.startswith("lh_dist.eval")
             for imported in sorted(imports) if imported.startswith("lh_dist.train")]
    assert not wrong, ", ".join(wrong)


def test_deepspeed_is_imported_in_three_modules_only():
    users = {name for name, path in MODULES.items()
             if any(n == "deepspeed" or n.startswith("deepspeed.") for n in _imported_names(name, path))}
    assert users == DEEPSPEED_MODULES
