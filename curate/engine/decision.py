"""Corpus-wide stages: compute a decision over all work shards, then apply it shard by shard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate import registry, schema
from curate.files import read_json, write_json, write_table
from curate.stage import Params, Stage, StageContext, with_drops

DECISION_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def decision_paths(phase_dir: Path) -> tuple[Path, Path]:
    """Where a corpus phase keeps its decision (drops) and its summary."""
    return phase_dir / "decision.parquet", phase_dir / "decision.json"


def decide(target: str, params: dict[str, Any], context: StageContext, files: list[str], phase_dir: str) -> dict:
    """Run a corpus stage's `decide` over the given columns of all `files`; save and return its summary.

    Runs as a Ray task. Saved atomically, so a resumed run reuses the decision.
    """
    decision_file, summary_file = decision_paths(Path(phase_dir))
    if summary_file.exists():
        return read_json(summary_file)
    cls = registry.import_target(target)
    stage = cls(cls.Params.model_validate(params), context)
    stage.setup()
    started = time.perf_counter()
    columns = list(dict.fromkeys(("key", *cls.columns)))
    tables = [pq.read_table(f, columns=columns) for f in files]
    empty = pa.schema([schema.SAMPLE_SCHEMA.field(c) for c in columns]).empty_table()
    table = pa.concat_tables(tables) if tables else empty
    drops, summary = stage.decide(table)
    stage.teardown()
    drops = drops.select(["key", "reason", "detail"]).cast(DECISION_SCHEMA)
    write_table(decision_file, drops)
    summary = {**summary, "rows": table.num_rows, "dropped": drops.num_rows,
               "seconds": round(time.perf_counter() - started, 3)}
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
        table = pq.read_table(self.params.decision)
        self._reasons = dict(zip(table.column("key").to_pylist(), zip(table.column("reason").to_pylist(),
                                                                       table.column("detail").to_pylist())))

    def process(self, batch: pa.Table) -> pa.Table:
        if not hasattr(self, "_reasons"):
            self.setup()
        decided = [self._reasons.get(key, (None, None)) for key in batch.column("key").to_pylist()]
        return with_drops(batch, [d[0] for d in decided], [d[1] for d in decided])

