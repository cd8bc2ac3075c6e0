"""Which files a document source reads: one file, every matching file of a folder, or a glob."""

from __future__ import annotations

import glob
import os

from curate.stage import RecipeError


def absolute(path: str, recipe_dir: str) -> str:
    """`path` (with ~) made absolute against the recipe's directory."""
    return os.path.abspath(os.path.join(recipe_dir, os.path.expanduser(path)))


def input_files(path: str, suffixes: tuple[str, ...], what: str) -> list[str]:
    """The files to read, in a fixed (sorted) order.

    `path` is a file (taken whatever its name), a folder (every file below it whose name ends
    with one of `suffixes`, case-insensitive) or a glob pattern. Raises RecipeError when
    nothing matches.
    """
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = []
        for folder, _, names in os.walk(path):
            found += [os.path.join(folder, n) for n in names if n.lower().endswith(suffixes)]
        files = sorted(found)
        if not files:
            raise RecipeError(f"no {what} ({', '.join(suffixes)}) in folder {path}", path="source.path")
        return files
    if glob.has_magic(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if files:
            return files
    raise RecipeError(f"{what} not found: {path}", path="source.path")


def dataset_name(path: str) -> str:
    """A default dataset name: the file or folder name without its extensions."""
    name = os.path.basename(os.path.normpath(path.split("*", 1)[0])) or "documents"
    return name.split(".", 1)[0] or name
