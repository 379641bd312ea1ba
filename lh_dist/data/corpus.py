"""Document sources: each yields `(name, text)` pairs in a deterministic order.

The name identifies a document for the train/validation split, so it must not
depend on the machine's state beyond the inputs given.
"""

import fnmatch
import glob
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Installed third-party packages are not part of the standard library.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """Directory of this interpreter's standard-library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> Iterator[tuple[str, str]]:
    """Every readable `*.py` file of the standard library, sorted by relative path.

    The built-in corpus: it exists on every machine with Python, so quick starts
    and tests need no download. Files that are not valid UTF-8 are skipped.
    """
    root = stdlib_root()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        paths += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    for rel in sorted(p.relative_to(root).as_posix() for p in paths):
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield rel, text


def _expand(patterns: list[str]) -> list[Path]:
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [p for p in Path(pattern).rglob("*") if p.is_file()]
        else:
            found = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"no files match {pattern!r}")
        files += sorted(found)
    return list(dict.fromkeys(files))  # drop repeats, keep order


def text_documents(patterns: list[str]) -> Iterator[tuple[str, str]]:
    """One document per text file; each pattern is a folder (read recursively) or a glob."""
    for path in _expand(patterns):
        try:
            yield path.as_posix(), path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text: {e}") from None


def jsonl_documents(patterns: list[str], field: str = "text") -> Iterator[tuple[str, str]]:
    """One document per line of JSON Lines files, its text taken from `field`."""
    for path in _expand(patterns):
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path.as_posix()}:{line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON: {e}") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise ValueError(f"{where}: expected an object with a string field {field!r}")
                yield where, record[field]


def tree_documents(
    roots: list[str], include: list[str], exclude: list[str] = (), depth: int | None = None,
    log=print,
) -> Iterator[tuple[str, str]]:
    """Documents made of the files of directory trees, e.g. source code grouped by package.

    A file is taken when its path relative to its root matches an `include` glob
    and no `exclude` glob (`fnmatch` rules: `*` also matches `/`, so `*.py`
    matches at any depth and `*/tests/*` drops tests folders below the top). Files are
    grouped into documents by directory: with `depth=None`, one document per
    directory holding the files directly in it; with `depth=N`, one document per
    directory N levels below the root, holding its whole subtree (files above
    that level go with their own directory). Within a document the files follow
    the walk order (a directory's files, then its subdirectories, each sorted by
    name), each preceded by a line `# file: <relative path>`. A document is named
    `<root as given>:<directory>`, so the same roots, given the same way, give the
    same split. Files that are not UTF-8 are skipped and counted.
    """
    if not include:
        raise ValueError("tree needs at least one --include glob, e.g. '*.py'")
    if depth is not None and depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    skipped = 0
    for root in roots:
        base = Path(root)
        if not base.is_dir():
            raise NotADirectoryError(f"tree root {root} is not a directory")
        key, parts = None, []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(base).as_posix()
            components = [] if rel_dir == "." else rel_dir.split("/")
            dir_key = "/".join(components if depth is None else components[:depth]) or "."
            if dir_key != key:
                if parts:
                    yield f"{root}:{key}", "".join(parts)
                key, parts = dir_key, []
            for name in sorted(filenames):
                rel = name if not components else f"{rel_dir}/{name}"
                if not any(fnmatch.fnmatch(rel, g) for g in include) or any(fnmatch.fnmatch(rel, g) for g in exclude):
                    continue
                try:
                    text = Path(dirpath, name).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    skipped += 1
                    continue
                parts.append(f"# file: {rel}\n{text}\n")
        if parts:
            yield f"{root}:{key}", "".join(parts)
    if skipped:
        log(f"lh-data: skipped {skipped} files that are not readable UTF-8 text")
