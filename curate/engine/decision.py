"""Corpus-wide stages: compute a decision over all work shards, then apply it shard by shard."""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curate import registry, storage
from curate.files import read_json, write_json, write_table
from curate.stage import Params, Stage, StageContext, with_drops

# A decision row either drops its sample (reason set) or annotates it (reason null, `annotation` set):
# the annotation is a JSON object merged into the sample's `meta` (e.g. a dedup group id).
DECISION_SCHEMA = pa.schema(
    [("key", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("annotation", pa.string())]
)


def decision_paths(phase_dir: storage.Location) -> tuple[storage.Location, storage.Location]:
    """Where a corpus phase keeps its decision (drops) and its summary."""
    return phase_dir / "decision.parquet", phase_dir / "decision.json"


def needs_ray(target: str, phase_dir: str) -> bool:
    """Whether deciding with the corpus stage `target` may start Ray tasks: it spreads its work over them
    (CorpusStage.uses_ray_tasks) and no saved decision is there to reuse."""
    cls = registry.import_target(target)
    _, summary_file = decision_paths(storage.location(phase_dir))
    return bool(getattr(cls, "uses_ray_tasks", False)) and not summary_file.exists()


def decide(target: str, params: dict[str, Any], context: StageContext, files: list[str], phase_dir: str,
           storage_config: storage.StorageConfig | None = None) -> dict:
    """Run a corpus stage's `decide` over the given columns of all `files`; save and return its summary.

    Runs as a Ray task. Saved atomically, so a resumed run reuses the decision. `storage_config`
    (the driver's) lets this process open the same store when the paths are URLs.
    """
    storage.configure(storage_config)
    decision_file, summary_file = decision_paths(storage.location(phase_dir))
    if summary_file.exists():
        return read_json(summary_file)
    cls = registry.import_target(target)
    stage = cls(cls.Params.model_validate(params), context)
    stage.setup()
    started = time.perf_counter()
    drops, summary, rows = stage.decide_files(files, phase_dir)
    dropped = pc.sum(pc.is_valid(drops.column("reason"))).as_py() or 0 if drops.num_rows else 0
    stage.teardown()
    if "annotation" not in drops.column_names:
        drops = drops.append_column("annotation", pa.nulls(drops.num_rows, pa.string()))
    drops = drops.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA)
    write_table(decision_file, drops)
    summary = {
        **summary,
        "rows": rows,
        "dropped": dropped,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(summary_file, summary)
    return summary


class ApplyDecisionParams(Params):
    """Which decision to apply and under which stage name to report it."""

    decision: str
    stage_name: str


class ApplyDecision(Stage):
    """Marks the rows a corpus stage decided to drop; used by the engine, not by recipes."""

    name = "apply_decision"
    Params = ApplyDecisionParams

    def __init__(self, params: ApplyDecisionParams, context: StageContext | None = None):
        super().__init__(params, context)
        self.name = params.stage_name  # counted under the corpus stage's own name

    def setup(self) -> None:
        table = storage.read_table(self.params.decision)
        self._decided = {row["key"]: row for row in table.to_pylist()}

    def process(self, batch: pa.Table) -> pa.Table:
        if not hasattr(self, "_decided"):
            self.setup()
        decided = [self._decided.get(key) or {} for key in batch.column("key").to_pylist()]
        if any(d.get("annotation") for d in decided):
            metas = [
                merge_meta(meta, d.get("annotation")) for meta, d in zip(batch.column("meta").to_pylist(), decided)
            ]
            batch = batch.set_column(batch.schema.get_field_index("meta"), "meta", pa.array(metas, pa.string()))
        return with_drops(batch, [d.get("reason") for d in decided], [d.get("detail") for d in decided])


def merge_meta(meta: str | None, annotation: str | None) -> str | None:
    """Merge the JSON object `annotation` into the sample's `meta` JSON (a non-object meta is kept as `original`)."""
    if not annotation:
        return meta
    try:
        current = json.loads(meta) if meta else {}
    except json.JSONDecodeError:
        current = {"original": meta}
    if not isinstance(current, dict):
        current = {"original": current}
    _deep_update(current, json.loads(annotation))
    return json.dumps(current, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value
