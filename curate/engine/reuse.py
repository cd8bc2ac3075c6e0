"""Which annotations a run reuses and which it computes, per stage and work shard, from the completion markers.

A run reads the pool of its own output and, with `--pool OTHER`, the pool of another output (read
only: nothing is ever written there). A stage's table of a work shard is reused when its marker was
made under the stage's current fingerprint; the group of stages it belongs to still goes to a worker
for that shard when the table is not the whole answer:

- the stage's admission settings changed so that it may now admit rows it dropped (Stage.readmits), or
  a retry asks for rows dropped for a transient reason, and the table holds such drops;
- the stage is a gate whose criteria changed (its verdicts are taken again, from the annotations);
- the rows alive when the group starts are not those the table saw (an upstream stage, or a gate
  before it, now lets other rows through).

The worker then computes only the rows the table lacks (curate/engine/annotate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from curate.engine.annotate import AnnotationTarget, all_alive
from curate.engine.reselect import has_split
from curate.engine.split import INPUT_PHASE
from curate.files import RunLayout, read_json
from curate.stage import Stage


@dataclass
class PoolPlaces:
    """The pools a run reads: its own (which it writes) and, with --pool, another output's (read only)."""

    own: RunLayout
    other: RunLayout | None = None
    _markers: dict[tuple[str, int, int], dict[str, Any] | None] = field(default_factory=dict, repr=False)

    @property
    def split(self) -> RunLayout:
        """The layout whose input split the run uses (the other pool's unless this output has its own)."""
        if self.other is not None and not has_split(self.own):
            return self.other
        return self.own

    def input_file(self, shard: int) -> str:
        return str(self.split.shard_file(INPUT_PHASE, shard))

    def _marker(self, which: int, stage: str, shard: int) -> dict[str, Any] | None:
        layout = self.own if which == 0 else self.other
        if layout is None:
            return None
        key = (stage, shard, which)
        if key not in self._markers:
            file = layout.marker(layout.annotation_phase(stage), shard)
            try:
                self._markers[key] = read_json(file) if file.exists() else None
            except ValueError:  # cut short: as if absent, the shard is annotated again
                self._markers[key] = None
        return self._markers[key]

    def forget(self, stage: str, shard: int) -> None:
        """Drop the cached markers of `stage` for `shard` (after a worker rewrote them)."""
        self._markers.pop((stage, shard, 0), None)

    def table(self, stage: str, shard: int, fingerprint: str) -> tuple[RunLayout | None, dict[str, Any] | None]:
        """Where the table of `stage` for `shard` made under `fingerprint` is, and its marker (None, None: none)."""
        for which, layout in ((0, self.own), (1, self.other)):
            marker = self._marker(which, stage, shard)
            if marker is not None and marker.get("fingerprint") == fingerprint:
                return layout, marker
        return None, None

    def table_file(self, stage: str, shard: int, fingerprint: str) -> str:
        """The table of `stage` for `shard` the run reads: the usable one, else this output's own path."""
        layout, _ = self.table(stage, shard, fingerprint)
        layout = layout or self.own
        return str(layout.shard_file(layout.annotation_phase(stage), shard))

    def is_own(self, file: str) -> bool:
        """Whether `file` is in this output's pool (which the run may change or delete)."""
        return self.other is None or not file.startswith(str(self.other.pool))


@dataclass
class ShardPlan:
    """What the annotation of one group does on one work shard."""

    targets: list[AnnotationTarget]
    pending: bool  # a worker must see the shard (else every table is reused as it is)
    places: list[str]  # per stage: "own", "other" or "" (no usable table)


def gate_criteria(stage: Stage) -> dict[str, Any]:
    """A gate's criteria as its annotation marker records them: the stage's selection params."""
    params = stage.params.model_dump(mode="json")
    return {name: params[name] for name in sorted(stage.selection_params) if name in params}


def plan_shard(places: PoolPlaces, stages: list[Stage], fingerprints: dict[str, str], gates: list[str],
               shard: int, expected_alive: str | None, redo: dict[str, frozenset[str]]) -> ShardPlan:
    """Decide, for one group of `stages` on one work shard, which tables are reused and whether a worker runs.

    `expected_alive` is the digest of the rows alive when the group starts (None: the first group, which sees
    every row); `redo` adds, per stage, drop reasons whose rows are computed again (a retry).
    """
    own = places.own
    targets, places_of, pending = [], [], False
    for index, stage in enumerate(stages):
        fingerprint = fingerprints[stage.name]
        layout, marker = places.table(stage.name, shard, fingerprint)
        gate = gate_criteria(stage) if stage.name in gates else None
        admission = stage.admission()
        previous, again = None, frozenset()
        readmitted = stage.readmits(marker.get("admission") or {}) if marker is not None else None
        if marker is None or readmitted is None:
            pending = True
        else:
            previous = str(layout.shard_file(layout.annotation_phase(stage.name), shard))
            again = readmitted | redo.get(stage.name, frozenset())
            expected = all_alive(marker.get("rows", -1)) if expected_alive is None else expected_alive
            pending = pending or bool(again & set(marker.get("reasons", {}))) or marker.get("gate") != gate \
                or (marker.get("admission") or {}) != admission \
                or (index == 0 and marker.get("alive_in") != expected)
        places_of.append("" if marker is None else "own" if layout is own else "other")
        targets.append(AnnotationTarget(
            stage.name, str(own.shard_file(own.annotation_phase(stage.name), shard)),
            str(own.marker(own.annotation_phase(stage.name), shard)), fingerprint, previous=previous,
            redo=tuple(sorted(again)), admission=admission, gate=gate, previous_marker=marker))
    return ShardPlan(targets, pending, places_of)


def ranges(shards: list[int]) -> str:
    """Shard numbers as compact ranges: [0, 1, 2, 5] -> "0-2,5"."""
    spans: list[list[int]] = []
    for shard in sorted(set(shards)):
        if spans and spans[-1][1] == shard - 1:
            spans[-1][1] = shard
        else:
            spans.append([shard, shard])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


@dataclass
class ReuseRecord:
    """What the run reused and computed of one stage's annotations, for the manifest."""

    computed_rows: int = 0
    reused_rows: int = 0
    computed: list[int] = field(default_factory=list)  # work shards a worker annotated (some rows or all)
    reused: list[int] = field(default_factory=list)  # work shards whose table was reused as it was
    from_other: list[int] = field(default_factory=list)  # of those, the shards read from the other pool
    loads: int = 0  # how many times a worker set the stage up (loaded its models)

    def to_json(self) -> dict[str, Any]:
        found = {"computed_rows": self.computed_rows, "reused_rows": self.reused_rows,
                 "shards": {"computed": ranges(self.computed), "reused": ranges(self.reused)}, "loads": self.loads}
        if self.from_other:
            found["shards"]["from_pool"] = ranges(self.from_other)
        return found
