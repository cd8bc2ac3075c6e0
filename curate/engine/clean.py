"""`curate clean OUT --pool / --work`: delete an output folder's pool or work area, under its lock."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from curate import storage
from curate.engine.disk import tree_bytes
from curate.engine.lock import OutputLock
from curate.files import RunLayout
from curate.stage import RecipeError


@dataclass
class Removed:
    """One folder `clean` deleted, and how many bytes it held."""

    path: str
    bytes: int | None  # None on an object store (not summed)


def folder_bytes(folder: storage.Location) -> int | None:
    """Bytes of every file under a local `folder` (0 when it does not exist; None on an object store)."""
    return tree_bytes(folder) if isinstance(folder, Path) else None


def clean_output(root: storage.Location | str, *, pool: bool, work: bool, break_lock: bool = False,
                 say: Callable[[str], None] | None = None) -> list[Removed]:
    """Delete the pool (`pool`) and/or the work area (`work`) of the output folder `root`; return what went.

    Refused (RecipeError) when `root` is not a curate output. The folder's lock is held throughout,
    so a run in progress is never cleaned under its feet. The manifest, shards and drop log stay: a
    finished output stays valid (`curate verify`), but a re-selection will have to fetch again.
    """
    layout = RunLayout(root)
    if not layout.manifest.exists() and not layout.run_info.exists() and not layout.pool.exists():
        raise RecipeError("not a curate output folder (no manifest.json, _work/run.json or _pool/)",
                          file=str(layout.root))
    removed = []
    with OutputLock(layout.root, break_lock=break_lock, say=say):
        for wanted, folder in ((pool, layout.pool), (work, layout.work)):
            if wanted and folder.exists():
                size = folder_bytes(folder)
                storage.remove_tree(folder)
                removed.append(Removed(str(folder), size))
    return removed
