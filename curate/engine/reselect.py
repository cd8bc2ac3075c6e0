"""Running a changed recipe on an output that exists: what its pool allows, and replacing the previous output.

The pool records what its rows and images are (`_pool/pool.json`): the source, the trial's part of it,
the input file's state and the settings that shape the stored images (the `pool_params` of the stages
that provide them: fetch's resize and encode). A recipe that changes any of these cannot use the pool
(OutputConflict, naming each key as old -> new); a trial that takes more of the same source extends it.
Anything else (thresholds, gates, dedup, roles, outputs, models, fetch settings that admit more) is a
re-selection: the output's earlier work area is set aside, the annotations are reused where they still
stand, and the output files the previous output had and this one does not write are deleted at the end.
"""

from __future__ import annotations

import json
from contextlib import suppress
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from curate import storage
from curate.engine.lock import is_lock_file
from curate.engine.split import INPUT_PHASE
from curate.files import RunLayout, read_json, write_json
from curate.recipe import TrialSpec
from curate.stage import RecipeError, Stage

POOL_RECORD = "pool.json"
REPLACED = "replaced.json"  # in the work area: the files of the output a re-selection replaces
KEPT_IN_WORK = ("retry.json",)  # what a re-selection keeps of the work area (a retry's record)


class PoolMismatch(RecipeError):
    """The recipe changes what the pool's rows or images are."""


def pool_record(loaded: Any, source: Any, stages: list[Stage]) -> dict[str, Any]:
    """What the pool's rows and images are, for this recipe: source, trial, input file, image settings."""
    source_params = loaded.source_params.model_dump(mode="json")
    path = source_params.get("path")
    if isinstance(path, str) and not storage.is_remote(path):  # as the recipe's hash has it: from the recipe's folder
        source_params["path"] = str((Path(loaded.directory) / Path(path).expanduser()).resolve())
    images = {}
    for stage in stages:
        params = stage.params.model_dump(mode="json")
        for name in sorted(stage.pool_params):
            images[f"{stage.name}.{name}"] = params.get(name)
    trial = loaded.recipe.trial
    return {"source": {"type": loaded.source_type, **source_params}, "images": images,
            "trial": trial.model_dump(mode="json") if trial.active else None,
            "input_file": source.input_file_state()}


def record_file(layout: RunLayout) -> storage.Location:
    return layout.pool / POOL_RECORD


def read_record(layout: RunLayout) -> dict[str, Any] | None:
    """The pool record of an output (None: it has no pool, or was made before pools recorded themselves)."""
    file = record_file(layout)
    try:
        return read_json(file) if file.exists() else None
    except ValueError:
        return None


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Each key whose value differs, as `key: old -> new` (nested keys joined with dots)."""
    found = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            found += differences(before, after, f"{prefix}{key}.")
        elif before != after:
            found.append(f"{prefix}{key}: {_show(before)} -> {_show(after)}")
    return found


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def check_pool(old: dict[str, Any], new: dict[str, Any], where: str, advice: str) -> None:
    """Refuse (PoolMismatch) a recipe whose source or image settings differ from the pool's."""
    changed = differences({"source": old.get("source") or {}, "images": old.get("images") or {}},
                          {"source": new["source"], "images": new["images"]})
    if changed:
        raise PoolMismatch(f"the pool of {where} holds other rows or images than this recipe makes ("
                           + "; ".join(changed) + f"); {advice}", path="source")
    if not trial_covers(new.get("trial"), old.get("trial")):
        raise PoolMismatch(f"the pool of {where} holds rows this trial does not take (pool: "
                           f"{_trial_text(old.get('trial'))}, this recipe: {_trial_text(new.get('trial'))}); {advice}",
                           path="trial")


def trial_covers(new: dict[str, Any] | None, old: dict[str, Any] | None) -> bool:
    """Whether the rows of trial `new` (None: every row) include every row of trial `old`."""
    if new is None:
        return True
    if old is None:
        return False
    new_trial, old_trial = TrialSpec.model_validate(new), TrialSpec.model_validate(old)
    if new_trial.sample is not None:
        if old_trial.sample is None or old_trial.seed != new_trial.seed or old_trial.sample > new_trial.sample:
            return False
    if new_trial.limit is None:
        return True
    # with a limit, the sampled rows must be the same, and the first `limit` of them a longer prefix
    return old_trial.limit is not None and old_trial.sample == new_trial.sample and \
        old_trial.seed == new_trial.seed and old_trial.limit <= new_trial.limit


def _trial_text(trial: dict[str, Any] | None) -> str:
    if trial is None:
        return "every input row"
    parts = [f"--limit {trial['limit']}"] if trial.get("limit") else []
    if trial.get("sample") is not None:
        parts.append(f"--sample {trial['sample']} --seed {trial.get('seed', 0)}")
    return " ".join(parts)


def start_reselection(layout: RunLayout) -> None:
    """Set the previous output aside: note its files (to delete those this run does not write again), then
    clear the work area of the previous recipe and remove its manifest, so the folder reads as unfinished."""
    replaced = layout.work / REPLACED
    files = read_json(replaced)["files"] if replaced.exists() else output_files(layout)
    kept = {name: read_json(layout.work / name) for name in KEPT_IN_WORK if (layout.work / name).exists()}
    storage.remove_tree(layout.work, ignore_errors=True)
    layout.work.mkdir(parents=True, exist_ok=True)
    for name, data in kept.items():
        write_json(layout.work / name, data)
    write_json(replaced, {"files": files})
    layout.manifest.unlink(missing_ok=True)


def output_files(layout: RunLayout) -> dict[str, list[int]]:
    """Every file of the output folder but the pool, the work area, retries and the lock: path -> [size, mtime]."""
    fs, root = storage.filesystem_and_path(layout.root)
    found = {}
    skipped = ("_pool/", "_work/", "_retry/")
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(root):].lstrip("/")
        if relative.startswith(skipped) or is_lock_file(relative):
            continue
        found[relative] = [info.size, info.mtime_ns]
    return found


def sweep_replaced(layout: RunLayout) -> list[str]:
    """Delete the previous output's files that this run did not write (unchanged since it was set aside), and
    folders left empty; return the files deleted."""
    replaced = layout.work / REPLACED
    if not replaced.exists():
        return []
    before = read_json(replaced)["files"]
    now = output_files(layout)
    gone = sorted(path for path, state in before.items() if now.get(path) == state)
    for path in gone:
        (layout.root / path).unlink(missing_ok=True)
    folders = {path.rsplit("/", 1)[0] for path in gone if "/" in path}
    for folder in sorted(folders, key=len, reverse=True):
        location = layout.root / folder
        if isinstance(location, Path):  # an object store has no empty folders
            with suppress(OSError):
                location.rmdir()
    replaced.unlink(missing_ok=True)
    return gone


def has_split(layout: RunLayout) -> bool:
    """Whether the output holds a finished input split of its own."""
    return (layout.phase_dir(INPUT_PHASE) / "_SUCCESS.json").exists()
