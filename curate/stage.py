"""The one stage contract every step of a pipeline follows.

A stage is a small class with a `name`, a pydantic `Params` model (unknown keys
rejected), declared `resources`, `preflight()` (cheap checks at plan time, before
any work: files and model weights exist), `setup()` (load heavy things once per
worker) and two steps:

- `annotate(batch) -> batch` computes: it fills the columns the stage `provides`
  (scores, embeddings, measurements in `meta`, ...). It sets `drop_reason` only
  when nothing is left to annotate (a 404, bytes that are not an image, a stage
  error): those are the stage's *hard* drops.
- `select(batch) -> batch` decides: it sets `drop_reason` (null = keep) and
  `drop_detail` from the annotated columns alone, never from image bytes, by the
  stage's selection params (thresholds, policies).

`process(batch)` is both in one go. A stage that only overrides `process` (older
stages) has all its drops treated as hard ones: they are computed with its
annotations and recorded with them.

Declarations the engine reads (it never names a stage): `scope` (per "sample" or
"corpus"-wide), `reads` and `provides` (sample columns), `reads_images` (needs
`images[].bytes`; else the engine leaves the bytes out of its batches),
`reads_image_fingerprints` / `fingerprints_images`, `resources`, `version`, and
which Params fields are `annotation_params` (they change computed values and are
part of the annotation's fingerprint) or `selection_params` (thresholds and
policies: changing one never recomputes anything). Every field is one or the
other. Of the annotation params, `speed_params` only set the pace (left out of
the fingerprint), `admission_params` decide which rows are admitted (left out of
the fingerprint; `readmits()` names the earlier drops a change may cure, which the
engine computes again), and `pool_params` define the pool's images (an output
cannot change them in place). A stage with `write_transform` changes image bytes at the write
(`transform(batch)`, e.g. face blurring), from what it annotated.

A batch is an Arrow table of unified samples (curate.schema.SAMPLE_SCHEMA). The
engine moves dropped rows to the drop log. A sample-level failure is a drop with a
reason; an exception escaping a step is a stage-level failure and stops the run,
naming the work shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from curate.metrics import Metric, Threshold
from curate.schema import DROP_DETAIL, DROP_REASON


class Params(BaseModel):
    """Base of every stage/source/sink parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage asks the cluster for."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_bytes: int = 0


class RecipeError(Exception):
    """A user mistake in a recipe or its inputs, reported as one clear line.

    `path` is the key path in the recipe (e.g. ``source.url_column``), `file` the
    recipe or input file concerned.
    """

    def __init__(self, message: str, *, path: str | None = None, file: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = path
        self.file = file

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.path) if p)
        return f"{where}: {self.message}" if where else self.message


class WeightsUnavailable(RecipeError):
    """Model weights a recipe names are not available locally (or do not match their sha256 pin)."""


class StageFailure(RuntimeError):
    """A stage failed as a whole (not one sample): the run stops, naming the phase and work shard."""


@dataclass
class StageContext:
    """What the engine tells a stage about the run it is part of."""

    recipe_dir: str = "."
    work_dir: str = ""
    on_sample_error: Literal["drop", "raise"] = "drop"
    device: str = "cpu"
    # "stage.service" -> name of the Ray actor the engine started for it (Stage.services); empty outside Ray
    services: dict[str, str] = field(default_factory=dict)
    services_namespace: str | None = None


@dataclass(frozen=True)
class ServiceSpec:
    """A process that every worker of a run shares (one Ray actor, started by the engine before any worker and
    stopped after the last): `target` is the import target of its class, `params` its keyword arguments."""

    target: str
    params: dict[str, Any] = field(default_factory=dict)
    max_concurrency: int | None = None  # calls the actor may hold at once (an async actor: Ray's default 1,000)


class Stage:
    """Base class of per-sample stages. Subclasses set the class attributes and `process`."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    # Consecutive stages of the same phase run together on a work shard and share
    # one checkpoint; a new phase starts a new checkpoint.
    phase: ClassVar[str] = "prepare"
    resources: ClassVar[Resources] = Resources()
    # True when the stage reads image_meta.pixel_sha256 / phash, which fetch computes unless told not to.
    reads_image_fingerprints: ClassVar[bool] = False
    # which images this stage fills image_meta.pixel_sha256 / phash for: "fetched" (downloaded), "stored" (came with
    # bytes), or None; the plan refuses a stage that reads fingerprints nothing before it computes
    fingerprints_images: ClassVar[str | None] = None
    # the Params field that turns the fingerprints off, named in the plan's error when they are needed
    fingerprints_switch: ClassVar[str | None] = None
    # True for the stage that turns a URL source's rows into images (the plan requires one for such sources)
    fetches_urls: ClassVar[bool] = False
    scope: ClassVar[Literal["sample", "corpus"]] = "sample"
    version: ClassVar[int] = 1  # raise it when the stage computes different values for the same params
    reads: ClassVar[frozenset[str]] = frozenset()  # sample columns read (besides `key`)
    provides: ClassVar[frozenset[str]] = frozenset()  # sample columns filled or changed
    reads_images: ClassVar[bool] = False  # needs images[].bytes
    annotation_params: ClassVar[frozenset[str]] = frozenset()
    selection_params: ClassVar[frozenset[str]] = frozenset()
    # annotation params that only set the pace (threads, batch sizes): outside the fingerprint, never recompute
    speed_params: ClassVar[frozenset[str]] = frozenset()
    # annotation params that decide which rows the stage admits (address guard, timeouts, ...): outside the
    # fingerprint; readmits() says which earlier drops a change may cure
    admission_params: ClassVar[frozenset[str]] = frozenset()
    # params that define the pool's images (resize, encode): an output cannot change them in place
    pool_params: ClassVar[frozenset[str]] = frozenset()
    write_transform: ClassVar[bool] = False  # transform(batch) is applied to the kept rows at the write

    def __init__(self, params: Params, context: StageContext | None = None):
        self.params = params
        self.context = context or StageContext()

    def preflight(self) -> None:
        """Check, before any work, that what the stage needs exists. Raise RecipeError if not."""

    def fingerprinted_images(self) -> str | None:
        """Which images this stage fills fingerprints for, as configured ("fetched", "stored" or None)."""
        return self.fingerprints_images

    def check_input(self, sample: pa.Table) -> list[str]:
        """Warnings about the first rows of the input (`sample`), told before any work (`--dry-run`)."""
        return []

    def setup(self) -> None:
        """Load heavy things (models, sessions) once per worker."""

    def process(self, batch: pa.Table) -> pa.Table:
        """Return `batch` with this stage's columns filled and, optionally, `drop_reason` set."""
        return self.select(self.annotate(batch))

    def annotate(self, batch: pa.Table) -> pa.Table:
        """Fill the columns this stage provides; set `drop_reason` only where nothing is left to annotate."""
        if type(self).process is not Stage.process:  # a stage with one step: its drops are all hard
            return self.process(batch)
        raise NotImplementedError(f"{type(self).__name__} implements neither annotate() nor process()")

    def select(self, batch: pa.Table) -> pa.Table:
        """Set `drop_reason` by this stage's criteria, from annotated columns only (no image bytes)."""
        return batch

    @classmethod
    def splits_steps(cls) -> bool:
        """True when the stage's criteria are a separate `select` step (re-selectable without recomputing)."""
        return cls.select is not Stage.select or cls.process is Stage.process

    def forgets_drops(self) -> bool:
        """True when the pool must forget the rows this stage hard-drops (bytes, URLs, captions blanked), e.g. a
        blocklist whose listed samples must leave no trace in the output folder."""
        return False

    def transform(self, batch: pa.Table) -> pa.Table:
        """With `write_transform`: change the kept rows' image bytes at the write, from their annotations."""
        return batch

    def fingerprint(self) -> dict:
        """What the stage's annotations depend on: stage, version, annotation params (but the speed and
        admission ones), weights and precision."""
        params = self.params.model_dump(mode="json")
        models = self.model_info()
        counted = self.annotation_params - self.speed_params - self.admission_params
        return {
            "stage": self.name,
            "version": self.version,
            "params": {name: params[name] for name in sorted(counted) if name in params},
            "weights": sorted(str(m.get("sha256") or m.get("weights") or m.get("name")) for m in models),
            "precision": sorted({str(m.get("precision") or self.context.device) for m in models}),
        }

    def admission(self) -> dict:
        """The values of the admission params, as recorded with the annotations."""
        params = self.params.model_dump(mode="json")
        return {name: params[name] for name in sorted(self.admission_params) if name in params}

    def readmits(self, before: dict) -> frozenset[str] | None:
        """The drop reasons of rows this stage may now admit, given the admission params its annotations were
        made with (`before`): the engine computes those rows again and keeps the rest. Empty: nothing changed.
        None: the change is not one that only admits more: every row is computed again."""
        return frozenset() if before == self.admission() else None

    def min_batch_rows(self) -> int:
        """The fewest rows per batch that keep this stage busy (e.g. one per download thread and more); the
        engine gives its group batches of at least so many rows, and of `engine.batch_rows` otherwise."""
        return 1

    def services(self) -> dict[str, ServiceSpec]:
        """The run-wide services this stage's workers share (e.g. one politeness limiter for every fetch worker of
        the run), by a name of the stage's choosing. The engine starts each once per run, on the driver's node."""
        return {}

    def service(self, name: str) -> Any:
        """The Ray actor handle of this stage's service `name` in the current run, or None when the stage runs
        outside a run that started it (in this process, in tests)."""
        actor = self.context.services.get(f"{self.name}.{name}")
        if actor is None:
            return None
        import ray

        return ray.get_actor(actor, namespace=self.context.services_namespace)

    def teardown(self) -> None:
        """Release what `setup` acquired."""

    def model_info(self) -> list[dict]:
        """The models this stage uses (name, weights, sha256, ...), for the manifest."""
        return []

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a counter of this stage (e.g. images blurred); the manifest sums it per stage."""
        counters = self.__dict__.setdefault("_counters", {})
        counters[name] = counters.get(name, 0) + amount

    def take_counters(self) -> dict[str, int]:
        """The counts since the last call, then reset (the engine calls it after each batch)."""
        return self.__dict__.pop("_counters", {})

    def metrics(self) -> list[Metric]:
        """The numeric annotations this stage writes and where its annotation table holds them (curate/metrics.py)."""
        return []

    def thresholds(self) -> list[Threshold]:
        """The limits the current selection params put on this stage's metrics."""
        return []


def with_drops(batch: pa.Table, reasons: list[str | None], details: list[str | None] | None = None) -> pa.Table:
    """Attach per-row drop reasons (None = keep) and details to `batch`.

    A reason already set on a row (by an earlier check of the same stage) wins.
    """
    if len(reasons) != batch.num_rows:
        raise ValueError("one drop reason per row is required")
    details = list(details) if details is not None else [None] * batch.num_rows
    reasons = list(reasons)
    if DROP_REASON in batch.column_names:
        old_reasons = batch.column(DROP_REASON).to_pylist()
        old_details = (
            batch.column(DROP_DETAIL).to_pylist() if DROP_DETAIL in batch.column_names else [None] * batch.num_rows
        )
        for i, old in enumerate(old_reasons):
            if old is not None:
                reasons[i], details[i] = old, old_details[i]
        batch = batch.drop_columns([c for c in (DROP_REASON, DROP_DETAIL) if c in batch.column_names])
    batch = batch.append_column(DROP_REASON, pa.array(reasons, pa.string()))
    return batch.append_column(DROP_DETAIL, pa.array(details, pa.string()))


class CorpusStage(Stage):
    """A stage that decides per sample from the whole corpus (top-k% thresholds, dedup).

    It runs as a phase of its own, named after the stage. First `decide` sees the
    `columns` it asks for from every work shard of the previous phase (one table,
    in work-shard order) and returns the rows to drop as a DROP-like table with
    columns key, reason, detail; the engine saves that decision, then drops those
    keys from every work shard. `decide` must be deterministic: the same rows in
    any split give the same decision.
    """

    columns: ClassVar[tuple[str, ...]] = ("key",)
    scope: ClassVar[Literal["sample", "corpus"]] = "corpus"
    # True when `decide_files` may spread its work over Ray tasks (the engine then starts Ray for it even in a
    # re-selection that otherwise runs in one process)
    uses_ray_tasks: ClassVar[bool] = False

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict]:
        """Return (drops: key/reason/detail table, summary for the manifest)."""
        raise NotImplementedError

    def decide_files(self, files: list[str], work_dir: str) -> tuple[pa.Table, dict, int]:
        """Decide over the work shards `files` (in order); return (drops, summary, rows judged).

        By default reads `columns` of every file into one table and calls `decide`. A stage
        whose columns do not fit one process (embeddings of a large corpus) overrides this
        and spreads the work over Ray tasks, using `work_dir` for intermediate files.
        """
        from curate import schema, storage

        columns = list(dict.fromkeys(("key", *self.columns)))
        tables = [storage.read_table(f, columns=columns) for f in files]
        empty = pa.schema([schema.SAMPLE_SCHEMA.field(c) for c in columns]).empty_table()
        table = pa.concat_tables(tables) if tables else empty
        drops, summary = self.decide(table)
        return drops, summary, table.num_rows

    def process(self, batch: pa.Table) -> pa.Table:
        raise TypeError(f"{self.name} is corpus-wide: the engine calls decide(), not process()")
