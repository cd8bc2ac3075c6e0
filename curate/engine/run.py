"""Run a recipe: plan, split, phases, output shards, drop log, manifest."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from rich.console import Console

from curate import registry, storage
from curate.drop_log import write_drop_log
from curate.engine import cluster
from curate.engine.annotate import AnnotateWorker
from curate.engine.apply import StageStats
from curate.engine.clean import folder_bytes
from curate.engine.crash import crash_if_asked
from curate.engine.decision import decide, decision_paths, needs_ray
from curate.engine.disk import check_free_disk
from curate.engine.lock import OutputLock, check_unlocked, is_lock_file, remove_all_but_lock
from curate.engine.outcome import KeptTooLittle, low_yield
from curate.engine.phases import Step, run_pipeline, run_tasks
from curate.engine.pool import REASON, Provider, forget_in_pool
from curate.engine.progress import phase_progress
from curate.engine.reselect import (
    PoolMismatch,
    check_pool,
    has_split,
    pool_record,
    read_record,
    record_file,
    start_reselection,
    sweep_replaced,
)
from curate.engine.reuse import PoolPlaces, ReuseRecord, ShardPlan, plan_shard
from curate.engine.select import SegmentShard, SegmentSpec, select_shard
from curate.engine.services import run_services
from curate.engine.split import INPUT_PHASE, SOURCE_STAGE, split_source
from curate.engine.trial import TrialSource
from curate.engine.worker import StageSpec
from curate.engine.write import PoolImages, SinkSpec, finish_outputs, write_outputs
from curate.files import RunLayout, read_json, write_json
from curate.manifest.build import build_manifest
from curate.recipe import LoadedRecipe
from curate.roles.assign import TARGET as ROLE_TARGET
from curate.roles.assign import RoleAssignment, RoleAssignmentParams
from curate.stage import RecipeError, Stage, StageContext, StageFailure, WeightsUnavailable

SELECT_PHASE = "select"
SELECT_IN_DRIVER_UP_TO = 256  # work shards a selection step runs in this process rather than as Ray tasks


class OutputConflict(RecipeError):
    """The output folder holds the work of a different recipe."""


@dataclass
class AnnotationGroup:
    """Consecutive per-sample stages of one `phase`, annotated together on one pool of workers."""

    name: str
    stages: list[StageSpec]
    gates: list[str] = field(default_factory=list)  # stages of the group whose criteria stop rows early


@dataclass
class Plan:
    """A recipe compiled into a source, annotation groups, selection segments and sinks, checked before any work."""

    loaded: LoadedRecipe
    source: Any
    groups: list[AnnotationGroup]
    segments: list[SegmentSpec]
    stages: list[Stage]
    sinks: list[SinkSpec]
    layout: RunLayout
    warnings: list[str]
    storage_config: storage.StorageConfig = field(default_factory=storage.StorageConfig)  # endpoint, region
    fingerprints: dict[str, str] = field(default_factory=dict)  # stage -> fingerprint of its annotations
    places: PoolPlaces | None = None  # the pools the run reads: its own, and another output's with --pool
    record: dict[str, Any] = field(default_factory=dict)  # what the pool's rows and images are (reselect.py)
    redo: dict[str, frozenset[str]] = field(default_factory=dict)  # stage -> drop reasons to compute again

    def __post_init__(self) -> None:
        if self.places is None:
            self.places = PoolPlaces(self.layout)

    @property
    def phases(self) -> list[Any]:
        """The run's steps in order: annotation groups, then selection segments."""
        return [*self.groups, *self.segments]

    def describe(self) -> dict[str, Any]:
        """What `--dry-run` prints: the plan, no work."""
        recipe = self.loaded.recipe
        return {
            "recipe": str(self.loaded.file),
            "recipe_sha256": self.loaded.sha256(),
            "source": self.source.describe(),
            "annotate": [{"name": g.name, "stages": [s.name for s in g.stages], "gates": g.gates}
                         for g in self.groups],
            "select": [{"name": seg.name, "decision": seg.corpus_stage, "stages": [s.name for s in seg.stages]}
                       for seg in self.segments],
            "outputs": {"path": str(self.layout.root), "formats": [sink.name for sink in self.sinks],
                        "shard_rows": recipe.output.shard_rows, "shard_bytes": recipe.output.shard_bytes},
            "engine": recipe.engine.model_dump(mode="json"),
            "warnings": self.warnings,
        }


def compile_plan(loaded: LoadedRecipe, require_weights: bool = True, peek_rows: int = 0,
                 pool: str | None = None) -> Plan:
    """Instantiate the recipe's source, stages and sinks and run every preflight check.

    Missing model weights are an error, unless `require_weights` is off (a dry run),
    where they become warnings of the plan. With `peek_rows`, the first rows of the
    input are read and every stage's `check_input` warnings join the plan's. With `pool`
    (another output folder), the run reads that output's pool and annotations, never
    writing there, and stores only what it adds in its own.
    """
    recipe = loaded.recipe
    storage_config = storage_settings(loaded)
    storage.configure(storage_config)
    source_cls = registry.load(registry.SOURCES, loaded.source_type)
    source = source_cls(loaded.source_params, recipe_dir=str(loaded.directory))
    if recipe.trial.active:
        source = TrialSource(source, recipe.trial.limit, recipe.trial.sample, recipe.trial.seed)
    context = StageContext(recipe_dir=str(loaded.directory), on_sample_error=recipe.engine.on_sample_error)
    stages = []
    for name, params in loaded.stage_params.items():
        cls = registry.load(registry.STAGES, name)
        stages.append(cls(params, context))
    if getattr(source_cls, "needs_fetch", False) and not any(s.fetches_urls for s in stages):
        fetchers = [name for name, target in registry.STAGES.items() if registry.import_target(target).fetches_urls]
        raise RecipeError(f"this source yields URLs; add a stage that fetches them ({', '.join(fetchers)})",
                          file=str(loaded.file), path="stages")
    _check_fingerprints(loaded, source, stages)
    source.preflight()
    warnings = []
    for stage in stages:
        try:
            stage.preflight()
        except WeightsUnavailable as error:
            if require_weights:
                raise
            warnings.append(str(error))
    if peek_rows:
        warnings += _input_warnings(source, stages, peek_rows)
    layout = RunLayout(loaded.output_path())
    gates = _gates(loaded, stages)
    groups = _annotation_groups(loaded, stages, gates)
    segments = _segments(layout, stages)
    fingerprints = _fingerprints(stages)  # the role step, last in the selection, annotates nothing
    record = pool_record(loaded, source, stages)
    recorded = read_record(layout)
    if pool is None and recorded is not None and recorded.get("pool") and not has_split(layout):
        pool = recorded["pool"]  # an output made with --pool keeps reading that pool
    places = PoolPlaces(layout, _other_pool(loaded, pool, record) if pool else None)
    if loaded.roles:
        _append_role_step(loaded, context, stages, segments)
    sinks = [SinkSpec(name, registry.SINKS[name], params.model_dump(mode="json"))
             for name, params in loaded.sink_params.items()]
    return Plan(loaded, source, groups, segments, stages, sinks, layout, warnings, storage_config=storage_config,
                fingerprints=fingerprints, places=places, record=record)


def _other_pool(loaded: LoadedRecipe, pool: str, record: dict[str, Any]) -> RunLayout:
    """The layout of the output whose pool `--pool` names, checked to hold this recipe's rows and images."""
    other = RunLayout(pool)
    if isinstance(other.root, Path):
        other = RunLayout(other.root.resolve())
    if str(other.root) == str(loaded.output_path()):
        raise RecipeError("--pool names this recipe's own output folder; it reads its own pool anyway",
                          path="--pool", file=str(other.root))
    found = read_record(other)
    if found is None or not has_split(other):
        raise RecipeError(f"{other.root} holds no pool to read (no {other.pool}/pool.json and input split): "
                          "name an output made with engine.keep_pool: true", path="--pool", file=str(other.root))
    advice = "run without --pool, or name an output made from the same source and image settings"
    check_pool(found, record, str(other.root), advice)
    if found.get("trial") != record.get("trial"):
        raise PoolMismatch(f"the pool of {other.root} was made for other rows of the source (its trial: "
                           f"{found.get('trial')}, this recipe's: {record.get('trial')}); {advice}", path="trial")
    return other


def _spec(stage: Stage) -> StageSpec:
    return StageSpec(stage.name, registry.STAGES[stage.name], stage.params.model_dump(mode="json"))


def _gates(loaded: LoadedRecipe, stages: list[Stage]) -> list[str]:
    """The stages whose criteria act at annotation time: those the recipe names, and every per-sample stage
    before the one that fetches (nothing is downloaded for a row they drop)."""
    names = [s.name for s in stages]
    for name in loaded.recipe.gates:
        stage = next((s for s in stages if s.name == name), None)
        if stage is None or stage.scope != "sample":
            raise RecipeError(f"gate {name!r} is not a per-sample stage of this recipe (its stages: "
                              f"{', '.join(names)})", file=str(loaded.file), path="gates")
    fetcher = next((i for i, s in enumerate(stages) if s.fetches_urls), None)
    before_fetch = [s.name for s in stages[:fetcher or 0] if s.scope == "sample"]
    return [s.name for s in stages if s.name in loaded.recipe.gates or s.name in before_fetch]


def _annotation_groups(loaded: LoadedRecipe, stages: list[Stage], gates: list[str]) -> list[AnnotationGroup]:
    """Consecutive per-sample stages of the same phase and the same kind of worker (asking for GPUs or not) form a
    group (corpus-wide stages annotate nothing). A phase whose stages differ in kind is split, the later parts
    named `<phase>-gpu` / `<phase>-cpu`, so that a CPU stage never holds a GPU."""
    groups: list[AnnotationGroup] = []
    kinds: list[tuple[str, bool]] = []
    for stage in stages:
        if stage.scope != "sample":
            stage.phase = stage.name
            continue
        kind = (stage.phase, stage.resources.gpus > 0)
        if not kinds or kinds[-1] != kind:
            same_phase = bool(kinds) and kinds[-1][0] == stage.phase
            name = f"{stage.phase}-{'gpu' if kind[1] else 'cpu'}" if same_phase else stage.phase
            if any(g.name == name for g in groups) or (not same_phase and any(k[0] == stage.phase for k in kinds)):
                raise RecipeError(f"stage {stage.name!r} belongs to phase {stage.phase!r}, which an earlier "
                                  "stage of another phase already closed; reorder the stages",
                                  file=str(loaded.file), path=f"stages.{stage.name}")
            groups.append(AnnotationGroup(name, []))
            kinds.append(kind)
        groups[-1].stages.append(_spec(stage))
        if stage.name in gates:
            groups[-1].gates.append(stage.name)
    return groups


def _segments(layout: RunLayout, stages: list[Stage]) -> list[SegmentSpec]:
    """The selection, cut at each corpus-wide stage: the first segment reads the pool, each next one opens
    with a corpus stage's decision over the rows the segment before it kept."""
    segments = [SegmentSpec(SELECT_PHASE, None)]
    for stage in stages:
        if stage.scope == "corpus":
            decision_file, _ = decision_paths(layout.phase_dir(stage.name))
            segments.append(SegmentSpec(stage.name, segments[-1].name, decision=str(decision_file),
                                        corpus_stage=stage.name, corpus=_spec(stage)))
        else:
            segments[-1].stages.append(_spec(stage))
    return segments


def _fingerprints(stages: list[Stage]) -> dict[str, str]:
    """Each per-sample stage's annotation fingerprint: its own (Stage.fingerprint) chained with those of the stages
    before it that provide a column it reads, so a changed stage recomputes itself and what reads it, no more.
    (Which rows a stage sees is not part of it: the engine annotates the rows it lacks, curate/engine/reuse.py.)"""
    found: dict[str, str] = {}
    provider: dict[str, str] = {}  # column -> the latest stage providing it
    for stage in stages:
        if stage.scope != "sample":
            continue
        read = set(stage.reads) | ({"images"} if stage.reads_images else set())
        after = {name: found[name] for name in sorted({provider[c] for c in read if c in provider})}
        entry = {**stage.fingerprint(), "after": after}
        found[stage.name] = hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode()).hexdigest()
        for column in stage.provides:
            provider[column] = stage.name
    return found


def _input_warnings(source: Any, stages: list[Stage], rows: int) -> list[str]:
    """What the stages say of the input's first `rows` rows."""
    first = next(iter(source.iter_batches(rows)), None)
    if first is None:
        return ["the input has no rows"]
    return [warning for stage in stages for warning in stage.check_input(first.slice(0, rows))]


def _check_fingerprints(loaded: LoadedRecipe, source: Any, stages: list[Stage]) -> None:
    """A stage that reads image fingerprints needs an earlier stage that computes them for this source's images."""
    images = "fetched" if getattr(source, "needs_fetch", False) else "stored"
    computed = False
    for stage in stages:
        if stage.reads_image_fingerprints and not computed:
            off = next((s for s in stages if s.fingerprints_switch and s.fetches_urls == (images == "fetched")
                        and s.fingerprinted_images() is None), None)
            if off is not None:
                raise RecipeError(f"{off.name}.{off.fingerprints_switch} is false, but {stage.name} reads "
                                  f"image_meta.pixel_sha256 and phash; remove `{off.fingerprints_switch}: false`",
                                  file=str(loaded.file), path=f"stages.{off.name}.{off.fingerprints_switch}")
            raise RecipeError(f"{stage.name} reads image fingerprints (image_meta.pixel_sha256, phash), but nothing "
                              f"before it computes them for the images a {loaded.source_type} source brings with "
                              "their bytes: add a `decode` stage in the recipe before it, right after `fetch` "
                              "(`decode: {keep_bytes: true}` keeps the bytes as they are)",
                              file=str(loaded.file), path=f"stages.{stage.name}")
        computed = computed or stage.fingerprinted_images() == images


def storage_settings(loaded: LoadedRecipe) -> storage.StorageConfig:
    """The recipe's object-storage settings (else the environment's); paths carrying credentials are refused."""
    recipe = loaded.recipe
    paths = [("storage.endpoint_url", recipe.storage.endpoint_url), ("output.path", recipe.output.path),
             ("source.path", getattr(loaded.source_params, "path", None))]
    try:
        for key, value in paths:
            if isinstance(value, str) and (key == "storage.endpoint_url" or storage.is_remote(value)):
                storage.check_no_credentials(value, key)
        return storage.StorageConfig.from_settings(recipe.storage.endpoint_url, recipe.storage.region)
    except ValueError as error:  # the message never repeats the value: it may hold a secret
        raise RecipeError(str(error), file=str(loaded.file), path="storage") from None


def _append_role_step(loaded: LoadedRecipe, context: StageContext, stages: list[Stage],
                      segments: list[SegmentSpec]) -> None:
    """Assign training roles as the last step of the selection."""
    params = RoleAssignmentParams(roles=loaded.roles, required=loaded.recipe.roles_required)
    step = RoleAssignment(params, context)
    step.phase = segments[-1].name
    segments[-1].stages.append(StageSpec(step.name, ROLE_TARGET, params.model_dump(mode="json")))
    stages.append(step)


def check_output_folder(plan: Plan, overwrite: bool) -> str:
    """Decide what to do with the output folder: 'fresh', 'resume', 'complete' or 'reselect'.

    With `overwrite`, whatever the folder holds is deleted and the run starts over. Without it,
    an output of the same recipe and the same input is resumed (or reported complete); an output
    of another recipe whose pool holds this recipe's rows and images is re-selected from its pool
    ('reselect': see curate/engine/reselect.py). OutputConflict is raised when the folder holds
    something else: work of a recipe with another source or image settings, work made from an input
    file that has changed since, or files that are not a curate output.
    """
    layout, sha = plan.layout, plan.loaded.sha256()
    if isinstance(layout.root, Path) and layout.root.exists() and not layout.root.is_dir():
        raise OutputConflict("the output path is an existing file, not a folder; choose another output.path",
                             path="output.path", file=str(layout.root))
    if overwrite:
        if layout.root.exists():
            _refuse_to_delete_a_precious_folder(plan)
            remove_all_but_lock(layout.root)  # the lock this run holds stays
        return "fresh"
    record = read_record(layout)
    if layout.run_info.exists():  # an unfinished run (or one that kept its work area): its recipe decides
        previous, previous_input = _recorded(layout.run_info, ("recipe_sha256",), ("input_file",))
    elif layout.manifest.exists():
        previous, previous_input = _recorded(layout.manifest, ("recipe", "sha256"), ("sources", 0, "input_file"))
    elif record is not None:
        previous, previous_input = "(no recipe)", record.get("input_file")
    elif layout.root.exists() and any(not is_lock_file(entry.name) for entry in layout.root.iterdir()):
        raise OutputConflict("the output folder exists and is not a curate output; choose another "
                             "output.path or pass --overwrite", path="output.path", file=str(layout.root))
    else:
        return "fresh"
    if previous != sha and record is None:
        raise OutputConflict(f"the output folder holds the output of a different recipe (sha256 "
                             f"{str(previous)[:12]}, this one {sha[:12]}) and no pool to re-select from; choose "
                             "another output.path or pass --overwrite to start over", path="output.path",
                             file=str(layout.root))
    if previous != sha:
        try:
            check_pool(record, plan.record, str(layout.root),
                       "pass --overwrite to start over, or choose another output.path")
        except PoolMismatch as error:
            raise OutputConflict(error.message, path=error.path, file=str(layout.root)) from None
    current_input = plan.source.input_file_state()
    if previous_input is not None and current_input is not None and previous_input != current_input:
        raise OutputConflict(f"the input file changed since this output was made (then {_file_state(previous_input)},"
                             f" now {_file_state(current_input)}); pass --overwrite to start over, or choose another "
                             "output.path", path="source.path", file=str(getattr(plan.source, "path", "")))
    if previous == sha:
        return "complete" if layout.manifest.exists() else "resume"
    return "reselect"


def _file_state(state: dict[str, Any]) -> str:
    changed = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.get("mtime_ns", 0) / 1e9))
    return f"{state.get('bytes')} bytes, modified {changed}"


def _recorded(file: Any, sha_keys: tuple, input_keys: tuple) -> tuple[str, dict[str, Any] | None]:
    """The recipe sha256 and the input file state a manifest or run.json records; a file that does not parse
    records "(unreadable)" and no input state."""
    try:
        document: Any = read_json(file)
    except ValueError:
        return "(unreadable)", None
    sha, state = _lookup(document, sha_keys), _lookup(document, input_keys)
    return (sha if isinstance(sha, str) else "(unreadable)"), (state if isinstance(state, dict) else None)


def _lookup(document: Any, keys: tuple) -> Any:
    for key in keys:
        if isinstance(key, int):
            document = document[key] if isinstance(document, list) and len(document) > key else None
        else:
            document = document.get(key) if isinstance(document, dict) else None
    return document


def _refuse_to_delete_a_precious_folder(plan: Plan) -> None:
    """--overwrite never deletes a filesystem root, nor a folder holding the home or current folder, the recipe
    or the input."""
    root = plan.layout.root
    if not isinstance(root, Path):
        return
    root = root.resolve()
    precious = [Path.home(), Path.cwd(), plan.loaded.file]
    source_path = getattr(plan.source, "path", None)
    if isinstance(source_path, (str, os.PathLike)) and not storage.is_remote(source_path):
        precious.append(Path(source_path))
    for kept in [Path(root.anchor), *precious]:
        kept = kept.resolve()
        if kept == root or root in kept.parents:
            raise OutputConflict(f"--overwrite would delete {root}, which is or holds {kept}; choose another "
                                 "output.path", path="output.path", file=str(plan.loaded.file))


def execute(plan: Plan, console: Console, address: str | None = None, verbose: bool = False,
            overwrite: bool = False, progress: bool = True, break_lock: bool = False,
            judge: bool = True, lock: bool = True) -> dict[str, Any]:
    """Run the plan to completion (resuming earlier work) and return the manifest.

    The output folder's lock is held throughout (curate/engine/lock.py): while another live process
    holds it, OutputLocked is raised before anything is read or written, unless `break_lock` (or
    `lock` is off: the caller holds it).
    With `judge`, a run that kept too little ends with a warning, or KeptTooLittle under
    `output.strict` (the CLI judges after printing its summary instead).
    """
    storage.configure(plan.storage_config)  # the driver's reads of plain URLs; workers get the same config
    if not lock:  # the caller holds the folder's lock (a retry)
        manifest = _execute(plan, console, address, verbose, overwrite, progress)
        return judge_yield(manifest, console) if judge else manifest
    with OutputLock(plan.layout.root, break_lock=break_lock,
                    say=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)):
        manifest = _execute(plan, console, address, verbose, overwrite, progress)
    return judge_yield(manifest, console) if judge else manifest


def _execute(plan: Plan, console: Console, address: str | None, verbose: bool, overwrite: bool,
             progress: bool) -> dict[str, Any]:
    """execute(), with the output folder's lock held."""
    state = check_output_folder(plan, overwrite)
    layout, recipe = plan.layout, plan.loaded.recipe
    if state == "complete" and not plan.redo:
        console.print(f"[green]already complete:[/] {layout.root} (same recipe; nothing to do)")
        return read_json(layout.manifest)
    if plan.places.other is not None:
        check_unlocked(plan.places.other.root, refuse=lambda message: OutputConflict(
            f"--pool: {message}", path="--pool", file=str(plan.places.other.root)))
    if state in ("reselect", "complete"):  # complete: a retry re-selects the same recipe with rows added
        start_reselection(layout)
        console.print(f"[yellow]re-selecting[/] {layout.root} from its pool (annotations reused where they stand)")
    if recipe.engine.check_disk and state not in ("reselect", "complete"):  # refuse what clearly cannot fit
        check_free_disk(plan, warn=lambda text: console.print(f"[bold yellow]warning:[/] {text}", highlight=False))
    started_at, started = time.time(), time.perf_counter()
    layout.work.mkdir(parents=True, exist_ok=True)
    write_json(layout.run_info, {"recipe_sha256": plan.loaded.sha256(), "recipe": str(plan.loaded.file),
                                 "input_file": plan.source.input_file_state()})
    if state == "resume":
        console.print(f"[yellow]resuming[/] the unfinished run in {layout.root}")

    timings: dict[str, float] = {}
    with phase_progress(console, enabled=progress) as bars:
        phase_started = time.perf_counter()
        if plan.places.split is layout:
            split = split_source(plan.source, layout, recipe.engine.rows_per_work_shard, scope=plan.record["trial"])
            write_json(record_file(layout), plan.record)
        else:  # --pool: the other output's split, as it is
            split = read_json(plan.places.split.phase_dir(INPUT_PHASE) / "_SUCCESS.json")
            write_json(record_file(layout), {**plan.record, "pool": str(plan.places.other.root)})
        timings[INPUT_PHASE] = time.perf_counter() - phase_started
        shards, source_stats = split["shards"], split["stats"]
        # A re-selection with nothing to annotate and few work shards runs in this process: no Ray to start.
        local = (state in ("reselect", "complete") or plan.places.other is not None) and \
            shards <= SELECT_IN_DRIVER_UP_TO and not _annotation_pending(plan, shards)
        resources = cluster.this_process() if local else cluster.connect(address or recipe.engine.address,
                                                                          verbose=verbose)
        device = cluster.device_summary(resources)
        if device["accelerator"] == "cpu" and any(s.resources.gpus for s in plan.stages) and not local:
            console.print("[bold yellow]No GPU in the cluster: model stages run on CPU (slower).[/]")
        context = StageContext(recipe_dir=str(plan.loaded.directory), work_dir=str(layout.work),
                               on_sample_error=recipe.engine.on_sample_error, device=device["accelerator"])
        annotation_markers: dict[str, list[dict[str, Any]]] = {}
        with run_services(plan.stages, enabled=not local) as (context.services, context.services_namespace):
            annotation_markers = _annotate(plan, shards, resources, device, context, bars, source_stats["rows_out"],
                                           timings)
        select_markers: dict[str, list[dict[str, Any]]] = {}
        decisions: dict[str, dict[str, Any]] = {}
        for segment in plan.segments:
            task = bars.add_task(segment.name, total=None)
            phase_started = time.perf_counter()
            if segment.corpus is not None:
                worker_plan = _corpus_worker_plan(plan, segment, resources, device, shards)
                if local and needs_ray(segment.corpus.target, str(layout.phase_dir(segment.name))):
                    # a decision spread over Ray tasks (a large semantic dedup), in a re-selection without Ray
                    cluster.connect(address or recipe.engine.address, verbose=verbose)
                    device["ray"] = True
                decisions[segment.corpus_stage] = _decide(segment, layout, shards, context, worker_plan, local)
                crash_if_asked(f"decide-{segment.corpus_stage}", 0)
            select_markers[segment.name] = _select(plan, segment, shards, resources, context,
                                                   lambda rows, task=task: bars.advance(task, rows),
                                                   in_driver=True if local else None)
            timings[segment.name] = time.perf_counter() - phase_started

        final_files = [layout.shard_file(plan.segments[-1].name, s) for s in range(shards)]
        total_out = sum(m["rows_out"] for m in select_markers[plan.segments[-1].name])
        task = bars.add_task("write", total=total_out)
        write_plan = cluster.plan_workers(resources, recipe.engine.workers, max(1, shards))
        phase_started = time.perf_counter()
        outputs = write_outputs(layout, final_files, plan.sinks, recipe.output.shard_rows, recipe.output.shard_bytes,
                                write_plan.cpus_per_worker, max_in_flight=2 * write_plan.workers,
                                on_progress=lambda rows: bars.advance(task, rows),
                                keep_embeddings=recipe.output.embeddings,
                                images=_pool_images(plan, shards),
                                transforms=[_spec(s) for s in plan.stages if s.write_transform],
                                release=None if recipe.engine.keep_pool else _release_pool(plan, layout),
                                context=context, in_process=local)
        timings["write"] = time.perf_counter() - phase_started

    split_layout = plan.places.split
    dropped = write_drop_log(layout, [INPUT_PHASE] + [seg.name for seg in plan.segments], shards,
                             lambda phase, shard: (split_layout if phase == INPUT_PHASE else layout).drops_file(
                                 phase, shard))
    crash_if_asked("drops", 0)
    finish_outputs(plan.sinks, layout.root, [file for marker in outputs for file in marker["files"]], layout.drops,
                   started_at, time.perf_counter() - started)
    removed = sweep_replaced(layout)  # a re-selection: the previous output's files this one did not write
    if removed:
        console.print(f"removed {len(removed)} files of the previous output that this one does not have",
                      highlight=False)
    stage_stats = _collect_stage_stats(source_stats, plan, annotation_markers, select_markers, outputs)
    manifest = build_manifest(
        plan=plan, layout=layout, device=device, resources=resources, stage_stats=stage_stats,
        phase_seconds=timings, outputs=outputs, final_files=final_files, dropped_rows=dropped, decisions=decisions,
        models=_models(plan, annotation_markers),
        started_at=started_at, seconds=time.perf_counter() - started)
    manifest["pool"] = _pool_entry(plan, annotation_markers)
    if not manifest["reconciliation"]["ok"]:
        # Never publish a manifest that does not add up; keep the work area to look into it.
        write_json(layout.work / "manifest.unreconciled.json", manifest)
        raise StageFailure(f"rows do not reconcile: {manifest['reconciliation']}; see "
                           f"{layout.work / 'manifest.unreconciled.json'}")
    write_json(layout.manifest, manifest)
    if not recipe.engine.keep_work:
        storage.remove_tree(layout.work, ignore_errors=True)
    if not recipe.engine.keep_pool:
        storage.remove_tree(layout.pool, ignore_errors=True)
    return manifest


def _annotate(plan: Plan, shards: int, resources: dict[str, float], device: dict[str, Any], context: StageContext,
              bars: Any, rows: int, timings: dict[str, float]) -> dict[str, list[dict[str, Any]]]:
    """Annotate, on each work shard, what the pool lacks for each group's stages (curate/engine/reuse.py): every
    row when no table was made under the stage's fingerprint, else only the rows the tables lack.

    The groups stream (curate/engine/phases.py run_pipeline): each has its own pool of workers, sized by what its
    stages declare, and a work shard goes on to the next group as soon as one is done with it. Every finished
    (group, shard) is appended to the work area's timeline.jsonl.
    """
    layout, recipe = plan.layout, plan.loaded.recipe
    active = _groups_with_work(plan, shards)
    demands = [cluster.Demand(
        cpus=max(s.resources.cpus for s in _group_stages(plan, group)),
        gpus=max(s.resources.gpus for s in _group_stages(plan, group)) if device["gpus"] else 0.0,
        memory=sum(s.resources.memory_bytes for s in _group_stages(plan, group)),
        shards=shards if on else 0) for group, on in zip(plan.groups, active)]
    worker_plans = cluster.plan_pools(resources, recipe.engine.workers, demands)
    config = storage.current_config()
    timeline = _Timeline(layout.work / TIMELINE_FILE)
    found: dict[str, list[dict[str, Any]]] = {}
    owners = [_GroupStep(plan, group, context, config, timeline,
                         lambda rows, task=bars.add_task(group.name, total=rows): bars.advance(task, rows))
              for group in plan.groups]
    steps = [owner.step(worker_plan) for owner, worker_plan in zip(owners, worker_plans)]
    in_flight = recipe.engine.max_shards_in_flight
    if in_flight == "auto":
        in_flight = max(2, 2 * sum(p.workers for p in worker_plans))
    gpu_steps = [i for i, p in enumerate(worker_plans) if p.gpus_per_worker and p.workers]
    device["pools"] = {group.name: {"workers": p.workers, "cpus_per_worker": p.cpus_per_worker,
                                    "gpus_per_worker": p.gpus_per_worker}
                       for group, p in zip(plan.groups, worker_plans) if p.workers}
    device["max_shards_in_flight"] = in_flight
    try:
        run_pipeline(steps, list(range(shards)), in_flight, before_others=_wait_until_placed, first=gpu_steps)
    finally:
        timeline.save()
    for group, owner in zip(plan.groups, owners):
        found[group.name] = owner.collect(shards)
        timings[group.name] = timeline.span(group.name)
    return found


TIMELINE_FILE = "timeline.jsonl"
PLACEMENT_WAIT = 120.0  # seconds to wait for GPU workers to be placed before starting the CPU pools


def _wait_until_placed(actors: list[Any]) -> None:
    """Wait (bounded) until the GPU stages' workers are placed, so the CPU pools cannot take the CPUs of the
    nodes with GPUs first."""
    try:
        ray.get([actor.__ray_ready__.remote() for actor in actors], timeout=PLACEMENT_WAIT)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        pass  # the pipeline itself replaces or reports workers that never start


def _groups_with_work(plan: Plan, shards: int) -> list[bool]:
    """Per annotation group, whether it may have work in this run: it has some now, or a group before it has
    (whose results may give it rows to annotate)."""
    found, earlier = [], False
    for group in plan.groups:
        earlier = earlier or any(_shard_plan(plan, group, shard).pending for shard in range(shards))
        found.append(earlier)
    return found


class _Timeline:
    """The work area's per-shard timeline: one JSON line per (step, shard) done, with where and when it ran.

    A local work area gets each line as it comes; an object store's, all of this run's lines at `save()` (objects
    cannot be appended to)."""

    def __init__(self, file: Any):
        self.file = file
        self.local = isinstance(file, Path)
        self.pending: list[str] = []
        self.spans: dict[str, list[float]] = {}

    def add(self, step: str, shard: int, marker: dict[str, Any]) -> None:
        started, ended = marker.get("started_at"), marker.get("ended_at")
        if started is None or ended is None:
            return
        entry = {"step": step, "shard": shard, "start": started, "end": ended, "rows": marker.get("rows_in"),
                 "node": marker.get("node"), "gpus": marker.get("gpus"), "pid": marker.get("pid")}
        line = json.dumps(entry) + "\n"
        if self.local:
            with open(self.file, "a", encoding="utf-8") as handle:
                handle.write(line)
        else:
            self.pending.append(line)
        span = self.spans.setdefault(step, [started, ended])
        span[0], span[1] = min(span[0], started), max(span[1], ended)

    def save(self) -> None:
        """Write the lines not written yet (an object store's work area), after those of earlier runs."""
        if not self.pending:
            return
        earlier = self.file.read_text() if self.file.exists() else ""
        self.file.write_text(earlier + "".join(self.pending))
        self.pending = []

    def span(self, step: str) -> float:
        """Seconds from the first start to the last end of `step` in this run (0: it computed nothing)."""
        started, ended = self.spans.get(step, (0.0, 0.0))
        return round(ended - started, 3)


class _GroupStep:
    """One annotation group as a step of the streamed pipeline: what a shard needs, its workers, its bookkeeping."""

    def __init__(self, plan: Plan, group: AnnotationGroup, context: StageContext, config: Any, timeline: _Timeline,
                 on_progress: Any):
        self.plan, self.group, self.context, self.config = plan, group, context, config
        self.timeline, self.on_progress = timeline, on_progress
        self.objects = _group_stages(plan, group)
        self.before = _stages_before(plan, group.stages[0].name)
        self.plans: dict[int, ShardPlan] = {}
        self.computed: set[int] = set()
        self.set_up: dict[str, int] = {}
        self.tables: dict[int, dict[str, Any]] = {}

    def step(self, worker_plan: cluster.WorkerPlan) -> Step:
        remote = ray.remote(AnnotateWorker).options(num_cpus=worker_plan.cpus_per_worker,
                                                     num_gpus=worker_plan.gpus_per_worker,
                                                     memory=worker_plan.memory_per_worker or None, max_restarts=0)
        batch_rows = max(self.plan.loaded.recipe.engine.batch_rows, *(s.min_batch_rows() for s in self.objects))
        return Step(self.group.name,
                    lambda: remote.remote(self.group.stages, self.group.gates, self.context, batch_rows, self.config),
                    worker_plan.workers, self.submit, self.on_done, self.has_work, self.on_skip)

    def has_work(self, shard: int) -> bool:
        self.plans[shard] = _shard_plan(self.plan, self.group, shard)
        return self.plans[shard].pending

    def submit(self, actor: Any, shard: int) -> Any:
        return actor.run.remote(self.group.name, shard, self.plan.places.input_file(shard),
                                _providers(self.plan, self.before, shard), self.plans[shard].targets)

    def on_skip(self, shard: int) -> None:
        name = self.objects[0].name
        _, marker = self.plan.places.table(name, shard, self.plan.fingerprints[name])
        self.on_progress(marker["rows"])
        _forget_blocked(self.plan, self.group, shard)

    def on_done(self, shard: int, marker: dict[str, Any]) -> None:
        self.on_progress(marker["rows_in"])
        self.computed.add(shard)
        for name in marker.get("set_up", []):
            self.set_up[name] = self.set_up.get(name, 0) + 1
        self.tables[shard] = marker.get("tables", {})
        for spec in self.group.stages:
            self.plan.places.forget(spec.name, shard)
        _forget_blocked(self.plan, self.group, shard)
        self.timeline.add(self.group.name, shard, marker)
        crash_if_asked(self.group.name, shard)

    def collect(self, shards: int) -> list[dict[str, Any]]:
        """Per work shard: the group's stages' markers, where each table is, and whether this run computed it."""
        found = []
        for shard in range(shards):
            entry: dict[str, Any] = {"shard": shard, "computed": shard in self.computed, "stages": {},
                                     "places": {}, "tables": self.tables.get(shard, {})}
            for spec in self.group.stages:
                where, marker = self.plan.places.table(spec.name, shard, self.plan.fingerprints[spec.name])
                entry["stages"][spec.name] = marker
                entry["places"][spec.name] = "own" if where is self.plan.layout else "other"
            found.append(entry)
        if found:
            found[0]["set_up"] = self.set_up
        return found


def _group_stages(plan: Plan, group: AnnotationGroup) -> list[Stage]:
    return [next(s for s in plan.stages if s.name == spec.name) for spec in group.stages]


def _shard_plan(plan: Plan, group: AnnotationGroup, shard: int) -> ShardPlan:
    """What annotating `group` on `shard` takes, as the pool's markers stand now (curate/engine/reuse.py)."""
    before = _stages_before(plan, group.stages[0].name)
    expected = None  # the first group sees every row
    if before:
        _, marker = plan.places.table(before[-1].name, shard, plan.fingerprints[before[-1].name])
        expected = (marker or {}).get("alive_out", "(unknown)")
    return plan_shard(plan.places, _group_stages(plan, group), plan.fingerprints, group.gates, shard, expected,
                      plan.redo)


def _annotation_pending(plan: Plan, shards: int) -> bool:
    """Whether any annotation group has work on any shard, as the pool's markers stand now."""
    return any(_groups_with_work(plan, shards))


def _forget_blocked(plan: Plan, group: AnnotationGroup, shard: int) -> None:
    """Blank, in every pool file of `shard` written so far, the rows a stage of `group` hard-dropped and must not
    keep (Stage.forgets_drops: a blocklist). Idempotent, so a resumed run does it again safely."""
    names = {spec.name for spec in group.stages}
    forgetting = [s for s in plan.stages if s.name in names and s.forgets_drops()]
    if not forgetting:
        return
    written = _stages_before(plan, None)
    last = max(i for i, s in enumerate(written) if s.name in names)
    keys: set[str] = set()
    for stage in forgetting:
        table = storage.read_table(plan.places.table_file(stage.name, shard, plan.fingerprints[stage.name]),
                                   columns=["key", REASON])
        keys |= {k for k, r in zip(*(table.column(c).to_pylist() for c in ("key", REASON))) if r is not None}
    if keys:
        files = [plan.places.input_file(shard)]
        files += [plan.places.table_file(s.name, shard, plan.fingerprints[s.name]) for s in written[:last + 1]]
        forget_in_pool([f for f in files if plan.places.is_own(f)], keys)  # another output's pool: read only


def _stages_before(plan: Plan, name: str | None) -> list[Stage]:
    """The per-sample stages before the stage `name` (all of them for None), in recipe order."""
    found = []
    for stage in plan.stages:
        if stage.name == name:
            break
        if stage.scope == "sample" and stage.name in plan.fingerprints:
            found.append(stage)
    return found


def _providers(plan: Plan, stages: list[Stage], shard: int) -> list[Provider]:
    return [Provider(s.name, tuple(sorted(s.provides)),
                     plan.places.table_file(s.name, shard, plan.fingerprints[s.name])) for s in stages]


def _pool_images(plan: Plan, shards: int) -> PoolImages:
    """Where the write finds each work shard's image bytes."""
    stage = _image_stage(plan)
    files = {shard: (plan.places.table_file(stage, shard, plan.fingerprints[stage]) if stage
                     else plan.places.input_file(shard)) for shard in range(shards)}
    return PoolImages(str(plan.layout.root), stage, files)


def _image_stage(plan: Plan) -> str | None:
    """The stage whose annotation tables hold the pool's image bytes (None: the input split holds them)."""
    holders = [s.name for s in _stages_before(plan, None) if "images" in s.provides]
    return holders[-1] if holders else None


def _select(plan: Plan, segment: SegmentSpec, shards: int, resources: dict[str, float], context: StageContext,
            on_progress: Any, in_driver: bool | None = None) -> list[dict[str, Any]]:
    """Run one selection segment over every work shard not done yet: in this process up to
    SELECT_IN_DRIVER_UP_TO shards (or as `in_driver` says), else one Ray task each."""
    layout, recipe = plan.layout, plan.loaded.recipe
    pending = [s for s in range(shards) if not layout.marker(segment.name, s).exists()]
    for shard in range(shards):
        if shard not in pending:
            on_progress(read_json(layout.marker(segment.name, shard))["rows_in"])
    everything = _stages_before(plan, None)
    config = storage.current_config()

    def files_of(shard: int) -> SegmentShard:
        return SegmentShard(
            shard, plan.places.input_file(shard), _providers(plan, everything, shard),
            None if segment.input_segment is None else str(layout.shard_file(segment.input_segment, shard)),
            str(layout.shard_file(segment.name, shard)), str(layout.drops_file(segment.name, shard)),
            str(layout.marker(segment.name, shard)))

    def on_result(shard: int, marker: dict[str, Any]) -> None:
        on_progress(marker["rows_in"])
        crash_if_asked(segment.name, shard)

    if in_driver is None:
        in_driver = len(pending) <= SELECT_IN_DRIVER_UP_TO
    if in_driver:
        # A few hundred shards of annotations select in seconds here; a Ray worker would first spend
        # about as long importing the stages' modules (torch, open_clip) as the whole selection takes.
        for shard in pending:
            try:
                on_result(shard, select_shard(segment, files_of(shard), context, config))
            except StageFailure:
                raise
            except Exception as error:  # as a task's error would: stop the run, naming the shard
                raise StageFailure(f"selection {segment.name!r}, work shard {shard:05d}: "
                                   f"{type(error).__name__}: {error}") from error
    else:
        task_plan = cluster.plan_workers(resources, recipe.engine.workers, max(1, len(pending)),
                                         cpus_per_worker=0.5)
        remote = ray.remote(select_shard).options(num_cpus=task_plan.cpus_per_worker, max_retries=2)
        run_tasks(f"selection {segment.name!r}", pending, lambda shard: remote.remote(
            segment, files_of(shard), context, config), 2 * task_plan.workers, on_result)
    return [read_json(layout.marker(segment.name, s)) for s in range(shards)]


def _corpus_worker_plan(plan: Plan, segment: SegmentSpec, resources: dict[str, float], device: dict[str, Any],
                        shards: int) -> cluster.WorkerPlan:
    stage = next(s for s in plan.stages if s.name == segment.corpus_stage)
    return cluster.plan_workers(resources, plan.loaded.recipe.engine.workers, max(1, shards),
                                cpus_per_worker=stage.resources.cpus,
                                gpus_per_worker=stage.resources.gpus if device["gpus"] else 0.0,
                                memory_per_worker=stage.resources.memory_bytes)


def _release_pool(plan: Plan, layout: RunLayout) -> Any:
    """With `engine.keep_pool: false`: delete a work shard's pool data once its output shards are written (its
    completion markers stay, so a resumed run neither fetches nor annotates it again)."""
    stages = _stages_before(plan, None)

    def release(shard: int) -> None:
        files = [plan.places.input_file(shard)]
        files += [plan.places.table_file(s.name, shard, plan.fingerprints[s.name]) for s in stages]
        for file in files:
            if plan.places.is_own(file):  # another output's pool is read only
                storage.location(file).unlink(missing_ok=True)
        crash_if_asked("release", shard)

    return release


def judge_yield(manifest: dict[str, Any], console: Console) -> dict[str, Any]:
    """Warn when the run kept too little of its input (KeptTooLittle with `output.strict`); return the manifest."""
    output = manifest["recipe"]["resolved"]["output"]
    warning = low_yield(manifest, output.get("min_kept_fraction", 0.01))  # outputs made before both keys existed
    if warning is not None:
        if output.get("strict"):
            raise KeptTooLittle(warning)
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    return manifest


def _decide(segment: SegmentSpec, layout: RunLayout, shards: int, context: StageContext,
            worker_plan: cluster.WorkerPlan, local: bool = False) -> dict[str, Any]:
    """Run a corpus stage's decision as one Ray task (in this process when `local`) over the rows the segment
    before kept (reused when a resumed run finds it saved)."""
    files = [str(layout.shard_file(segment.input_segment, s)) for s in range(shards)]
    if local:
        return decide(segment.corpus.target, segment.corpus.params, context, files, str(layout.phase_dir(segment.name)),
                      storage.current_config())
    remote = ray.remote(decide).options(num_cpus=worker_plan.cpus_per_worker, num_gpus=worker_plan.gpus_per_worker,
                                        max_retries=2)  # a lost node: the decision is saved atomically
    try:
        return ray.get(remote.remote(segment.corpus.target, segment.corpus.params, context, files,
                                     str(layout.phase_dir(segment.name)), storage.current_config()))
    except ray.exceptions.RayError as error:
        cause = getattr(error, "cause", error)
        raise StageFailure(f"phase {segment.name!r}, corpus decision: {type(cause).__name__}: {cause}") from None


def _models(plan: Plan, annotation_markers: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The models as the workers loaded them (device, precision, preprocessing), else as planned."""
    models = []
    for stage in plan.stages:
        loaded = None
        for group in annotation_markers.values():
            for shard in group:
                entry = shard["stages"].get(stage.name)
                if entry and entry.get("models"):
                    loaded = entry["models"]
                    break
            if loaded:
                break
        models.extend(loaded if loaded is not None else stage.model_info())
    return models


def _collect_stage_stats(source_stats: dict[str, Any], plan: Plan,
                         annotation_markers: dict[str, list[dict[str, Any]]],
                         select_markers: dict[str, list[dict[str, Any]]],
                         outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The funnel, per stage in recipe order: rows in / out and drops from the selection (a row counts under
    the first stage that drops it), seconds of annotation (this run's) plus selection, the stages' counters,
    and the rows the pool holds annotated."""
    ordered = [{"name": SOURCE_STAGE, "phase": INPUT_PHASE, **source_stats}]
    totals: dict[str, StageStats] = {}
    for markers in select_markers.values():
        for marker in markers:
            for name, data in marker["stages"].items():
                totals.setdefault(name, StageStats()).add(StageStats.from_json(data))
    annotated: dict[str, int] = {}
    for markers in annotation_markers.values():
        for shard in markers:
            for name, marker in shard["stages"].items():
                marker = marker or {}
                annotated[name] = annotated.get(name, 0) + marker.get("annotated", marker.get("stats", {}).get(
                    "rows_in", 0))
                entry = totals.setdefault(name, StageStats())
                entry.counters.update(marker.get("counters", marker.get("stats", {}).get("counters", {})))
                if shard["tables"].get(name, {}).get("written") and "stats" in marker:
                    entry.seconds += StageStats.from_json(marker["stats"]).seconds  # reused: an earlier run's
    for marker in outputs:
        for name, counters in marker.get("counters", {}).items():
            totals.setdefault(name, StageStats()).counters.update(counters)
    for stage in plan.stages:
        entry = {"name": stage.name, "phase": stage.phase, **totals.get(stage.name, StageStats()).to_json()}
        if stage.name in annotated:
            entry["annotated"] = annotated[stage.name]
        ordered.append(entry)
    return ordered


def _reuse(annotation_markers: dict[str, list[dict[str, Any]]]) -> dict[str, ReuseRecord]:
    """Per stage: the rows and work shards this run computed, and those it reused (from which pool)."""
    records: dict[str, ReuseRecord] = {}
    for markers in annotation_markers.values():
        set_up = markers[0].get("set_up", {}) if markers else {}
        for shard in markers:
            for name, marker in shard["stages"].items():
                record = records.setdefault(name, ReuseRecord(loads=set_up.get(name, 0)))
                marker = marker or {}
                table = shard["tables"].get(name)
                if table and table["written"]:
                    record.computed.append(shard["shard"])
                    record.computed_rows += table["computed"]
                    record.reused_rows += table["reused"]
                else:
                    record.reused.append(shard["shard"])
                    record.reused_rows += marker.get("annotated", 0)
                if shard["places"].get(name) == "other":
                    record.from_other.append(shard["shard"])
    return records


def _pool_entry(plan: Plan, annotation_markers: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The manifest's account of the pool: where it is, whether it stays, what it holds, and per stage the
    annotation fingerprint with what this run computed and what it reused."""
    layout = plan.layout
    kept = plan.loaded.recipe.engine.keep_pool
    size = folder_bytes(layout.pool) if kept else 0  # None on an object store: not summed there
    reuse = _reuse(annotation_markers)
    entry = {"path": layout.pool.name, "kept": kept, **({"bytes": size} if size is not None else {}),
             "images_in": _image_stage(plan) or INPUT_PHASE,
             "annotations": {name: {"fingerprint": plan.fingerprints[name],
                                    **(reuse[name].to_json() if name in reuse else {})}
                             for name in plan.fingerprints}}
    if plan.places.other is not None:
        entry["reads"] = str(plan.places.other.root)
    return entry
