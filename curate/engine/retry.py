"""`curate retry OUTPUT`: fetch again only the rows a finished run dropped for a transient reason.

An output that kept its pool (the default) is retried in place: the recipe runs again over its pool,
the fetch stage fetching only the rows it dropped for a retryable reason
(curate.fetch.reasons.RETRYABLE: timeouts, connection errors, 408/429/5xx, rate limits), the later
stages annotating only the rows recovered, and the whole selection (dedup and top fraction
included) runs over the whole pool: a recovered copy of a kept image is dropped as a copy, as in a
run where its first fetch had not failed. The manifest's `retries` lists every retry. A retry
interrupted is finished by the next `curate retry`.

An output made with `engine.keep_pool: false` has no pool to re-select from; it is retried as a
separate run merged in:

1. The drops of stage `fetch` whose reason is retryable (curate.fetch.reasons.RETRYABLE:
   timeouts, connection errors, 408/429/5xx, rate limits) are selected from the drop log.
2. The recipe recorded in the manifest runs again, its source filtered to those keys, into
   `OUTPUT/_retry/<n>/out` (an ordinary run: it resumes if interrupted and reconciles).
3. The merge is prepared in full first (`_retry/<n>/merge/`: the new drop log, the new
   manifest, and the list of shard moves), then applied: shards moved in under the next free
   part numbers, drop log and manifest replaced, each step atomic and idempotent. A retry
   interrupted during the merge is finished by the next call, which then stops there.

Afterwards, input rows = output rows + dropped rows still holds; the manifest's `retries`
lists every retry. Corpus-wide stages (dedup, top fraction) see the retried rows only.

Only whole-sample drops are retried (drop-log rows with `image` null). Images removed from
documents that were kept (image rows) are not fetched again: the document is in the output
already, and its image rows stay in the drop log as they are. A retried document that is kept
this time brings its own image rows (from the retry's drop log); the stages' counters
(`images_removed.<reason>`) add the retry's.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console

from curate.drop_log import conform_drops, read_drops, sample_drops, sample_mask
from curate.engine.lock import OutputLock
from curate.engine.write import finish_outputs, sinks_of
from curate.files import read_json, sha256_file, write_json, write_table
from curate.manifest.build import caption_variant_counts, field_statistics, image_counts, role_counts
from curate.manifest.summary import drop_log_counts
from curate.manifest.validate import validate_manifest
from curate.stage import RecipeError

RETRY_DIR = "_retry"
RETRY_RECORD = "retry.json"  # in the work area while an in-place retry runs
FETCH_STAGE = "fetch"


class KeyFilteredSource:
    """A source that yields only the rows of `inner` whose key is in `keys` (same order, same keys)."""

    def __init__(self, inner: Any, keys: set[str]):
        self.inner = inner
        self.keys = pa.array(sorted(keys), pa.string())
        self.name = inner.name
        self.params = inner.params

    def preflight(self) -> None:
        """The wrapped source's checks."""
        self.inner.preflight()

    def iter_batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """The wrapped source's batches, restricted to the retried keys."""
        for batch in self.inner.iter_batches(batch_rows):
            chosen = batch.filter(pc.is_in(batch.column("key"), value_set=self.keys))
            if chosen.num_rows:
                yield chosen

    def describe(self) -> dict[str, Any]:
        """The wrapped source's description plus how many keys are retried."""
        return {**self.inner.describe(), "retried_keys": len(self.keys)}

    def input_file_state(self) -> dict[str, int] | None:
        """The wrapped source's input file state."""
        return self.inner.input_file_state()


def retryable_keys(drops: pa.Table) -> dict[str, str]:
    """key -> reason of the fetch drops a later attempt may cure.

    Only whole-sample drops (drop-log rows with `image` null): an image removed from a document that was kept
    (fetch `on_image_failure: drop_image`) is not fetched again, since its document is already in the output.
    """
    from curate.fetch.reasons import RETRYABLE

    wanted = pc.and_(pc.equal(drops.column("stage"), FETCH_STAGE),
                     pc.is_in(drops.column("reason"), value_set=pa.array(sorted(RETRYABLE), pa.string())))
    wanted = pc.and_(wanted, sample_mask(drops))
    chosen = drops.select(["key", "reason"]).filter(pc.fill_null(wanted, False))
    return dict(zip(chosen.column("key").to_pylist(), chosen.column("reason").to_pylist()))


def retry(output: Path, console: Console, overrides: list[str] | None = None, address: str | None = None,
          verbose: bool = False, progress: bool = True, break_lock: bool = False) -> dict[str, Any]:
    """Retry the transient fetch failures of the complete output at `output`; return the new manifest.

    The output folder's lock is held throughout (OutputLocked while another process holds it, unless `break_lock`).
    """
    output = output.resolve()
    with OutputLock(output, break_lock=break_lock,
                    say=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)):
        return _retry(output, console, overrides, address, verbose, progress)


def _retry(output: Path, console: Console, overrides: list[str] | None, address: str | None, verbose: bool,
           progress: bool) -> dict[str, Any]:
    """retry(), with the output folder's lock held."""
    manifest_file = output / "manifest.json"
    unfinished = output / "_work" / RETRY_RECORD
    if not manifest_file.exists() and unfinished.exists():
        console.print("[yellow]finishing[/] the interrupted retry")
        return _retry_in_pool(output, read_json(unfinished), console, overrides, address, verbose, progress)
    if not manifest_file.exists():
        raise RecipeError("not a complete curate output (no manifest.json); finish the run first", file=str(output))
    pending = sorted((output / RETRY_DIR).glob("*/merge/plan.json"))
    if pending:  # the previous retry stopped during its merge: finishing it completes that retry
        console.print(f"[yellow]finishing[/] the interrupted merge of retry {pending[0].parent.parent.name}")
        return _apply_merge(output, pending[0].parent)
    manifest = read_json(manifest_file)
    drops = read_drops(output / manifest["drop_log"]["path"])  # an old log without `image`: all sample rows
    keys = retryable_keys(drops)
    if not keys:
        console.print("nothing to retry: no fetch drop has a retryable reason")
        return manifest
    console.print(f"retrying {len(keys)} rows: {dict(sorted(Counter(keys.values()).items()))}")
    attempt = len(manifest.get("retries", [])) + 1
    if (manifest.get("pool") or {}).get("kept") and (output / "_pool" / "pool.json").exists():
        record = {"attempt": attempt, "keys": keys, "previous": manifest.get("retries", []),
                  "recipe": manifest["recipe"]}
        return _retry_in_pool(output, record, console, overrides, address, verbose, progress)
    console.print("[yellow]note:[/] this output kept no pool (engine.keep_pool: false): the retried rows run "
                  "apart and are merged in; corpus-wide stages (dedup, top fraction) see them alone")
    work = output / RETRY_DIR / f"{attempt:03d}"
    sub_manifest = _run_subset(manifest, keys, work / "out", console, overrides or [], address, verbose, progress)
    merge = work / "merge"
    _prepare_merge(output, manifest, drops, keys, work / "out", sub_manifest, merge, attempt)
    merged = _apply_merge(output, merge)
    return merged


def _retry_in_pool(output: Path, record: dict[str, Any], console: Console, overrides: list[str] | None,
                   address: str | None, verbose: bool, progress: bool) -> dict[str, Any]:
    """Run the recorded recipe again over the output's own pool, fetching the retryable drops again; the whole
    selection runs over the whole pool. Return the new manifest, with this retry added to `retries`."""
    from curate.engine.run import compile_plan, execute
    from curate.fetch.reasons import RETRYABLE
    from curate.recipe import _apply_override, _validate

    write_json(output / "_work" / RETRY_RECORD, record)  # read again if the retry is interrupted
    data = record["recipe"]["resolved"]
    file = Path(record["recipe"]["file"])
    data = {**data, "output": {**data["output"], "path": str(output)}}
    for override in overrides or []:
        _apply_override(data, override, file)
    plan = compile_plan(_validate(data, file))
    plan.redo = {stage.name: RETRYABLE for stage in plan.stages if stage.fetches_urls}
    started = time.perf_counter()
    manifest = execute(plan, console, address=address, verbose=verbose, progress=progress, lock=False, judge=False)
    keys = record["keys"]
    drops = sample_drops(read_drops(output / manifest["drop_log"]["path"]))
    retried = drops.filter(pc.is_in(drops.column("key"), value_set=pa.array(sorted(keys), pa.string())))
    fetchers = pa.array([s.name for s in plan.stages if s.fetches_urls], pa.string())
    again = retried.filter(pc.is_in(retried.column("stage"), value_set=fetchers))
    manifest["retries"] = [*record["previous"], {
        "attempt": record["attempt"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "retried_rows": len(keys),
        "retried_by_reason": dict(sorted(Counter(keys.values()).items())),
        "recovered_rows": len(keys) - again.num_rows,  # fetched this time (the selection may drop some)
        "kept_rows": len(keys) - retried.num_rows,
        "dropped_again": dict(sorted(Counter(again.column("reason").to_pylist()).items())),
        "seconds": round(time.perf_counter() - started, 3),
        "decisions": manifest.get("decisions", {}),
    }]
    validate_manifest(manifest)
    write_json(output / "manifest.json", manifest)
    (output / "_work" / RETRY_RECORD).unlink(missing_ok=True)
    if (output / "_work").exists() and not any((output / "_work").iterdir()):
        (output / "_work").rmdir()
    return manifest


def _run_subset(manifest: dict[str, Any], keys: dict[str, str], out: Path, console: Console, overrides: list[str],
                address: str | None, verbose: bool, progress: bool) -> dict[str, Any]:
    """Run the manifest's recipe over the retried keys only, into `out`."""
    from dataclasses import replace

    from curate.engine.run import compile_plan, execute
    from curate.recipe import _apply_override, _validate

    data = manifest["recipe"]["resolved"]
    file = Path(manifest["recipe"]["file"])
    data = {**data, "output": {**data["output"], "path": str(out)}, "engine": {**data["engine"], "keep_work": False,
                                                                                     "keep_pool": False}}
    for override in overrides:
        _apply_override(data, override, file)
    plan = compile_plan(_validate(data, file))
    recorded, now = (manifest.get("sources") or [{}])[0].get("input_file"), plan.source.input_file_state()
    if recorded is not None and now is not None and recorded != now:
        raise RecipeError("the input file changed since this output was made, so its rows may no longer match the "
                          "dropped keys; re-run the recipe with --overwrite instead", path="source.path",
                          file=str(getattr(plan.source, "path", "")))
    plan = replace(plan, source=KeyFilteredSource(plan.source, set(keys)))
    return execute(plan, console, address=address, verbose=verbose, progress=progress)


def _prepare_merge(output: Path, manifest: dict[str, Any], drops: pa.Table, keys: dict[str, str], sub_out: Path,
                   sub: dict[str, Any], merge: Path, attempt: int) -> None:
    """Write the merged drop log, the merged manifest and the shard moves under `merge` (nothing applied yet)."""
    moves = []
    shards = list(manifest["outputs"]["shards"])
    for entry in sub["outputs"]["shards"]:
        folder = entry["path"].split("/", 1)[0]
        taken = {Path(s["path"]).name for s in shards if s["path"].startswith(folder + "/")}
        index = len(taken)
        while any(name.startswith(f"part-{index:05d}") for name in taken):
            index += 1
        target = f"{folder}/part-{index:05d}{Path(entry['path']).suffix}"
        moves.append({"from": str(sub_out / entry["path"]), "to": target})
        shards.append({**entry, "path": target})
    retried = pa.array(sorted(keys), pa.string())
    remaining = drops.filter(pc.invert(pc.is_in(drops.column("key"), value_set=retried)))
    new_drops = read_drops(sub_out / sub["drop_log"]["path"])  # its sample rows and its kept documents' image rows
    merged_drops = pa.concat_tables([conform_drops(remaining), new_drops])
    write_table(merge / "drops.parquet", merged_drops)
    merged = _merged_manifest(manifest, sub, keys, shards, merged_drops, merge / "drops.parquet", output, moves,
                              attempt)
    write_json(merge / "manifest.json", merged)
    write_json(merge / "plan.json", {"moves": moves})


def _merged_manifest(manifest: dict[str, Any], sub: dict[str, Any], keys: dict[str, str], shards: list[dict],
                     drops: pa.Table, drops_file: Path, output: Path, moves: list[dict], attempt: int) -> dict:
    merged = {**manifest}
    recovered = sub["outputs"]["rows"]
    merged["stages"] = _merged_stages(manifest["stages"], sub["stages"], keys)
    merged["outputs"] = {**manifest["outputs"], "rows": manifest["outputs"]["rows"] + recovered, "shards": shards}
    counts = drop_log_counts(drops_file)  # sample rows reconcile; image rows are counted apart
    dropped_rows = counts["rows"]
    merged["drop_log"] = {**manifest["drop_log"], "rows": dropped_rows, "image_rows": counts["image_rows"],
                          "sha256": sha256_file(drops_file), "by_reason": counts["by_reason"],
                          "images_by_reason": counts["images_by_reason"]}
    kinds = Counter(manifest.get("kinds", {}))
    kinds.update(sub.get("kinds", {}))
    merged["kinds"] = dict(sorted(kinds.items()))
    parquet_shards = [s for s in shards if s["format"] == "parquet"]
    if parquet_shards:
        files = [_final_path(output, s["path"], moves) for s in parquet_shards]
        images, per_sample = image_counts(files)
        merged["images"] = images
        roles = manifest["recipe"]["resolved"].get("roles") or {}
        merged["roles"] = role_counts(files, [name for name, role in roles.items() if role])
        merged["captions"] = caption_variant_counts(files)
        merged["statistics"] = {**field_statistics(files), "images_per_sample": per_sample.to_json()}
    rows_by_format = {name: sum(s["rows"] for s in shards if s["format"] == name)
                      for name in manifest["outputs"]["formats"]}
    output_rows = merged["outputs"]["rows"]
    input_rows = manifest["reconciliation"]["input_rows"]
    merged["reconciliation"] = {
        "input_rows": input_rows, "output_rows": output_rows, "dropped_rows": dropped_rows,
        "rows_by_format": rows_by_format,
        "ok": input_rows == output_rows + dropped_rows and len(set(rows_by_format.values())) <= 1,
    }
    merged["retries"] = [*manifest.get("retries", []), {
        "attempt": attempt,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "retried_rows": len(keys),
        "retried_by_reason": dict(sorted(Counter(keys.values()).items())),
        "recovered_rows": recovered,
        "dropped_again": dict(sorted(Counter(sample_drops(drops).filter(
            pc.is_in(pc.field("key"), value_set=pa.array(sorted(keys)))).column("reason").to_pylist()).items())),
        "seconds": sub["seconds"],
        "decisions": sub.get("decisions", {}),
    }]
    if not merged["reconciliation"]["ok"]:
        raise RuntimeError(f"retry merge does not reconcile: {merged['reconciliation']}")
    validate_manifest(merged)
    return merged


def _final_path(output: Path, relative: str, moves: list[dict]) -> Path:
    """Where a shard is now: still in the retry folder if its move is not applied yet."""
    for move in moves:
        if move["to"] == relative and not (output / relative).exists():
            return Path(move["from"])
    return output / relative


def _merged_stages(stages: list[dict], sub_stages: list[dict], keys: dict[str, str]) -> list[dict]:
    """Per-stage counts of the first run plus the retry's, the retried fetch drops taken back."""
    by_name = {s["name"]: s for s in sub_stages}
    taken_back = Counter(keys.values())
    merged = []
    for stage in stages:
        stage = {**stage, "dropped": dict(stage.get("dropped", {}))}
        extra = by_name.get(stage["name"])
        if stage["name"] == "source" or extra is None:
            merged.append(stage)
            continue
        if stage["name"] == FETCH_STAGE:
            stage["rows_in"] -= len(keys)
            for reason, count in taken_back.items():
                stage["dropped"][reason] = stage["dropped"].get(reason, 0) - count
        stage["rows_in"] += extra["rows_in"]
        stage["rows_out"] += extra["rows_out"]
        if extra.get("counters"):  # e.g. images_removed.<reason> of the retried documents
            counters = Counter(stage.get("counters", {}))
            counters.update(extra["counters"])
            stage["counters"] = dict(sorted(counters.items()))
        for reason, count in extra.get("dropped", {}).items():
            stage["dropped"][reason] = stage["dropped"].get(reason, 0) + count
        stage["dropped"] = {r: c for r, c in sorted(stage["dropped"].items()) if c}
        merged.append(stage)
    return merged


def _apply_merge(output: Path, merge: Path) -> dict[str, Any]:
    """Move the shards in, then replace the drop log, then the manifest; safe to repeat after a crash."""
    plan = read_json(merge / "plan.json")
    for move in plan["moves"]:
        source, target = Path(move["from"]), output / move["to"]
        if source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        elif not target.exists():
            raise RuntimeError(f"retry merge: {source} is gone and {target} was never written")
    if (merge / "drops.parquet").exists():
        os.replace(merge / "drops.parquet", output / "drops.parquet")
    merged = read_json(merge / "manifest.json")
    started_at = dt.datetime.fromisoformat(merged["created"]).timestamp()
    finish_outputs(sinks_of(merged["recipe"]["resolved"]), output, merged["outputs"]["shards"],
                   output / merged["drop_log"]["path"], started_at,
                   merged["seconds"] + sum(r["seconds"] for r in merged["retries"]))
    write_json(output / "manifest.json", merged)
    shutil.rmtree(merge.parent, ignore_errors=True)
    if (output / RETRY_DIR).exists() and not any((output / RETRY_DIR).iterdir()):
        (output / RETRY_DIR).rmdir()
    return merged
