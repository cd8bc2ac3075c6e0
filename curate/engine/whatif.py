"""`curate run RECIPE --what-if`: the funnel a recipe's settings would give, from an output's pool, beside the
output as it is. Nothing is fetched, computed or written: the selection runs over the pool's annotations in
this process, its steps in a scratch folder deleted afterwards.

The selection runs in this process, without Ray: spread over local Ray tasks it took as long on two
cores at 1,000,000 rows, for twice the CPU time (BENCHMARKS.md, "Re-selection and what-if").

What the annotations cannot tell is refused (WhatIfNeedsARun, naming each stage and why): a stage whose
annotations were made with other settings or another model, a stage with none yet, fetch settings that
would fetch rows again, a trial that takes rows the pool lacks. Rows that a loosened gate now lets through
to a stage that never annotated them are not guessed: they are counted apart (`not_annotated`, under that
stage), as rows a run would annotate first.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from curate.engine import cluster
from curate.engine.decision import decide, decision_paths, needs_ray
from curate.engine.reselect import check_pool, read_record
from curate.engine.reuse import plan_shard
from curate.engine.select import NOT_ANNOTATED
from curate.engine.split import INPUT_PHASE, SOURCE_STAGE
from curate.files import RunLayout, read_json
from curate.stage import RecipeError, StageContext


class WhatIfNeedsARun(RecipeError):
    """The settings need annotations the pool does not hold."""


def what_if(plan: Any) -> dict[str, Any]:
    """The funnel of `plan`'s settings over its output's pool (or the pool it reads), and the output's current
    funnel; nothing is written to the output."""
    from curate.engine import run as engine

    started = time.perf_counter()
    places = plan.places
    layout = plan.layout
    record = read_record(places.split)
    if record is None:
        raise WhatIfNeedsARun(f"{layout.root} holds no pool yet: run the recipe first (a what-if reads the pool "
                              "an earlier run fetched and annotated)", path="output.path", file=str(layout.root))
    check_pool(record, plan.record, str(places.split.root), "run the recipe (or --overwrite) instead")
    if record.get("trial") != plan.record.get("trial"):
        raise WhatIfNeedsARun(f"the pool holds the rows of another part of the input (pool: {record.get('trial')}, "
                              f"this recipe: {plan.record.get('trial')}); run the recipe to extend the pool",
                              path="trial")
    split = read_json(places.split.phase_dir(INPUT_PHASE) / "_SUCCESS.json")
    shards = split["shards"]
    missing = _missing(plan, shards)
    if missing:
        raise WhatIfNeedsARun("a what-if reads annotations only, and these are missing: " + "; ".join(missing)
                              + "; run the recipe to compute them", path="stages")
    scratch = Path(tempfile.mkdtemp(prefix="curate-what-if-"))
    try:
        view = _scratch_layout(layout, scratch)
        segments = _rebased(plan.segments, view)
        trial = replace(plan, layout=view, segments=segments)
        context = StageContext(recipe_dir=str(plan.loaded.directory), work_dir=str(scratch),
                               on_sample_error=plan.loaded.recipe.engine.on_sample_error)
        markers: dict[str, list[dict[str, Any]]] = {}
        for segment in segments:
            if segment.corpus is not None:
                files = [str(view.shard_file(segment.input_segment, s)) for s in range(shards)]
                if needs_ray(segment.corpus.target, str(view.phase_dir(segment.name))) and not ray.is_initialized():
                    cluster.connect(None)  # a decision spread over Ray tasks (a large semantic dedup)
                decide(segment.corpus.target, segment.corpus.params, context, files,
                       str(view.phase_dir(segment.name)))
            markers[segment.name] = engine._select(trial, segment, shards, {}, context, lambda rows: None,
                                                   in_driver=True)
        funnel = _funnel(plan, split["stats"], markers)
        output_rows = sum(m["rows_out"] for m in markers[segments[-1].name])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    current = read_json(layout.manifest) if layout.manifest.exists() else None
    return {"output": str(layout.root), "rows": split["stats"]["rows_in"], "output_rows": output_rows,
            "stages": funnel, "current": _current(current), "seconds": round(time.perf_counter() - started, 3)}


def _missing(plan: Any, shards: int) -> list[str]:
    """What the annotations lack for these settings, per stage (empty: the what-if can run)."""
    problems: dict[str, set[str]] = {}
    for group in plan.groups:
        objects = [next(s for s in plan.stages if s.name == spec.name) for spec in group.stages]
        for shard in range(shards):
            # alive digests are left out: rows a gate now lets through are counted apart by the selection
            planned = plan_shard(plan.places, objects, plan.fingerprints, group.gates, shard, None, {})
            for stage, target in zip(objects, planned.targets):
                _, marker = plan.places.table(stage.name, shard, plan.fingerprints[stage.name])
                if marker is None:
                    problems.setdefault(stage.name, set()).add(
                        "no annotations made with these settings (a changed annotation setting or model, or a "
                        "stage new to this pool)")
                elif set(target.redo) & set(marker.get("reasons", {})):
                    found = sorted(set(target.redo) & set(marker.get("reasons", {})))
                    problems.setdefault(stage.name, set()).add(f"it would compute again the rows it dropped as "
                                                               f"{', '.join(found)}")
    return [f"{name}: {'; '.join(sorted(why))}" for name, why in problems.items()]


def _scratch_layout(layout: RunLayout, scratch: Path) -> RunLayout:
    """`layout` with its work area in `scratch`: the pool is read where it is, the selection writes apart."""
    view = copy.copy(layout)
    view.work = scratch
    return view


def _rebased(segments: list[Any], view: RunLayout) -> list[Any]:
    """The selection's segments with their decision files in the scratch work area, counting unannotated rows."""
    rebased = []
    for segment in segments:
        decision = str(decision_paths(view.phase_dir(segment.name))[0]) if segment.corpus is not None else None
        rebased.append(replace(segment, decision=decision, unannotated="count"))
    return rebased


def _funnel(plan: Any, source: dict[str, Any], markers: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per stage in recipe order: rows in, out and dropped by reason (not_annotated apart)."""
    from curate.engine.apply import StageStats

    totals: dict[str, StageStats] = {}
    for shard_markers in markers.values():
        for marker in shard_markers:
            for name, data in marker["stages"].items():
                totals.setdefault(name, StageStats()).add(StageStats.from_json(data))
    stages = [{"name": SOURCE_STAGE, "rows_in": source["rows_in"], "rows_out": source["rows_out"],
               "dropped": dict(source.get("dropped", {}))}]
    for stage in plan.stages:
        entry = totals.get(stage.name, StageStats()).to_json()
        dropped = dict(entry.get("dropped", {}))
        unknown = dropped.pop(NOT_ANNOTATED, 0)
        stages.append({"name": stage.name, "rows_in": entry.get("rows_in", 0), "rows_out": entry.get("rows_out", 0),
                       "dropped": dropped, **({"not_annotated": unknown} if unknown else {})})
    return stages


def _current(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    if manifest is None:
        return None
    return {"output_rows": manifest["reconciliation"]["output_rows"],
            "stages": [{"name": s["name"], "rows_in": s.get("rows_in", 0), "rows_out": s.get("rows_out", 0),
                        "dropped": s.get("dropped", {})} for s in manifest["stages"]]}


def render_what_if(result: dict[str, Any], console: Any) -> None:
    """Print the what-if funnel, stage by stage, with its deltas against the current output."""
    from rich.table import Table

    current = {s["name"]: s for s in (result["current"] or {}).get("stages", [])}
    table = Table(title=f"what if: {result['output']}", show_lines=False)
    for column in ("stage", "in", "out", "Δ out", "dropped (Δ)"):
        table.add_column(column, justify="right" if column in ("in", "out", "Δ out") else "left")
    for stage in result["stages"]:
        before = current.get(stage["name"])
        delta = "" if before is None else f"{stage['rows_out'] - before['rows_out']:+d}"
        reasons = sorted(set(stage["dropped"]) | set((before or {}).get("dropped", {})))
        parts = []
        for reason in reasons:
            now, then = stage["dropped"].get(reason, 0), (before or {}).get("dropped", {}).get(reason, 0)
            parts.append(f"{reason} {now}" + (f" ({now - then:+d})" if before is not None and now != then else ""))
        if stage.get("not_annotated"):
            parts.append(f"[yellow]not annotated yet {stage['not_annotated']}[/]")
        table.add_row(stage["name"], str(stage["rows_in"]), str(stage["rows_out"]), delta, ", ".join(parts))
    console.print(table)
    kept, before = result["output_rows"], (result["current"] or {}).get("output_rows")
    change = "" if before is None else f" (now {before}, {kept - before:+d})"
    console.print(f"would keep [bold]{kept}[/] of {result['rows']} rows{change}; nothing was written "
                  f"({result['seconds']:.1f} s)", highlight=False)
    unknown = sum(s.get("not_annotated", 0) for s in result["stages"])
    if unknown:
        console.print(f"[yellow]{unknown} rows are not annotated yet by the stage they reach (a loosened gate lets "
                      "them through): a run annotates them; the what-if counts them as dropped[/]", highlight=False)
