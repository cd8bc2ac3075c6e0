"""Which files a document source reads: one file, every matching file of a folder, or a glob."""

from __future__ import annotations

import glob
import os

from curate.stage import RecipeError


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
