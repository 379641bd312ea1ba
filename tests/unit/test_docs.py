"""The docs name only what exists: every lh_dist path and dotted name in README.md and docs/*.md.

Read from the sources (nothing is imported). Paths count in two forms: `lh_dist/...` anywhere in the
text, and, inside code spans, paths relative to lh_dist/ (`ops/lighthouse/params.py`, `train/`) and
bare file names (`rope.py`). Relative paths are checked when they name a file (.py) or a folder
(trailing /): other slashed names in code spans are TensorBoard tags (`train/loss`) and the like.
A dotted name (`lh_dist.eval.cli.output_path`) must be a module, then a name its top level binds,
then, below a class, a name the class defines.
"""

import ast
import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "lh_dist"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

PATH = re.compile(r"\blh_dist/[\w./-]*")
DOTTED = re.compile(r"\blh_dist(?:\.[A-Za-z_]\w*)+")
CODE_SPAN = re.compile(r"`([^`\s]+)`")


@functools.lru_cache(maxsize=None)
def _files_named(name: str) -> bool:
    # Hidden folders (.venv, .git) and run outputs hold files of every name; they are not the project's.
    def ours(path: Path) -> bool:
        return not any(part.startswith(".") or part == "runs" for part in path.relative_to(REPO).parts)

    return any(path.is_file() and ours(path) for path in REPO.rglob(name))


def _missing_path(text: str) -> str | None:
    """Why the path `text` names nothing, or None if it exists (or is no lh_dist path)."""
    if text.startswith("lh_dist/"):
        return None if (REPO / text).exists() else "no such file or folder"
    if "/" not in text:
        return None if not text.endswith(".py") or _files_named(text) else "no file of that name in the repository"
    first = text.split("/")[0]
    if not (PACKAGE / first).is_dir() or not text.endswith((".py", "/")):
        return None
    return None if (PACKAGE / text).exists() else "no such file or folder under lh_dist/"


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=None)
def _top_level(path: Path) -> dict[str, ast.AST]:
    """The names a module's top level binds (functions, classes, assignments, imports, __all__)."""
    tree = ast.parse(path.read_text(), str(path))
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
                    if target.id == "__all__":  # names a lazy __getattr__ provides
                        names.update({e.value: node for e in ast.walk(node.value) if isinstance(e, ast.Constant)})
    return names


def _missing_dotted(text: str) -> str | None:
    """Why the dotted name `text` names nothing, or None if it exists."""
    parts = text.split(".")
    for cut in range(len(parts), 0, -1):
        path = _module_file(".".join(parts[:cut]))
        if path is not None:
            break
    attributes = parts[cut:]
    if not attributes:
        return None
    names = _top_level(path)
    if attributes[0] not in names:
        return f"{'.'.join(parts[:cut])} has no {attributes[0]}"
    owner = names[attributes[0]]
    if len(attributes) > 1 and isinstance(owner, ast.ClassDef):
        members = {n.name for n in owner.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        members |= {t.id for n in owner.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        if attributes[1] not in members:
            return f"{'.'.join(parts[:cut + 1])} has no {attributes[1]}"
    return None


def _mentions() -> list[tuple[str, str, str | None]]:
    """(where, what, why it names nothing or None) for every path and dotted name in the docs."""
    found = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            where = f"{doc.relative_to(REPO)}:{number}"
            paths = {m.rstrip(".,:;") for m in PATH.findall(line)} | set(CODE_SPAN.findall(line))
            found += [(where, p, _missing_path(p)) for p in sorted(paths)]
            found += [(where, d, _missing_dotted(d)) for d in sorted({m.rstrip(".") for m in DOTTED.findall(line)})]
    return found


def test_the_checks_catch_what_does_not_exist():
    assert _missing_path("lh_dist/ops/lighthouse/validation.py")
    assert _missing_path("ops/lighthouse/validation.py")
    assert _missing_path("validation.py")
    assert _missing_path("ops/lighthouse/params.py") is None and _missing_path("train/loss") is None
    assert _missing_dotted("lh_dist.ops.attention.forward")
    assert _missing_dotted("lh_dist.ops.lighthouse.params.LighthouseParams.no_such_method")
    assert _missing_dotted("lh_dist.ops.lighthouse.params.LighthouseParams.check") is None
    assert _missing_dotted("lh_dist.ops.attention.attention") is None  # provided lazily, listed in __all__


def test_docs_name_only_what_exists():
    mentions = _mentions()
    checked = {what for _, what, _ in mentions}
    assert {"lh_dist/config.py", "lh_dist.train.cli", "assembly/model.py"} <= checked  # the docs are read
    wrong = [f"{where}: {what} ({why})" for where, what, why in mentions if why is not None]
    assert not wrong, "the docs name what does not exist:\n" + "\n".join(wrong)
