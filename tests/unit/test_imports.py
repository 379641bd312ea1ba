"""The import graph of lh_dist, read from the sources (nothing is imported): it has no cycle, its
layers point down, no module imports a command-line module, and DeepSpeed stays in three modules.

Every import counts, those inside functions too: a lazy import still ties the two modules together."""

import ast
import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Lowest first; a module belongs to its longest prefix here. A module may import modules of its own
# package or of a lower layer. The config's error, and the modules that own the values and rules of
# config fields (the attention backends, the Lighthouse parameters, layout and scorers, the CP
# exchanges, the devices) sit below the config, which takes them from there while it validates.
LAYERS = {
    "lh_dist.errors": 0,
    "lh_dist.ops.lighthouse.params": 1, "lh_dist.ops.lighthouse.layout": 1, "lh_dist.ops.lighthouse.scorers": 1,
    "lh_dist.ops.attention": 1, "lh_dist.parallel.comm": 1, "lh_dist.parallel.device": 1,
    "lh_dist.config": 2,
    "lh_dist.model": 3, "lh_dist.ops": 3, "lh_dist.data": 3,
    "lh_dist.parallel": 4,
    "lh_dist.assembly": 5, "lh_dist.checkpoint": 5,
    "lh_dist.train": 6, "lh_dist.eval": 6,
    # Import and export write and read checkpoints as training does; the mapping itself sits beside the model.
    "lh_dist.hf": 7, "lh_dist.hf.mapping": 3,
}
DEEPSPEED_MODULES = {"lh_dist.train.engine", "lh_dist.parallel.distributed", "lh_dist.checkpoint.format"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((REPO / "lh_dist").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _written_names(name: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The module names one import statement of module `name` imports, as written (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    base = node.module or ""
    if node.level:
        up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join(up + ([base] if base else []))
    # `from pkg import module` imports the module; `from module import name`, the module.
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}


def _imported_names(name: str, path: Path) -> set[str]:
    """Every module name that `name` imports, as written (relative imports resolved)."""
    return {written for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.Import, ast.ImportFrom)) for written in _written_names(name, node)}


def _lh_dist_module(imported: str) -> str:
    """The lh_dist module an imported name lives in (`lh_dist.a.b.func`: lh_dist.a.b), or ""."""
    while imported and imported not in MODULES:
        imported = imported.rpartition(".")[0]
    return imported


def _lh_dist_imports(name: str) -> set[str]:
    """The lh_dist modules `name` imports (the module itself, for `from . import x` in a package, left out)."""
    return {_lh_dist_module(imported) for imported in _imported_names(name, MODULES[name])} - {"", name}


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
    assert "lh_dist.checkpoint.format" in GRAPH["lh_dist.eval.runner"]


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


@functools.lru_cache(maxsize=None)
def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), str(MODULES[name]))


def _lazy_exports(name: str) -> tuple[set[str], set[str]]:
    """(names a module's top level binds, lh_dist modules its lazy `__getattr__` imports): asking the
    module for a name it does not bind runs `__getattr__`, and with it those imports."""
    bound, lazy = set(), set()
    for node in _tree(name).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound |= {t.id for t in targets if isinstance(t, ast.Name)}
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            lazy = {_lh_dist_module(w) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for w in _written_names(name, n)} - {"", name}
    return bound, lazy


def _imports_by_placement(name: str) -> tuple[set[str], set[str]]:
    """(lh_dist modules that `name` imports when it is imported, those it imports later inside functions):
    class bodies run on import, function bodies when called; a package's `__getattr__` when `from package
    import x` asks it for x."""
    tree = _tree(name)
    now, later = set(), set()

    def visit(node, inside_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not (child.name == "__getattr__" and node is tree):
                    visit(child, True)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                modules = {_lh_dist_module(written) for written in _written_names(name, child)} - {"", name}
                if isinstance(child, ast.ImportFrom):
                    for module in list(modules):
                        bound, lazy = _lazy_exports(module)
                        if any(a.name not in bound and f"{module}.{a.name}" not in MODULES for a in child.names):
                            modules |= lazy
                (later if inside_function else now).update(modules)
            else:
                visit(child, inside_function)

    visit(tree, False)
    return now, later


def _loaded_by_importing(name: str) -> set[str]:
    """Every lh_dist module that `import name` runs: its packages' __init__ files, its module-level
    imports, and theirs, transitively."""
    loaded, todo = set(), [name]
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for new in [".".join(parts[:i]) for i in range(1, len(parts) + 1)]:
            if new in MODULES and new not in loaded:
                loaded.add(new)
                todo.append(new)
        todo += [m for m in _imports_by_placement(module)[0] if m not in loaded]
    return loaded


def test_validating_a_config_registers_no_custom_op():
    # Loading and validating a config (lh-train --dry-run, the launchers' checks) must not register
    # the kernels' torch.library ops: it would tie the config to the kernels and their import cost.
    registering = {name for name, path in MODULES.items() if "torch.library.custom_op" in path.read_text()}
    assert {"lh_dist.ops.attention.ops", "lh_dist.ops.lighthouse.ops"} <= registering
    loaded = _loaded_by_importing("lh_dist.config")
    assert {"lh_dist.ops.attention.dispatch", "lh_dist.ops.lighthouse.params"} <= loaded  # the graph is read
    assert not loaded & registering, f"importing lh_dist.config loads {sorted(loaded & registering)}"
    # Validation calls into these modules; an import inside one of their functions could load more.
    later = {m for name in loaded for m in _imports_by_placement(name)[1]} - loaded
    assert not later, f"functions of modules the config loads import {sorted(later)}"
