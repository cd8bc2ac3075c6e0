"""Run a recipe: plan, split, phases, output shards, drop log, manifest."""

from __future__ import annotations

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
from curate.engine.apply import StageStats
from curate.engine.decision import decide, decision_paths
from curate.engine.disk import check_free_disk
from curate.engine.lock import OutputLock, is_lock_file, remove_all_but_lock
from curate.engine.outcome import KeptTooLittle, low_yield
from curate.engine.phases import PhaseSpec, run_phase
from curate.engine.progress import phase_progress
from curate.engine.split import INPUT_PHASE, SOURCE_STAGE, split_source
from curate.engine.trial import TrialSource
from curate.engine.worker import StageSpec
from curate.engine.write import SinkSpec, finish_outputs, write_outputs
from curate.files import RunLayout, read_json, write_json
from curate.manifest.build import build_manifest
from curate.recipe import LoadedRecipe
from curate.roles.assign import ROLE_PHASE, RoleAssignment, RoleAssignmentParams
from curate.roles.assign import TARGET as ROLE_TARGET
from curate.stage import CorpusStage, RecipeError, Stage, StageContext, StageFailure, WeightsUnavailable


class OutputConflict(RecipeError):
    """The output folder holds the work of a different recipe."""


@dataclass
class Plan:
    """A recipe compiled into a source, phases of stages and sinks, checked before any work."""

    loaded: LoadedRecipe
    source: Any
    phases: list[PhaseSpec]
    stages: list[Stage]
    sinks: list[SinkSpec]
    layout: RunLayout
    warnings: list[str]
    storage_config: storage.StorageConfig = field(default_factory=storage.StorageConfig)  # endpoint, region

    def describe(self) -> dict[str, Any]:
        """What `--dry-run` prints: the plan, no work."""
        recipe = self.loaded.recipe
        return {
            "recipe": str(self.loaded.file),
            "recipe_sha256": self.loaded.sha256(),
            "source": self.source.describe(),
            "phases": [{"name": p.name, "stages": [stage.name for stage in p.stages]} for p in self.phases],
            "outputs": {"path": str(self.layout.root), "formats": [sink.name for sink in self.sinks],
                        "shard_rows": recipe.output.shard_rows, "shard_bytes": recipe.output.shard_bytes},
            "engine": recipe.engine.model_dump(mode="json"),
            "warnings": self.warnings,
        }


def compile_plan(loaded: LoadedRecipe, require_weights: bool = True, peek_rows: int = 0) -> Plan:
    """Instantiate the recipe's source, stages and sinks and run every preflight check.

    Missing model weights are an error, unless `require_weights` is off (a dry run),
    where they become warnings of the plan. With `peek_rows`, the first rows of the
    input are read and every stage's `check_input` warnings join the plan's.
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
    if getattr(source_cls, "needs_fetch", False) and "fetch" not in loaded.stage_params:
        raise RecipeError("this source yields URLs; add a `fetch` stage to download them",
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
    phases: list[PhaseSpec] = []
    for stage in stages:
        spec = StageSpec(stage.name, registry.STAGES[stage.name], stage.params.model_dump(mode="json"))
        if isinstance(stage, CorpusStage):
            stage.phase = stage.name
            decision_file, _ = decision_paths(layout.phase_dir(stage.name))
            apply = StageSpec(stage.name, "curate.engine.decision:ApplyDecision",
                              {"decision": str(decision_file), "stage_name": stage.name})
            input_phase = phases[-1].name if phases else INPUT_PHASE
            phases.append(PhaseSpec(stage.name, input_phase, [apply], corpus=spec))
            continue
        if not phases or phases[-1].name != stage.phase or phases[-1].corpus is not None:
            if any(p.name == stage.phase for p in phases):
                raise RecipeError(f"stage {stage.name!r} belongs to phase {stage.phase!r}, which an earlier "
                                  "stage of another phase already closed; reorder the stages",
                                  file=str(loaded.file), path=f"stages.{stage.name}")
            input_phase = phases[-1].name if phases else INPUT_PHASE
            phases.append(PhaseSpec(stage.phase, input_phase, []))
        phases[-1].stages.append(spec)
    if loaded.roles:
        _append_role_step(loaded, context, stages, phases)
    sinks = [SinkSpec(name, registry.SINKS[name], params.model_dump(mode="json"))
             for name, params in loaded.sink_params.items()]
    return Plan(loaded, source, phases, stages, sinks, layout, warnings, storage_config=storage_config)


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
            fetch = next((s for s in stages if s.name == "fetch"), None)
            if images == "fetched" and fetch is not None and fetch.fingerprinted_images() is None:
                raise RecipeError(f"fetch.fingerprints is false, but {stage.name} reads image_meta.pixel_sha256 "
                                  "and phash; remove `fingerprints: false`", file=str(loaded.file),
                                  path="stages.fetch.fingerprints")
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
                      phases: list[PhaseSpec]) -> None:
    """Assign training roles as the last per-sample step: at the end of the last phase (after a corpus
    stage's decision is applied, if that is the last), or in a phase of its own when there is no stage."""
    params = RoleAssignmentParams(roles=loaded.roles, required=loaded.recipe.roles_required)
    step = RoleAssignment(params, context)
    if not phases:
        phases.append(PhaseSpec(ROLE_PHASE, INPUT_PHASE, []))
    step.phase = phases[-1].name
    phases[-1].stages.append(StageSpec(step.name, ROLE_TARGET, params.model_dump(mode="json")))
    stages.append(step)


def check_output_folder(plan: Plan, overwrite: bool) -> str:
    """Decide what to do with the output folder: 'fresh', 'resume' or 'complete'.

    With `overwrite`, whatever the folder holds is deleted and the run starts over. Without it,
    an output of the same recipe and the same input is resumed (or reported complete), and
    OutputConflict is raised when the folder holds something else: another recipe's work, work
    made from an input file that has changed since, or files that are not a curate output.
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
    if layout.manifest.exists():
        previous, previous_input = _recorded(layout.manifest, ("recipe", "sha256"), ("sources", 0, "input_file"))
    elif layout.run_info.exists():
        previous, previous_input = _recorded(layout.run_info, ("recipe_sha256",), ("input_file",))
    elif layout.root.exists() and any(not is_lock_file(entry.name) for entry in layout.root.iterdir()):
        raise OutputConflict("the output folder exists and is not a curate output; choose another "
                             "output.path or pass --overwrite", path="output.path", file=str(layout.root))
    else:
        return "fresh"
    if previous != sha:
        raise OutputConflict(f"the output folder holds the output of a different recipe (sha256 "
                             f"{str(previous)[:12]}, this one {sha[:12]}); choose another output.path or pass "
                             "--overwrite to start over", path="output.path", file=str(layout.root))
    current_input = plan.source.input_file_state()
    if previous_input is not None and current_input is not None and previous_input != current_input:
        raise OutputConflict(f"the input file changed since this output was made (then {_file_state(previous_input)},"
                             f" now {_file_state(current_input)}); pass --overwrite to start over, or choose another "
                             "output.path", path="source.path", file=str(getattr(plan.source, "path", "")))
    return "complete" if layout.manifest.exists() else "resume"


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
            judge: bool = True) -> dict[str, Any]:
    """Run the plan to completion (resuming earlier work) and return the manifest.

    The output folder's lock is held throughout (curate/engine/lock.py): while another live process
    holds it, OutputLocked is raised before anything is read or written, unless `break_lock`.
    With `judge`, a run that kept too little ends with a warning, or KeptTooLittle under
    `output.strict` (the CLI judges after printing its summary instead).
    """
    storage.configure(plan.storage_config)  # the driver's reads of plain URLs; workers get the same config
    with OutputLock(plan.layout.root, break_lock=break_lock,
                    say=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)):
        manifest = _execute(plan, console, address, verbose, overwrite, progress)
    return judge_yield(manifest, console) if judge else manifest


def _execute(plan: Plan, console: Console, address: str | None, verbose: bool, overwrite: bool,
             progress: bool) -> dict[str, Any]:
    """execute(), with the output folder's lock held."""
    state = check_output_folder(plan, overwrite)
    layout, recipe = plan.layout, plan.loaded.recipe
    if state == "complete":
        console.print(f"[green]already complete:[/] {layout.root} (same recipe; nothing to do)")
        return read_json(layout.manifest)
    if recipe.engine.check_disk:  # before any work: refuse a run that clearly cannot fit on the output's disk
        check_free_disk(plan, warn=lambda text: console.print(f"[bold yellow]warning:[/] {text}", highlight=False))
    started_at, started = time.time(), time.perf_counter()
    layout.work.mkdir(parents=True, exist_ok=True)
    write_json(layout.run_info, {"recipe_sha256": plan.loaded.sha256(), "recipe": str(plan.loaded.file),
                                 "input_file": plan.source.input_file_state()})
    if state == "resume":
        console.print(f"[yellow]resuming[/] the unfinished run in {layout.root}")

    resources = cluster.connect(address or recipe.engine.address, verbose=verbose)
    device = cluster.device_summary(resources)
    if device["accelerator"] == "cpu" and any(s.resources.gpus for s in plan.stages):
        console.print("[bold yellow]No GPU in the cluster: model stages run on CPU (slower).[/]")
    timings: dict[str, float] = {}
    context = StageContext(recipe_dir=str(plan.loaded.directory), work_dir=str(layout.work),
                           on_sample_error=recipe.engine.on_sample_error, device=device["accelerator"])

    with phase_progress(console, enabled=progress) as bars:
        phase_started = time.perf_counter()
        split = split_source(plan.source, layout, recipe.engine.rows_per_work_shard)
        timings[INPUT_PHASE] = time.perf_counter() - phase_started
        shards, source_stats = split["shards"], split["stats"]
        markers_by_phase: dict[str, list[dict[str, Any]]] = {}
        decisions: dict[str, dict[str, Any]] = {}
        for phase in plan.phases:
            task = bars.add_task(phase.name, total=source_stats["rows_out"] if phase is plan.phases[0] else None)
            total_in = _phase_input_rows(layout, phase.input_phase, shards, markers_by_phase)
            bars.update(task, total=total_in)
            stage_objects = [s for s in plan.stages if s.phase == phase.name]
            worker_plan = cluster.plan_workers(
                resources, recipe.engine.workers, shards,
                cpus_per_worker=max(s.resources.cpus for s in stage_objects),
                gpus_per_worker=max(s.resources.gpus for s in stage_objects) if device["gpus"] else 0.0,
                memory_per_worker=sum(s.resources.memory_bytes for s in stage_objects))
            phase_started = time.perf_counter()
            if phase.corpus is not None:
                decisions[phase.name] = _decide(phase, layout, shards, context, worker_plan)
            markers_by_phase[phase.name] = run_phase(
                phase, layout, shards, worker_plan, context, batch_rows=recipe.engine.batch_rows,
                on_progress=lambda rows, task=task: bars.advance(task, rows))
            timings[phase.name] = time.perf_counter() - phase_started

        last_phase = plan.phases[-1].name if plan.phases else INPUT_PHASE
        final_files = [layout.shard_file(last_phase, s) for s in range(shards)]
        total_out = sum(storage.parquet_file(f).metadata.num_rows for f in final_files)
        task = bars.add_task("write", total=total_out)
        write_plan = cluster.plan_workers(resources, recipe.engine.workers, max(1, shards))
        phase_started = time.perf_counter()
        outputs = write_outputs(layout, final_files, plan.sinks, recipe.output.shard_rows, recipe.output.shard_bytes,
                                write_plan.cpus_per_worker, max_in_flight=2 * write_plan.workers,
                                on_progress=lambda rows: bars.advance(task, rows),
                                keep_embeddings=recipe.output.embeddings)
        timings["write"] = time.perf_counter() - phase_started

    dropped = write_drop_log(layout, [INPUT_PHASE] + [p.name for p in plan.phases], shards)
    finish_outputs(plan.sinks, layout.root, [file for marker in outputs for file in marker["files"]], layout.drops,
                   started_at, time.perf_counter() - started)
    stage_stats = _collect_stage_stats(source_stats, plan, markers_by_phase)
    manifest = build_manifest(
        plan=plan, layout=layout, device=device, resources=resources, stage_stats=stage_stats,
        phase_seconds=timings, outputs=outputs, final_files=final_files, dropped_rows=dropped, decisions=decisions,
        models=_models(plan, markers_by_phase),
        started_at=started_at, seconds=time.perf_counter() - started)
    if not manifest["reconciliation"]["ok"]:
        # Never publish a manifest that does not add up; keep the work area to look into it.
        write_json(layout.work / "manifest.unreconciled.json", manifest)
        raise StageFailure(f"rows do not reconcile: {manifest['reconciliation']}; see "
                           f"{layout.work / 'manifest.unreconciled.json'}")
    write_json(layout.manifest, manifest)
    if not recipe.engine.keep_work:
        storage.remove_tree(layout.work, ignore_errors=True)
    return manifest


def judge_yield(manifest: dict[str, Any], console: Console) -> dict[str, Any]:
    """Warn when the run kept too little of its input (KeptTooLittle with `output.strict`); return the manifest."""
    output = manifest["recipe"]["resolved"]["output"]
    warning = low_yield(manifest, output.get("min_kept_fraction", 0.01))  # outputs made before both keys existed
    if warning is not None:
        if output.get("strict"):
            raise KeptTooLittle(warning)
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    return manifest


def _decide(phase: PhaseSpec, layout: RunLayout, shards: int, context: StageContext,
            worker_plan: cluster.WorkerPlan) -> dict[str, Any]:
    """Run a corpus stage's decision as one Ray task (reused when a resumed run finds it saved)."""
    files = [str(layout.shard_file(phase.input_phase, s)) for s in range(shards)]
    remote = ray.remote(decide).options(num_cpus=worker_plan.cpus_per_worker, num_gpus=worker_plan.gpus_per_worker,
                                        max_retries=2)  # a lost node: the decision is saved atomically
    try:
        return ray.get(remote.remote(phase.corpus.target, phase.corpus.params, context, files,
                                     str(layout.phase_dir(phase.name)), storage.current_config()))
    except ray.exceptions.RayError as error:
        cause = getattr(error, "cause", error)
        raise StageFailure(f"phase {phase.name!r}, corpus decision: {type(cause).__name__}: {cause}") from None


def _models(plan: Plan, markers_by_phase: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The models as the workers loaded them (device, precision, preprocessing), else as planned."""
    models = []
    for phase in plan.phases:
        loaded = next((m["models"] for m in markers_by_phase.get(phase.name, []) if m.get("models")), None)
        if loaded is None:
            loaded = [info for stage in plan.stages if stage.phase == phase.name for info in stage.model_info()]
        models.extend(loaded)
    return models


def _phase_input_rows(layout: RunLayout, input_phase: str, shards: int,
                      markers_by_phase: dict[str, list[dict[str, Any]]]) -> int:
    if input_phase in markers_by_phase:
        return sum(m["rows_out"] for m in markers_by_phase[input_phase])
    return sum(storage.parquet_file(layout.shard_file(input_phase, s)).metadata.num_rows for s in range(shards))


def _collect_stage_stats(source_stats: dict[str, Any], plan: Plan,
                         markers_by_phase: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    ordered = [{"name": SOURCE_STAGE, "phase": INPUT_PHASE, **source_stats}]
    for phase in plan.phases:
        totals: dict[str, StageStats] = {}
        for marker in markers_by_phase.get(phase.name, []):
            for name, data in marker["stages"].items():
                totals.setdefault(name, StageStats()).add(StageStats.from_json(data))
        for stage in phase.stages:
            ordered.append({"name": stage.name, "phase": phase.name,
                            **totals.get(stage.name, StageStats()).to_json()})
    return ordered

